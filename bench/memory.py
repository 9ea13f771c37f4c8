"""Memory of one turn against the bytes of the artifacts it opened, per mode and clip length.

Each row is a fresh Python process that builds its options with the CLI's own parser (``kimia-edge chat --bundle
DIR [flags]``: ``runtime/cli.options_from_args``), opens the bundle as ``chat`` does and runs one turn on a clip of
the given length (speech clips of ``--audio`` concatenated and cut). It reports:

- ``base``: RSS after the imports, before the bundle opens (Python, numpy, ONNX Runtime, llama.cpp);
- ``open``: RSS once the pipeline is ready, split into ``RssFile`` (resident pages of mapped files: the weights
  used in place) and ``RssAnon`` (private memory: copies of weights, buffers, activations);
- ``peak``: the process's peak RSS over open + turn (``VmHWM`` of /proc/self/status, and ``ru_maxrss``), and the
  peaks of ``RssAnon`` / ``RssFile`` sampled every 10 ms;
- ``after turn``: RSS once the turn is over (what the process holds between turns), file + anon;
- ``opened``: the bytes of the artifacts the options open (from the manifest: ``pipeline.choose_artifacts``) and
  ``peak / opened`` (the target at full size is <= 1.15: memory maps, no copies of weights).

Modes: ``default`` (``chat``), ``fast-start`` (``--fast-start``: no ONNX Runtime weight prepacking),
``low-memory`` (``--low-memory``), ``low-memory+fast-start``, ``text-only`` (what ``transcribe`` opens; the asr
task). Rows are interleaved (clip, mode) within a round.

``--malloc-trim off`` (or ``both``: each row with and without, interleaved) replaces the runtime's
``heap.trim_heap`` — glibc's ``malloc_trim(0)`` after low-memory mode releases its sessions — by a no-op in the
row's process: the A/B of handing the freed heap back. Rows record how many trims ran and their time.

    python bench/memory.py --bundle DIR [--bundle DIR2] [--clips 5 30 90] [--modes default fast-start ...]
        [--max-steps 60] [--repeats 1] [--malloc-trim on|off|both] [--json out.json] [--png memory.png]
    python bench/memory.py --bundle DIR --session-layouts DIR/whisper_encoder.fp32.onnx DIR/dit_step.fp32.onnx

The second form measures where ONNX Runtime copies weights: one session per fresh process, the graph's weights
inside the .onnx (ORT parses them onto the heap) vs in an external-data file (ORT maps it), prepacked or not.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Dict, List, Sequence

MODES: Dict[str, List[str]] = {
    "default": [],
    "fast-start": ["--fast-start"],
    "low-memory": ["--low-memory"],
    "low-memory+fast-start": ["--low-memory", "--fast-start"],
    "text-only": [],  # opened as transcribe opens it
}
DEFAULT_AUDIO = Path(__file__).resolve().parents[2] / "shared" / "audio"
MIB = 2**20


def make_clip(audio_dir: Path, seconds: float, out: Path) -> Path:
    """A 16 kHz mono wav of ``seconds``: the speech files of ``audio_dir`` (sorted) concatenated, repeated, cut."""
    import numpy as np
    import soundfile as sf

    from kimia_edge.runtime.frontend import SAMPLE_RATE_HZ, load_audio, to_16k_mono

    sources = [to_16k_mono(*load_audio(p)) for p in sorted(audio_dir.iterdir()) if p.suffix in (".wav", ".flac")]
    if not sources:
        raise SystemExit(f"--audio {audio_dir}: no .wav or .flac files")
    need = int(round(seconds * SAMPLE_RATE_HZ))
    joined = np.concatenate(sources * (need // sum(len(s) for s in sources) + 1))[:need]
    sf.write(str(out), joined, SAMPLE_RATE_HZ, subtype="FLOAT")
    return out


class _PeakSampler(threading.Thread):
    """Peaks of RssAnon and RssFile, sampled every ``period_s``."""

    def __init__(self, period_s: float = 0.01) -> None:
        super().__init__(daemon=True, name="memory-sampler")
        self.period_s, self.peaks, self._done = period_s, {"RssAnon": 0, "RssFile": 0}, threading.Event()

    def run(self) -> None:
        from kimia_edge.runtime.metrics import proc_status

        while not self._done.is_set():
            status = proc_status()
            for key in self.peaks:
                self.peaks[key] = max(self.peaks[key], status.get(key, 0))
            time.sleep(self.period_s)

    def stop(self) -> Dict[str, int]:
        self._done.set()
        self.join()
        return self.peaks


def _count_trims(enabled: bool) -> Dict[str, float]:
    """Wraps ``heap.trim_heap`` (what low-memory mode calls after a release) to count its calls and time; with
    ``enabled`` False the wrapper trims nothing (the A/B's "off" side). Returns the live counters."""
    from kimia_edge.runtime import heap

    counters = {"calls": 0, "released": 0, "seconds": 0.0}
    original = heap.trim_heap

    def counted() -> bool:
        start = time.perf_counter()
        released = original() if enabled else False
        counters["calls"] += 1
        counters["released"] += int(released)
        counters["seconds"] += time.perf_counter() - start
        return released

    heap.trim_heap = counted  # type: ignore[assignment]
    return counters


def child(bundle: Path, mode: str, clip: Path, max_steps: int, extra: Sequence[str],
          malloc_trim: bool = True) -> Dict[str, object]:
    """One row, in this (fresh) process; ``malloc_trim`` False: the runtime's heap trim is a no-op here."""
    from kimia_edge.runtime.metrics import proc_status

    base = proc_status()
    sampler = _PeakSampler()
    sampler.start()
    from kimia_edge.runtime.bundle import read_manifest
    from kimia_edge.runtime.cli import options_from_args, register
    from kimia_edge.runtime.frontend import load_audio
    from kimia_edge.runtime.pipeline import Pipeline, choose_artifacts
    from kimia_edge.runtime.tasks import generation_config

    text_only = mode == "text-only"
    argv = ["chat", "--bundle", str(bundle), "--input", str(clip), "--output", os.devnull, *MODES[mode], *extra]
    parser = argparse.ArgumentParser(prog="kimia-edge")
    register(parser.add_subparsers())  # the run-time verbs as kimia-edge has them, without the torch-side ones
    options = options_from_args(parser.parse_args(argv), text_only=text_only)
    imported = proc_status()
    trims = _count_trims(malloc_trim)
    t0 = time.perf_counter()
    pipe = Pipeline.from_bundle(bundle, options)
    opened_s = time.perf_counter() - t0
    after_open = proc_status()
    samples, rate = load_audio(clip)
    task = "asr" if text_only else "chat"
    t0 = time.perf_counter()
    result = pipe.run(samples, rate, task, config=generation_config(task, 0, step_limit=max_steps), seed=0)
    turn_s = time.perf_counter() - t0
    end = proc_status()
    peaks = sampler.stop()
    opened = sum(a.bytes for a in choose_artifacts(read_manifest(bundle), options).values())
    return {
        "bundle": str(bundle), "mode": mode, "clip_s": len(samples) / rate, "opened_bytes": opened,
        "base_rss": base["VmRSS"], "imported_rss": imported["VmRSS"],
        "open_rss": after_open["VmRSS"], "open_anon": after_open["RssAnon"], "open_file": after_open["RssFile"],
        "end_rss": end["VmRSS"], "end_anon": end["RssAnon"], "end_file": end["RssFile"], "peak_hwm": end["VmHWM"],
        "peak_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_anon": peaks["RssAnon"], "peak_file": peaks["RssFile"],
        "open_s": opened_s, "turn_s": turn_s, "llm_steps": result.metrics.llm_steps,
        "output_audio_s": result.metrics.output_audio_s, "torch_imported": "torch" in sys.modules,
        "malloc_trim": malloc_trim, "trim_calls": trims["calls"], "trim_released": trims["released"],
        "trim_s": trims["seconds"],
    }


def session_child(graph: Path, prepack: bool) -> Dict[str, object]:
    """Memory that opening one ONNX Runtime session of ``graph`` adds, as ``sessions.open_session`` opens it."""
    import onnxruntime as ort

    from kimia_edge.export.fileio import graph_files
    from kimia_edge.runtime.metrics import proc_status

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    before = proc_status()
    session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    after = proc_status()
    del session
    return {"graph": graph.name, "prepack": prepack, "file_bytes": sum(f.stat().st_size for f in graph_files(graph)),
            **{k: after[k] - before[k] for k in ("RssAnon", "RssFile")}, "peak": after["VmHWM"] - before["VmRSS"]}


def session_layouts(graphs: Sequence[Path], work: Path) -> str:
    """Markdown: per graph, weights inside the .onnx vs in an external-data file (a copy written here with onnx),
    each opened with and without prepacking in a fresh process; MiB added to RSS by the open session."""
    import onnx

    lines = ["| graph | weights | prepack | file MiB | + RssAnon MiB | + RssFile MiB | + peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for graph in graphs:
        external = work / f"{graph.stem}.external.onnx"
        onnx.save(onnx.load(str(graph)), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=external.name + ".data", size_threshold=1024)
        for layout, path in (("inside the .onnx", graph), ("external data", external)):
            for prepack in (True, False):
                cmd = [sys.executable, __file__, "--session-child", json.dumps([str(path), prepack])]
                r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
                lines.append(f"| {graph.name} | {layout} | {'on' if prepack else 'off (--fast-start)'} | "
                             f"{r['file_bytes'] / MIB:.0f} | {r['RssAnon'] / MIB:.0f} | {r['RssFile'] / MIB:.0f} | "
                             f"{r['peak'] / MIB:.0f} |")
    return "\n".join(lines)


def run_row(bundle: Path, mode: str, clip: Path, max_steps: int, extra: Sequence[str], cache: Path,
            malloc_trim: bool = True) -> Dict:
    """``child`` in a fresh process (stamps in ``cache``, so no row pays a hash)."""
    env = dict(os.environ, KIMIA_EDGE_CACHE=str(cache))
    cmd = [sys.executable, __file__, "--child",
           json.dumps([str(bundle), mode, str(clip), max_steps, list(extra), malloc_trim])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"row {mode} / {clip.name} on {bundle} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mode_label(row: Dict) -> str:
    """The row's mode, with ``no malloc_trim`` when the A/B turned the runtime's heap trim off."""
    return row["mode"] + ("" if row.get("malloc_trim", True) else ", no malloc_trim")


def table(rows: Sequence[Dict]) -> str:
    """Markdown: one line per (bundle, clip, mode); MiB; ratio = peak (VmHWM) / bytes opened. *after turn*: RSS
    once the turn is over (what is held between turns); trims: calls of the heap trim and their time."""
    head = ("| bundle | clip | mode | opened | base | after open (file + anon) | after turn (file + anon) | peak VmHWM "
            "| peak anon | peak file | peak / opened | (peak - base) / opened | LLM steps | trims (ms) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        m = {k: r[k] / MIB for k in r if isinstance(r[k], int) and not isinstance(r[k], bool)
             and k not in ("llm_steps", "trim_calls", "trim_released")}
        after = (f"{m['end_rss']:.0f} ({m['end_file']:.0f} + {m['end_anon']:.0f})" if "end_anon" in m
                 else f"{m['end_rss']:.0f}")
        trims = f"{r['trim_calls']} ({1e3 * r['trim_s']:.0f})" if "trim_calls" in r else "-"
        lines.append(
            f"| {Path(r['bundle']).name} | {r['clip_s']:.0f} s | {mode_label(r)} | {m['opened_bytes']:.0f} | "
            f"{m['base_rss']:.0f} | {m['open_rss']:.0f} ({m['open_file']:.0f} + {m['open_anon']:.0f}) | {after} | "
            f"{m['peak_hwm']:.0f} | {m['peak_anon']:.0f} | {m['peak_file']:.0f} | "
            f"{r['peak_hwm'] / r['opened_bytes']:.2f} | {(r['peak_hwm'] - r['base_rss']) / r['opened_bytes']:.2f} | "
            f"{r['llm_steps']} | {trims} |")
    return "\n".join(lines)


def plot(rows: Sequence[Dict], title: str, path: Path) -> None:
    """Peak RSS per mode, grouped by clip length, one panel per bundle; the artifact bytes opened as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bundles = list(dict.fromkeys(r["bundle"] for r in rows))
    modes = list(dict.fromkeys(mode_label(r) for r in rows))
    clips = sorted({round(r["clip_s"]) for r in rows})
    fig, axes = plt.subplots(1, len(bundles), figsize=(6.5 * len(bundles), 4.5), squeeze=False)
    width = 0.8 / len(modes)
    for ax, bundle in zip(axes[0], bundles):
        for i, mode in enumerate(modes):
            for j, clip in enumerate(clips):
                got = [r for r in rows if r["bundle"] == bundle and mode_label(r) == mode and round(r["clip_s"]) == clip]
                if not got:
                    continue
                r = got[0]
                x = j + (i - (len(modes) - 1) / 2) * width
                ax.bar(x, r["peak_hwm"] / MIB, width, color=f"C{i}", label=mode if j == 0 else None)
                ax.plot([x - width / 2, x + width / 2], [r["opened_bytes"] / MIB] * 2, color="k", lw=1.5,
                        label="artifact bytes opened" if i == 0 and j == 0 else None)
                ax.plot([x - width / 2, x + width / 2], [r["base_rss"] / MIB] * 2, color="grey", lw=1, ls=":",
                        label="RSS before opening" if i == 0 and j == 0 else None)
        ax.set_xticks(range(len(clips)), [f"{c} s clip" for c in clips])
        ax.set_ylabel("peak RSS (MiB)")
        ax.set_title(Path(bundle).name)
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(max_steps: int) -> str:
    from kimia_edge.runtime.metrics import machine_label

    return (f"{machine_label()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"load average {' '.join(open('/proc/loadavg').read().split()[:3])}; {max_steps} LLM steps per turn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, action="append", help="repeat for several bundles")
    parser.add_argument("--clips", type=float, nargs="+", default=[5, 30, 90],
                        help="clip lengths in seconds (chat: under 115 s, the official 1500-position budget of a "
                             "speech turn, prompt included; asr takes longer clips)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--audio", type=Path, default=DEFAULT_AUDIO, help="speech files to build the clips from")
    parser.add_argument("--max-steps", type=int, default=60, help="LLM steps per turn")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--malloc-trim", choices=("on", "off", "both"), default="on",
                        help="the runtime's malloc_trim after a low-memory release: as shipped (on), replaced by a "
                             "no-op in the row's process (off), or each row both ways, interleaved (both)")
    parser.add_argument("--extra", default="", help="more chat flags for every row, e.g. '--llm-precision Q4_K_M'")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--session-layouts", type=Path, nargs="+", metavar="GRAPH",
                        help="instead of the rows: what one session of each .onnx costs with its weights inside the "
                             "file vs in external data, prepacked or not (needs onnx, the build extra)")
    parser.add_argument("--replot", type=Path, nargs="+", metavar="JSON",
                        help="no measuring: the table and --png of earlier --json files, merged")
    args = parser.parse_args()
    if args.replot:
        runs = [json.loads(p.read_text()) for p in args.replot]
        rows = [r for run in runs for r in run["rows"]]
        print("\n".join(run["machine"] for run in runs))
        print(table(rows))
        if args.png:
            plot(rows, " | ".join(run["machine"] for run in runs), args.png)
        return
    if not args.bundle:
        parser.error("--bundle is required (unless --replot)")
    if args.session_layouts:
        print(session_layouts(args.session_layouts, Path(tempfile.mkdtemp(prefix="memory-layouts-"))))
        return

    from tqdm import tqdm

    work = Path(tempfile.mkdtemp(prefix="memory-bench-"))
    clips = [make_clip(args.audio, s, work / f"clip-{s:g}s.wav") for s in args.clips]
    extra = ["--threads", str(args.threads), *args.extra.split()]
    for bundle in args.bundle:  # writes the verification stamps: no row pays a full hash
        run_row(bundle, "text-only", clips[0], 1, extra, work / "cache")
    trims = {"on": [True], "off": [False], "both": [True, False]}[args.malloc_trim]
    cells = [(b, c, m, t) for b in args.bundle for c in clips for m in args.modes for t in trims]
    rows: Dict[tuple, Dict] = {}
    with tqdm(total=len(cells) * args.repeats, desc="memory", unit="row") as bar:
        for _ in range(args.repeats):
            for bundle, clip, mode, trim in cells:
                row = run_row(bundle, mode, clip, args.max_steps, extra, work / "cache", trim)
                key = (str(bundle), str(clip), mode, trim)
                if key not in rows or row["peak_hwm"] > rows[key]["peak_hwm"]:  # the worst round: a peak is a bound
                    rows[key] = row
                bar.update()
                if args.json:  # after every row: an interrupted run keeps what it measured
                    args.json.write_text(json.dumps({"machine": _label(args.max_steps), "rows": list(rows.values())},
                                                    indent=2))
    label = _label(args.max_steps)
    print(label)
    print(table(list(rows.values())))
    if args.png:
        plot(list(rows.values()), label, args.png)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--session-child":
        print(json.dumps(session_child(*(lambda g, p: (Path(g), p))(*json.loads(sys.argv[2])))))
    elif len(sys.argv) > 2 and sys.argv[1] == "--child":
        b, m, c, steps, more, trim = json.loads(sys.argv[2])
        print(json.dumps(child(Path(b), m, Path(c), steps, more, trim)))
    else:
        main()
