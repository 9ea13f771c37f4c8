"""Fault injection for ``kimia-edge export``: SIGKILL at random moments, then check what is left.

Until ``--kills`` kills have landed on a running export: start ``export --overwrite`` into one destination,
SIGKILL it after a random delay drawn uniformly over the length of a whole export (re-measured on every re-run, so
a machine whose load changes still gets its kills inside the export: imports, graph export, GGUF writing,
quantization, the manifest, the final renames), then:

- the destination is either absent or a bundle that verifies completely (every listed file present with its size
  and sha256) — never a partial bundle, least of all one that verifies;
- a re-run of the same command succeeds, its bundle verifies, and no ``.<name>.partial-*`` folder is left beside it
  (the re-run removes the killed run's staging folder).

Even trials start with no destination (the re-run's bundle is removed first), odd ones replace the previous
re-run's bundle (``--overwrite``), so a kill inside the replacement is tried too. Prints a table and a JSON
summary.

    python bench/export_kill.py --snapshot SNAP [--kills 20] [--graphs adaptor] [--work DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List


def export_cmd(snapshot: Path, out: Path, graphs: List[str]) -> List[str]:
    return [sys.executable, "-m", "kimia_edge.cli", "export", "--snapshot", str(snapshot), "--out", str(out),
            "--precision", "fp32", "--graphs", *graphs, "--llm-quants", "Q8_0", "--overwrite"]


def state_of(out: Path) -> str:
    """'absent', 'complete' (verifies) or 'BROKEN: <problems>'."""
    from kimia_edge.runtime.bundle import verify_bundle
    from kimia_edge.runtime.spec.manifest import BundleError

    if not out.exists():
        return "absent"
    try:
        problems = verify_bundle(out, cache_dir=out.parent / ".stamps")
    except BundleError as e:
        return f"BROKEN: {e}"
    return "complete" if not problems else "BROKEN: " + "; ".join(problems)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshot", type=Path, required=True)
    ap.add_argument("--kills", type=int, default=20, help="kills that land while the export runs")
    ap.add_argument("--graphs", nargs="+", default=["adaptor"], help="graphs exported (fewer = shorter trials)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="folder for the destination (default: a temporary one, removed)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="export-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    out = work / "bundle"
    cmd = export_cmd(args.snapshot, out, args.graphs)
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    start = time.monotonic()
    subprocess.run(cmd, check=True, **quiet)
    whole_s = time.monotonic() - start
    assert state_of(out) == "complete"
    shutil.rmtree(out)  # the first trial starts with no destination
    print(f"a whole export takes {whole_s:.1f} s; killing at uniform random moments within one export's length")

    rng = random.Random(args.seed)
    rows: List[Dict] = []
    durations = [whole_s]
    i = 0
    while sum(not r["finished_before_kill"] for r in rows) < args.kills and i < 3 * args.kills:
        whole_s = sorted(durations[-5:])[len(durations[-5:]) // 2]  # median of the last re-runs
        delay = rng.uniform(0.0, whole_s)
        if i % 2 == 0 and out.exists():
            shutil.rmtree(out)
        had_bundle = out.exists()
        proc = subprocess.Popen(cmd, **quiet)
        time.sleep(delay)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        after_kill = state_of(out)
        partials = sorted(p.name for p in work.glob(".bundle.partial-*"))
        rerun_start = time.monotonic()
        rerun = subprocess.run(cmd, **quiet).returncode
        durations.append(time.monotonic() - rerun_start)
        after_rerun = state_of(out)
        left = sorted(p.name for p in work.glob(".bundle.*"))
        ok = (not after_kill.startswith("BROKEN")) and rerun == 0 and after_rerun == "complete" and not left
        rows.append({"trial": i, "delay_s": round(delay, 2), "replacing": had_bundle, "finished_before_kill": finished,
                     "after_kill": after_kill, "partials_after_kill": len(partials), "rerun_exit": rerun,
                     "after_rerun": after_rerun, "left_beside_after_rerun": left, "ok": ok})
        print(f"{i:3d} kill at {delay:6.2f} s  {'replacing' if had_bundle else 'new      '}  "
              f"after kill: {after_kill:<9} partial folders: {len(partials)}  re-run: exit {rerun}, {after_rerun}, "
              f"left beside: {left or 'nothing'}  {'ok' if ok else 'FAIL'}"
              f"{'  (had finished before the kill)' if finished else ''}", flush=True)
        i += 1
    summary = {"whole_export_s": [round(min(durations), 1), round(max(durations), 1)], "trials": len(rows),
               "kills_while_running": sum(not r["finished_before_kill"] for r in rows), "ok": sum(r["ok"] for r in rows),
               "absent_after_kill": sum(r["after_kill"] == "absent" for r in rows),
               "complete_after_kill": sum(r["after_kill"] == "complete" for r in rows),
               "broken_after_kill": sum(r["after_kill"].startswith("BROKEN") for r in rows),
               "partial_folders_left_by_kills": sum(r["partials_after_kill"] for r in rows),
               "graphs": args.graphs}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "trials": rows}, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["ok"] == len(rows) and summary["kills_while_running"] >= args.kills else 1


if __name__ == "__main__":
    raise SystemExit(main())
