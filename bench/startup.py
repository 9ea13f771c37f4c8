"""Start-up: time from a fresh process to a pipeline ready to take speech (what `kimia-edge chat --bundle` does
before it reads the input), on one bundle, side by side in one run:

- ``full hash``: every artifact that opens is hashed (no verification stamp: the first start on a machine, or what
  every start cost before stamps);
- ``stamped``: the stamp of the last hash matches size and modification time, nothing is hashed;
- ``stamped, fast start``: stamped, and ONNX Runtime opens the graphs without repacking their weights
  (``PipelineOptions(prepack=False)``, ``--fast-start``);
- each with the page cache as it is (``warm``) and, with ``--drop-caches`` (root), after dropping it (``cold``).

Each row is a new Python process: ``import`` time, manifest and stamp checks, ONNX Runtime sessions and llama.cpp's
memory map are all in it. Medians over ``--repeats`` rounds, rows interleaved within a round.

    python bench/startup.py --bundle BUNDLE [--precision fp32] [--repeats 3] [--drop-caches] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from kimia_edge.runtime.metrics import machine_label

_CHILD = """
import sys, time
t0 = time.perf_counter()
from kimia_edge.runtime.pipeline import Pipeline, PipelineOptions
t_import = time.perf_counter()
Pipeline.from_bundle(sys.argv[1], PipelineOptions(precision=sys.argv[2], cache_dir=sys.argv[3],
                                                  prepack=sys.argv[4] == "1"))
print(t_import - t0, time.perf_counter() - t_import)
"""


def _drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def start_once(bundle: Path, precision: str, cache_dir: Path, prepack: bool = True) -> Dict[str, float]:
    """One fresh process opening ``bundle``; seconds for imports, for opening, and wall time overall."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(bundle), precision, str(cache_dir), str(int(prepack))],
                         capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    imports, opening = map(float, out.stdout.split())
    return {"imports_s": imports, "open_s": opening, "process_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--drop-caches", action="store_true", help="also measure with the page cache dropped (root)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    stamped_cache = Path(tempfile.mkdtemp(prefix="startup-stamped-"))
    start_once(args.bundle, args.precision, stamped_cache)  # writes the stamp
    cache_states = ["warm"] + (["cold"] if args.drop_caches else [])
    rows: Dict[str, List[Dict[str, float]]] = {}
    for _ in range(args.repeats):
        for verification in ("full hash", "stamped", "stamped, fast start"):
            for cache in cache_states:
                if cache == "cold":
                    _drop_page_cache()
                hashed = verification == "full hash"
                stamp_dir = Path(tempfile.mkdtemp(prefix="startup-")) if hashed else stamped_cache
                rows.setdefault(f"{verification}, {cache} page cache", []).append(
                    start_once(args.bundle, args.precision, stamp_dir, prepack="fast" not in verification))
                if hashed:
                    shutil.rmtree(stamp_dir)
    shutil.rmtree(stamped_cache)

    opened = sum(f.stat().st_size for f in args.bundle.rglob("*") if f.is_file())
    print(f"start-up to ready, {args.bundle} ({opened / 2**30:.1f} GiB in the folder), precision {args.precision}")
    print(f"machine: {machine_label()}; medians of {args.repeats} fresh processes per row")
    print(f"{'row':<44} {'imports s':>10} {'open s':>10} {'process s':>10}")
    summary = {}
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        summary[name] = med
        print(f"{name:<44} {med['imports_s']:>10.2f} {med['open_s']:>10.2f} {med['process_s']:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_label(), "bundle": str(args.bundle), "rows": summary}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("KIMIA_EDGE_THREADS", "2")
    main()
