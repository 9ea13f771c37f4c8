"""What llama.cpp's CPU weight repack costs and buys: one GGUF opened with ``use_extra_bufts`` on and off.

Each row is a fresh process (``runtime.llm_llamacpp.LlamaModel``, ``repack=True|False``: what ``--fast-start``
switches) that reports the load time, RSS after opening (file pages + private memory), a 64-token prefill and the
decode rate over single-token steps; rows alternate on / off within each round, so both see the same machine.

    python bench/llm_repack.py GGUF [--rounds 2] [--steps 24] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

_CHILD = r"""
import json, sys, time
import numpy as np
from pathlib import Path
from kimia_edge.runtime.llm_llamacpp import LlamaModel
from kimia_edge.runtime.metrics import proc_status

path, repack, steps, threads = sys.argv[1], sys.argv[2] == "on", int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
m = LlamaModel(Path(path), n_ctx=512, n_batch=64, n_threads=threads, n_gpu_layers=0, exact=False, repack=repack)
load = time.perf_counter() - t0
opened = proc_status()
x = np.random.default_rng(0).standard_normal((64, m.n_embd)).astype(np.float32)
t0 = time.perf_counter()
m.decode(x, 0, want_logits=False)
prefill = time.perf_counter() - t0
t0 = time.perf_counter()
for i in range(steps):
    m.decode(x[i:i + 1], 64 + i, want_logits=True)
rate = steps / (time.perf_counter() - t0)
m.close()
print(json.dumps({"repack": repack, "load_s": load, "prefill64_s": prefill, "steps_per_s": rate,
                  "rss_file_mib": opened["RssFile"] >> 20, "rss_anon_mib": opened["RssAnon"] >> 20}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())
    print(f"{cpu}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"load average {open('/proc/loadavg').read().split()[:3]}")
    print("| round | repack | load s | RssFile MiB | RssAnon MiB | prefill 64 s | steps/s |\n|---|---|---|---|---|---|---|")
    for r in range(args.rounds):
        for mode in ("on", "off"):
            out = subprocess.run([sys.executable, "-c", _CHILD, args.gguf, mode, str(args.steps), str(args.threads)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"row {mode} failed:\n{out.stderr[-2000:]}")
            d = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {r} | {mode} | {d['load_s']:.2f} | {d['rss_file_mib']} | {d['rss_anon_mib']} | "
                  f"{d['prefill64_s']:.2f} | {d['steps_per_s']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
