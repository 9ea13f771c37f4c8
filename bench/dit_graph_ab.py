"""Two or more DiT-step ONNX graphs side by side on the same steady-state input (T = 168 frames against a full
900-frame prefix), ONNX Runtime CPU only (no torch column: under load from other processes torch's threads starve far
more than ORT's, which bench/onnx_vs_torch.py's torch ratio then shows). One round = one evaluation of every graph in
turn; many short rounds, so that the minimum (the least disturbed evaluation) is reported beside the median.

    python bench/dit_graph_ab.py --snapshot SNAP LABEL=GRAPH.onnx LABEL=GRAPH.onnx ... [--threads 2] [--rounds 40]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from kimia_edge.runtime.metrics import machine_label


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from onnx_vs_torch import DIT_EVALS_PER_CHUNK, bench_inputs, open_bench_session

    from kimia_edge.export.graphs import graph_spec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("graphs", nargs="+", metavar="LABEL=PATH")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--ort-no-spin", action="store_true")
    args = parser.parse_args()
    spec = graph_spec("dit_step")
    module = spec.build(args.snapshot)
    feeds = {n: t.numpy() for n, t in zip(spec.input_names, bench_inputs(spec, module))}
    sessions = {label: open_bench_session(Path(p), args.threads, "all", not args.ort_no_spin)
                for label, p in (g.split("=", 1) for g in args.graphs)}
    first = None
    for label, s in sessions.items():  # warm-up, and every graph's output against the first one's
        out = s.run(feeds)
        first = first or out
        print(f"{label}: max |Δ velocity| vs {next(iter(sessions))}: {np.abs(out[0] - first[0]).max():.2e}")
    times = {label: [] for label in sessions}
    for _ in range(args.rounds):
        for label, s in sessions.items():
            t0 = time.perf_counter()
            s.run(feeds)
            times[label].append(time.perf_counter() - t0)
    base = next(iter(sessions))
    print(f"\nmachine: {machine_label()}; {args.threads} threads, spinning {'off' if args.ort_no_spin else 'on'}; "
          f"{args.rounds} interleaved rounds of one evaluation each; load average at the end {os.getloadavg()[0]:.2f}")
    print(f"| graph | ms per evaluation, min | median | chunk ({DIT_EVALS_PER_CHUNK} evals) from median, s | "
          f"{base} / this (min) | (median) |\n|---|---:|---:|---:|---:|---:|")
    for label, t in times.items():
        print(f"| {label} | {1000 * min(t):.1f} | {1000 * statistics.median(t):.1f} | "
              f"{DIT_EVALS_PER_CHUNK * statistics.median(t):.2f} | {min(times[base]) / min(t):.2f}x | "
              f"{statistics.median(times[base]) / statistics.median(t):.2f}x |")


if __name__ == "__main__":
    main()
