"""ONNX Runtime vs the PyTorch reference, per graph and precision, on the same input and thread count, in one run.

For each graph: eager torch fp32 latency, then each ONNX variant's latency, the ratio, and its error against
torch on that input. The DiT is timed as a streaming chunk at steady state (T = 168 frames against a full
900-frame prefix, 29 Euler evaluations + the priming pass) and the vocoder on one chunk (156 frames); their sum
gives the real-time factor of synthesis per 2.4 s chunk of speech.

    python bench/onnx_vs_torch.py --snapshot /work/snaps/small [--graphs dit_step vocoder] \
        [--precisions fp32 fp16 int8_dynamic int8_qdq] [--calibration-audio DIR] [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

from kimia_edge.export.exporter import audio_files
from kimia_edge.export.graphs import graph_spec
from kimia_edge.export.graphs.base import CalibrationContext, ErrorStats, GraphSpec, compare, export_graph, run_torch
from kimia_edge.export.precision import make_variant
from kimia_edge.runtime.dit_config import StreamingConfig
from kimia_edge.runtime.frontend import load_audio, to_16k_mono
from kimia_edge.runtime.sessions import open_file_session
from kimia_edge.runtime.metrics import machine_label

CHUNK_AUDIO_S = StreamingConfig().chunk_tokens / 12.5  # 2.4 s of speech per steady-state chunk
DIT_EVALS_PER_CHUNK = StreamingConfig().ode_time_points  # 29 Euler steps + 1 priming pass




def bench_inputs(spec: GraphSpec, module: torch.nn.Module) -> List[torch.Tensor]:
    """The input timed: a steady-state streaming chunk for the DiT, one chunk for the vocoder, else the export example."""
    if spec.name == "dit_step":
        cfg, window = module.cfg, StreamingConfig().max_kv_cache_frames
        x, t, tok, pos, _, _, _ = spec.example_inputs(module, 168, seed=0)
        kv = torch.randn(cfg.depth, 1, cfg.num_heads, window, cfg.head_dim)
        return [x, t, tok, pos + window, kv, kv.clone(), torch.tensor([window])]
    if spec.name == "vocoder":
        return list(spec.example_inputs(module, 156, seed=0))
    return list(spec.example_inputs(module, spec.parity_lengths[0], seed=0))


def median_seconds(fn: Callable[[], object], repeats: int, calls: int) -> float:
    fn()  # warm-up (allocations, ORT arena, oneDNN primitives)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_graph(name: str, snapshot: Path, precisions: Sequence[str], threads: int, repeats: int,
                context: CalibrationContext, tmp: Path) -> List[Dict[str, object]]:
    spec = graph_spec(name)
    module = spec.build(snapshot).eval()
    calls = DIT_EVALS_PER_CHUNK if name == "dit_step" else 1
    inputs = bench_inputs(spec, module)
    ref = run_torch(module, inputs)
    # the reference as the golden pipeline runs it: the DiT step without a mask when the whole prefix is valid
    # (a boolean mask sends torch's SDPA down its slow math path; the export wrapper always builds one)
    torch_call = (lambda: module.dit.step(*inputs[:6])) if name == "dit_step" else (lambda: module(*inputs))
    with torch.inference_mode():
        torch_s = median_seconds(torch_call, repeats, calls)
    rows = [{"graph": name, "precision": "torch fp32", "seconds": torch_s, "speedup": 1.0, "max_abs": 0.0, "rel_l2": 0.0}]
    fp32 = tmp / f"{name}.fp32.onnx"
    export_graph(spec, module, fp32)
    feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs)}
    for precision in precisions:
        path = fp32
        if precision != "fp32":
            calibration = spec.calibration_feeds(module, context) if precision == "int8_qdq" else None
            if precision == "int8_qdq" and not calibration:
                continue
            path = make_variant(precision, fp32, tmp / f"{name}.{precision}.onnx", calibration)
        session = open_file_session(path, threads)
        err: ErrorStats = compare(spec, session.run(feeds), ref)
        seconds = median_seconds(lambda: session.run(feeds), repeats, calls)
        rows.append({"graph": name, "precision": f"onnx {precision}", "seconds": seconds, "speedup": torch_s / seconds,
                     "max_abs": err.max_abs, "rel_l2": err.rel_l2})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("--graphs", nargs="+", default=["dit_step", "vocoder", "whisper_encoder", "vq_encoder", "adaptor"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8_dynamic", "int8_qdq"])
    parser.add_argument("--calibration-audio", nargs="*", type=Path, default=[], help="speech for int8_qdq")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    speech = [to_16k_mono(*load_audio(p)) for p in audio_files(args.calibration_audio)]
    context = CalibrationContext(args.snapshot, speech)

    rows: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.graphs:
            rows += bench_graph(name, args.snapshot, args.precisions, args.threads, args.repeats, context, Path(tmp))

    print(f"machine: {machine_label()}; {args.threads} threads (torch and ONNX Runtime); snapshot {args.snapshot}\n")
    print("| graph | path | time per call or chunk (ms) | speed vs torch | max abs err | rel L2 err |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        unit = " (chunk: 30 evals)" if r["graph"] == "dit_step" else ""
        print(f"| {r['graph']}{unit} | {r['precision']} | {1000 * r['seconds']:.1f} | {r['speedup']:.2f}x | "
              f"{r['max_abs']:.2e} | {r['rel_l2']:.2e} |")
    by = {(r["graph"], r["precision"]): r["seconds"] for r in rows}
    if ("dit_step", "torch fp32") in by and ("vocoder", "torch fp32") in by:
        print(f"\nRTF of synthesis (DiT chunk + vocoder chunk per {CHUNK_AUDIO_S:.1f} s of speech):")
        for p in ["torch fp32"] + [f"onnx {q}" for q in args.precisions]:
            if ("dit_step", p) in by and ("vocoder", p) in by:
                print(f"  {p:<18} {(by[('dit_step', p)] + by[('vocoder', p)]) / CHUNK_AUDIO_S:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_label(), "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
