"""The ceiling under the DiT speed targets: how fast this CPU multiplies matrices, fp32 and int8, in torch and in
ONNX Runtime, at the DiT step's own GEMM shapes — side by side in one run.

A DiT evaluation is ~95 % GEMM FLOPs (qkv, proj, MLP, per-token adaLN; attention adds the rest), so ONNX Runtime
cannot beat eager torch by more than its GEMM beats torch's GEMM at those shapes, and int8 cannot beat fp32 by more
than the int8 kernel beats the fp32 one. This prints both ratios, GFLOP/s, and the share of the GEMM ceiling each
whole DiT evaluation reaches when ``--dit-ms`` gives its measured time (from bench/onnx_vs_torch.py).

    python bench/gemm_ceiling.py [--hidden 384 --depth 16 --frames 168 --prefix 900] [--threads 2] [--repeats 7]
        [--dit-ms torch=195,onnx_fp32=162,onnx_int8_dynamic=111]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

from kimia_edge.runtime.metrics import machine_label

MLP_RATIO = 4
ADALN_CHUNKS = 6


def dit_gemms(hidden: int, frames: int) -> List[Tuple[str, int, int]]:
    """(name, K, N) of one DiT block's GEMMs with M = frames rows."""
    return [("qkv", hidden, 3 * hidden), ("proj", hidden, hidden), ("fc1", hidden, MLP_RATIO * hidden),
            ("fc2", MLP_RATIO * hidden, hidden), ("adaLN", hidden, ADALN_CHUNKS * hidden)]


def dit_flops(hidden: int, depth: int, frames: int, prefix: int) -> Tuple[float, float]:
    """(GEMM FLOPs, attention FLOPs) of one DiT evaluation."""
    gemm = sum(2 * frames * k * n for _, k, n in dit_gemms(hidden, frames)) * depth
    attention = 2 * 2 * frames * (prefix + frames) * hidden * depth  # QK^T and AV
    return float(gemm), float(attention)


def matmul_graph(path: Path, k: int, n: int, weight: np.ndarray) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=384, help="DiT width (small snapshot 384, full size 2304)")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--frames", type=int, default=168)
    parser.add_argument("--prefix", type=int, default=900)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dit-ms", default="", help="measured ms per DiT evaluation, path=ms,... (optional)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.frames, args.hidden * MLP_RATIO)).astype(np.float32)
    totals: Dict[str, float] = {"torch fp32": 0.0, "onnx fp32": 0.0, "onnx int8_dynamic": 0.0}
    print(f"machine: {machine_label()}; {args.threads} threads; M = {args.frames} rows; median of {args.repeats}\n")
    print("| GEMM (K x N) | torch fp32 GFLOP/s | ORT fp32 GFLOP/s | ORT int8 dyn GFLOP/s | ORT fp32 / torch | int8 / ORT fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name, k, n in dit_gemms(args.hidden, args.frames):
            w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
            xk = np.ascontiguousarray(x[:, :k])
            fp32, int8 = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.int8.onnx"
            matmul_graph(fp32, k, n, w)
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
            s32 = ort.InferenceSession(str(fp32), so, providers=["CPUExecutionProvider"])
            s8 = ort.InferenceSession(str(int8), so, providers=["CPUExecutionProvider"])
            tx, tw = torch.from_numpy(xk), torch.from_numpy(w)
            secs = {"torch fp32": timed(lambda: torch.mm(tx, tw), args.repeats),
                    "onnx fp32": timed(lambda: s32.run(None, {"x": xk}), args.repeats),
                    "onnx int8_dynamic": timed(lambda: s8.run(None, {"x": xk}), args.repeats)}
            flops = 2.0 * args.frames * k * n
            for path, s in secs.items():
                totals[path] += s * args.depth
            g = {p: flops / s / 1e9 for p, s in secs.items()}
            print(f"| {name} ({k} x {n}) | {g['torch fp32']:.0f} | {g['onnx fp32']:.0f} | {g['onnx int8_dynamic']:.0f} | "
                  f"{g['onnx fp32'] / g['torch fp32']:.2f}x | {g['onnx int8_dynamic'] / g['onnx fp32']:.2f}x |")

    gemm, attention = dit_flops(args.hidden, args.depth, args.frames, args.prefix)
    print(f"\none DiT evaluation (hidden {args.hidden}, depth {args.depth}, T {args.frames}, prefix {args.prefix}): "
          f"{gemm / 1e9:.1f} GFLOP in GEMMs + {attention / 1e9:.1f} GFLOP attention")
    print("sum of its GEMMs alone (the floor of an evaluation): " + ", ".join(
        f"{p} {1000 * s:.1f} ms" for p, s in totals.items()))
    print(f"ceiling ratios: ORT fp32 vs torch fp32 {totals['torch fp32'] / totals['onnx fp32']:.2f}x, "
          f"ORT int8 vs torch fp32 {totals['torch fp32'] / totals['onnx int8_dynamic']:.2f}x (GEMMs only)")
    for item in filter(None, args.dit_ms.split(",")):
        path, ms = item.split("=")
        key = {"torch": "torch fp32", "onnx_fp32": "onnx fp32", "onnx_int8_dynamic": "onnx int8_dynamic"}[path]
        print(f"  measured whole evaluation, {key}: {float(ms):.1f} ms; its GEMMs take "
              f"{100 * 1000 * totals[key] / float(ms):.0f} % of that")


if __name__ == "__main__":
    main()
