"""Two or more DiT-step ONNX graphs side by side on the same steady-state input (T = 168 frames against a full
900-frame prefix), ONNX Runtime CPU only (no torch column: under load from other processes torch's threads starve far
more than ORT's, which bench/onnx_vs_torch.py's torch ratio then shows). One round = one evaluation of every graph in
turn; many short rounds, so that the minimum (the least disturbed evaluation) is reported beside the median.

    python bench/dit_graph_ab.py --snapshot SNAP LABEL=GRAPH.onnx LABEL=GRAPH.onnx ... [--threads 2] [--rounds 40]

``--one-session-at-a-time`` (full-size fp32 graphs, whose prepacked sessions do not fit in memory together): each
round opens one graph's session, warms it up, times ``--evals-per-open`` evaluations and closes it before the next
graph's; the torch module that made the input is freed before any session opens.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path
from typing import List

import numpy as np
from tqdm import tqdm

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
    parser.add_argument("--one-session-at-a-time", action="store_true",
                        help="open / time / close one graph's session per round (graphs too big to hold together)")
    parser.add_argument("--evals-per-open", type=int, default=3, help="with --one-session-at-a-time")
    args = parser.parse_args()
    spec = graph_spec("dit_step")
    module = spec.build(args.snapshot)
    feeds = {n: t.numpy() for n, t in zip(spec.input_names, bench_inputs(spec, module))}
    del module
    gc.collect()  # a full-size module is as big as an fp32 session: free it before any session opens
    paths = dict(g.split("=", 1) for g in args.graphs)
    base = next(iter(paths))

    def open_session(label: str):
        return open_bench_session(Path(paths[label]), args.threads, "all", not args.ort_no_spin)

    times = {label: [] for label in paths}
    first = None

    def warm_up(label: str, session) -> None:  # and every graph's output against the first one's
        nonlocal first
        out = session.run(feeds)
        if first is None:
            first = out
        print(f"{label}: max |Δ velocity| vs {base}: {np.abs(out[0] - first[0]).max():.2e}", flush=True)

    def timed(session, n: int) -> List[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            session.run(feeds)
            out.append(time.perf_counter() - t0)
        return out

    if args.one_session_at_a_time:
        for r in tqdm(range(args.rounds), desc="rounds"):
            for label in paths:
                session = open_session(label)
                warm_up(label, session) if r == 0 else session.run(feeds)
                times[label] += timed(session, args.evals_per_open)
                del session
                gc.collect()
        how = f"{args.rounds} rounds, each opening every graph's session in turn for {args.evals_per_open} evaluations"
    else:
        sessions = {label: open_session(label) for label in paths}
        for label, s in sessions.items():
            warm_up(label, s)
        for _ in range(args.rounds):
            for label, s in sessions.items():
                times[label] += timed(s, 1)
        how = f"{args.rounds} interleaved rounds of one evaluation each"
    print(f"\nmachine: {machine_label()}; {args.threads} threads, spinning {'off' if args.ort_no_spin else 'on'}; "
          f"{how}; load average at the end {os.getloadavg()[0]:.2f}")
    print(f"| graph | ms per evaluation, min | median | chunk ({DIT_EVALS_PER_CHUNK} evals) from median, s | "
          f"{base} / this (min) | (median) |\n|---|---:|---:|---:|---:|---:|")
    for label, t in times.items():
        print(f"| {label} | {1000 * min(t):.1f} | {1000 * statistics.median(t):.1f} | "
              f"{DIT_EVALS_PER_CHUNK * statistics.median(t):.2f} | {min(times[base]) / min(t):.2f}x | "
              f"{statistics.median(times[base]) / statistics.median(t):.2f}x |")


if __name__ == "__main__":
    main()
