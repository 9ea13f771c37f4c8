"""ONNX Runtime vs the PyTorch reference, per component and precision, on the same input and thread count, in one run.

For each component: eager torch fp32 latency, then each ONNX variant's latency, the ratio, and its error against
torch on that input. The DiT is timed as a streaming chunk at steady state (T = 168 frames against a full
900-frame prefix, 29 Euler evaluations + the priming pass = 30 evaluations) and the vocoder on one chunk (156
frames); their sum per 2.4 s of speech is the real-time factor of synthesis. Timings are interleaved (one round
= every path once, in turn; the median over rounds is reported) so that load from other processes hits every
path alike.

Components come from the graph REGISTRY (export/graphs/__init__.py): every GraphSpec there can be benchmarked; the
encoders (whisper_encoder, vq_encoder, adaptor) are timed at their first parity length, one call. To time another
component at a particular geometry, add a case to ``bench_inputs``.

    python bench/onnx_vs_torch.py --snapshot /work/snaps/small [--components dit_step vocoder] \\
        [--precisions fp32 fp16 int8_dynamic int8_qdq] [--calibration-audio DIR] [--threads 2] [--repeats 3] \\
        [--dit-evals 30] [--onnx-dir DIR] [--ort-opt-level all] [--json out.json] \\
        [--extra-onnx LABEL=PATH ...]   # other graphs of the one component, timed in the same rounds (old vs new)

Targets (from the issue; reported, not asserted): fp32 ONNX >= 1.5x eager torch fp32 for a DiT chunk and a vocoder
chunk; int8 >= 2x.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from kimia_edge.export.exporter import audio_files
from kimia_edge.export.graphs import REGISTRY, graph_spec
from kimia_edge.export.graphs.base import CalibrationContext, GraphSpec, compare, export_graph, run_torch
from kimia_edge.quantization.variants import make_variant
from kimia_edge.runtime.spec.precisions import PRECISION_NAMES as PRECISIONS
from kimia_edge.runtime.spec.streaming import StreamingConfig
from kimia_edge.runtime.frontend import load_audio, to_16k_mono
from kimia_edge.runtime.metrics import machine_label
from kimia_edge.runtime.sessions import CPU_EP, Session

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPEECH = REPO.parent / "shared" / "audio"  # real speech for int8_qdq calibration, when present
TOKEN_RATE_HZ = 12.5
CHUNK_AUDIO_S = StreamingConfig().chunk_tokens / TOKEN_RATE_HZ  # 2.4 s of speech per steady-state chunk
DIT_EVALS_PER_CHUNK = StreamingConfig().ode_time_points  # 29 Euler steps + 1 priming pass
STEADY_CHUNK_FRAMES = (StreamingConfig().chunk_tokens * StreamingConfig().upsample_factor
                       + StreamingConfig().look_ahead_frames)  # 168
# Vocoder frames of a steady-state chunk: 36 held back + 120 new (official s75 chunk 1, MANIFEST.md §2b).
VOCODER_CHUNK_FRAMES = 156
ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")
TARGETS = {"fp32": 1.5, "int8_dynamic": 2.0, "int8_qdq": 2.0}


def bench_inputs(spec: GraphSpec, module: torch.nn.Module) -> List[torch.Tensor]:
    """The input timed: a steady-state streaming chunk for the DiT, one chunk for the vocoder, else the export example."""
    if spec.name == "dit_step":
        cfg, window = module.cfg, StreamingConfig().max_kv_cache_frames
        x, t, tok, pos, _, _, _ = spec.example_inputs(module, STEADY_CHUNK_FRAMES, seed=0)
        g = torch.Generator().manual_seed(1)
        kv = lambda: torch.randn(cfg.depth, 1, cfg.num_heads, window, cfg.head_dim, generator=g)
        return [x, t, tok, pos + window, kv(), kv(), torch.tensor([window])]
    if spec.name == "vocoder":
        return list(spec.example_inputs(module, VOCODER_CHUNK_FRAMES, seed=0))
    return list(spec.example_inputs(module, spec.parity_lengths[0], seed=0))


def torch_callable(spec: GraphSpec, module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
    """The reference as the golden pipeline runs it. For the DiT: the step without a mask (the whole prefix is valid;
    the export wrapper always builds a boolean mask, which sends torch's SDPA down its slower math path)."""
    if spec.name == "dit_step":
        return lambda: module.reference.step(*inputs[:6])
    return lambda: module(*inputs)


def open_bench_session(path: Path, threads: int, opt_level: str, spinning: bool) -> Session:
    """An ONNX Runtime CPU session with explicit options (the runtime's factory uses ORT's defaults: level 'all',
    spinning on)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    impl = ort.InferenceSession(str(path), sess_options=so, providers=[CPU_EP])
    return Session(path.stem, CPU_EP, impl, tuple(o.name for o in impl.get_outputs()),
                   tuple(i.name for i in impl.get_inputs()))


def interleaved_medians(paths: Sequence[Tuple[str, Callable[[], object]]], repeats: int, calls: int) -> Dict[str, float]:
    """Median seconds of ``calls`` calls per path, over ``repeats`` rounds that each run every path once in turn."""
    for _, fn in paths:
        fn()  # warm-up (allocations, ORT arena, oneDNN primitives)
    times: Dict[str, List[float]] = {name: [] for name, _ in paths}
    for _ in range(repeats):
        for name, fn in paths:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def fp32_graph(spec: GraphSpec, module: torch.nn.Module, tmp: Path, onnx_dir: Optional[Path]) -> Path:
    """``<onnx_dir>/<name>.fp32.onnx``, exported there unless present (a full-size export is made once); without
    ``onnx_dir``, a fresh export in ``tmp``."""
    path = (onnx_dir or tmp) / f"{spec.name}.fp32.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_graph(spec, module, path)
    return path


def bench_component(name: str, args: argparse.Namespace, context: CalibrationContext, tmp: Path
                    ) -> List[Dict[str, object]]:
    spec = graph_spec(name)
    module = spec.build(args.snapshot).eval()
    inputs = bench_inputs(spec, module)
    ref = run_torch(module, inputs)
    fp32 = fp32_graph(spec, module, tmp, args.onnx_dir)
    feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs)}
    paths: List[Tuple[str, Callable[[], object]]] = [("torch fp32", torch_callable(spec, module, inputs))]
    errors = {"torch fp32": None}
    graphs: Dict[str, Path] = {}  # every variant file first: quantizing a 6 GB graph beside open sessions runs out of memory
    for precision in args.precisions:
        kept = args.onnx_dir / f"{name}.{precision}.onnx" if args.onnx_dir else None
        if precision == "fp32" or (kept is not None and kept.exists()):  # e.g. a bundle's variants
            graphs[precision] = fp32 if precision == "fp32" else kept
            continue
        calibration = spec.calibration_feeds(module, context) if precision == "int8_qdq" else None
        if precision == "int8_qdq" and not calibration:
            print(f"{name}: no int8_qdq (no calibration speech or no calibration_feeds)")
            continue
        graphs[precision] = make_variant(precision, fp32, (args.onnx_dir or tmp) / f"{name}.{precision}.onnx",
                                         calibration, spec.int8_dynamic_signed_weights)
        del calibration
    labelled = [(f"onnx {precision}", path) for precision, path in graphs.items()]
    labelled += [(f"onnx {label}", Path(path)) for label, path in (e.split("=", 1) for e in args.extra_onnx)]
    for label, path in labelled:
        session = open_bench_session(path, args.threads, args.ort_opt_level, not args.ort_no_spin)
        errors[label] = compare(spec, session.run(feeds), ref)
        paths.append((label, lambda s=session: s.run(feeds)))
    evals = args.dit_evals if name == "dit_step" else 1
    scale = DIT_EVALS_PER_CHUNK / evals if name == "dit_step" else 1.0  # per-chunk time from `evals` evaluations
    with torch.inference_mode():
        medians = interleaved_medians(paths, args.repeats, evals)
    torch_s = medians["torch fp32"] * scale
    rows = []
    for label, _ in paths:
        err = errors[label]
        rows.append({"component": name, "path": label, "seconds": medians[label] * scale,
                     "speedup": torch_s / (medians[label] * scale),
                     "max_abs": 0.0 if err is None else err.max_abs, "rel_l2": 0.0 if err is None else err.rel_l2})
    return rows


def print_report(rows: List[Dict[str, object]], args: argparse.Namespace) -> None:
    print(f"\nmachine: {machine_label()}; {args.threads} threads (torch and ONNX Runtime); snapshot {args.snapshot}; "
          f"ORT level '{args.ort_opt_level}', spinning {'off' if args.ort_no_spin else 'on'}; median of "
          f"{args.repeats} interleaved rounds; load average at the end {os.getloadavg()[0]:.2f}\n")
    print("| component | path | ms per call (DiT: per chunk) | speed vs torch | target | max abs err | rel L2 err |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        unit = f" (chunk = {DIT_EVALS_PER_CHUNK} evals, T {STEADY_CHUNK_FRAMES}, P 900)" if r["component"] == "dit_step" \
            else (f" ({VOCODER_CHUNK_FRAMES} frames)" if r["component"] == "vocoder" else "")
        precision = str(r["path"]).split()[-1]
        target = TARGETS.get(precision) if r["path"] != "torch fp32" and r["component"] in ("dit_step", "vocoder") else None
        mark = "" if target is None else (f">= {target}x " + ("met" if r["speedup"] >= target else "MISSED"))
        print(f"| {r['component']}{unit} | {r['path']} | {1000 * r['seconds']:.1f} | {r['speedup']:.2f}x | {mark} | "
              f"{r['max_abs']:.2e} | {r['rel_l2']:.2e} |")
    by = {(r["component"], r["path"]): r["seconds"] for r in rows}
    if ("dit_step", "torch fp32") in by and ("vocoder", "torch fp32") in by:
        print(f"\nRTF of synthesis (DiT chunk + vocoder chunk per {CHUNK_AUDIO_S:.1f} s of speech):")
        for p in ["torch fp32"] + [f"onnx {q}" for q in args.precisions]:
            if ("dit_step", p) in by and ("vocoder", p) in by:
                print(f"  {p:<18} {(by[('dit_step', p)] + by[('vocoder', p)]) / CHUNK_AUDIO_S:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshot", type=Path, required=True, help="small or full snapshot folder")
    parser.add_argument("--components", nargs="+", default=list(REGISTRY), choices=list(REGISTRY))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--calibration-audio", nargs="*", type=Path,
                        default=[DEFAULT_SPEECH] if DEFAULT_SPEECH.is_dir() else [], help="speech for int8_qdq")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dit-evals", type=int, default=DIT_EVALS_PER_CHUNK,
                        help=f"DiT evaluations timed per round, scaled to a {DIT_EVALS_PER_CHUNK}-evaluation chunk "
                             "(fewer for the full-size DiT)")
    parser.add_argument("--onnx-dir", type=Path, help="keep / reuse <dir>/<component>.<precision>.onnx (made once)")
    parser.add_argument("--ort-opt-level", choices=ORT_OPT_LEVELS, default="all")
    parser.add_argument("--ort-no-spin", action="store_true", help="ORT intra-op threads sleep instead of spinning")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--extra-onnx", nargs="*", default=[], metavar="LABEL=PATH",
                        help="more graphs of the (single) component, same inputs, timed in the same rounds; the label's "
                             "last word is its precision (e.g. 'per-frame fp32=old/dit_step.fp32.onnx')")
    args = parser.parse_args()
    if args.extra_onnx and (len(args.components) != 1 or any("=" not in e for e in args.extra_onnx)):
        parser.error("--extra-onnx: LABEL=PATH, with exactly one --components")
    if not args.snapshot.is_dir():
        parser.error(f"--snapshot: {args.snapshot} is not a folder")
    if not 1 <= args.dit_evals <= DIT_EVALS_PER_CHUNK:
        parser.error(f"--dit-evals: expected 1..{DIT_EVALS_PER_CHUNK}, got {args.dit_evals}")
    torch.set_num_threads(args.threads)
    speech = [to_16k_mono(*load_audio(p)) for p in audio_files(args.calibration_audio)]
    context = CalibrationContext(args.snapshot, speech)

    rows: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.components:
            rows += bench_component(name, args, context, Path(tmp))
            print(f"{name}: done", flush=True)
    print_report(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_label(), "threads": args.threads, "snapshot": str(args.snapshot),
                                         "ort_opt_level": args.ort_opt_level, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
