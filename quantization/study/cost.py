"""What an end-to-end cell costs: real-time factor per stage at the deployment thread count (the Pipeline's own
RunMetrics, plus the DiT / vocoder split timed around their networks), peak RSS of the cell's child process, bytes on
disk of the artifacts the mix opens; and their report summaries and plots (RTF vs error beside bytes vs error).

RTF = processing seconds / seconds of audio (< 1 is faster than real time): the audio tokenizer over the input clip,
the LLM per 80 ms step (one 12.5 Hz token of speech), the DiT and the vocoder over the output speech.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

__all__ = ["DEPLOYMENT_THREADS", "STAGES", "turn_cost", "cost_summary", "cost_markdown", "plot_rtf"]

DEPLOYMENT_THREADS = os.cpu_count() or 1  # what a device runs with: every core (PipelineOptions.threads)
STAGES = ("encode", "llm", "dit", "vocoder")


def turn_cost(turn: Dict[str, Any], bundle: Path, onnx: str, row: str) -> Dict[str, Any]:
    """The cost of one child turn (end_to_end._child_turn's record) over the mix's bundle."""
    from kimia_edge.runtime.bundle import read_manifest
    from kimia_edge.runtime.frontend import SAMPLE_RATE_HZ, SAMPLES_PER_TOKEN
    from kimia_edge.runtime.pipeline import PipelineOptions, choose_artifacts

    m = turn["run_metrics"]
    out_s = m["output_audio_s"]
    step_s = SAMPLES_PER_TOKEN / SAMPLE_RATE_HZ  # speech per LLM step
    opened = choose_artifacts(read_manifest(bundle), PipelineOptions(precision=onnx, llm_precision=row))
    rtf = {"encode": m["encode_rtf"],
           "llm": (1.0 / m["llm_steps_per_s"]) / step_s if m["llm_steps_per_s"] else None,
           "dit": turn["seconds"].get("dit", 0.0) / out_s if out_s else None,
           "vocoder": turn["seconds"].get("vocoder", 0.0) / out_s if out_s else None}
    return {"bytes": sum(a.bytes for a in opened.values()), "seconds": turn["turn_s"],
            "rtf": rtf, "peak_rss_mib": turn["peak_rss_mib"], "open_s": turn["open_s"],
            "threads": DEPLOYMENT_THREADS, "first_audio_s": m["first_audio_s"], "llm_steps_per_s": m["llm_steps_per_s"],
            "providers": m["providers"], "torch_loaded": turn["torch_loaded"]}


def _mean(values: List[Any]) -> float:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else math.nan


def cost_summary(cells: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean over clips of the RTF per stage (and their sum), peak RSS and open time of one variant's cells."""
    costs = [c["cost"] for c in cells if "rtf" in c["cost"]]
    if not costs:
        return {}
    rtf = {s: _mean([c["rtf"][s] for c in costs]) for s in STAGES}
    rtf["total"] = float(sum(v for v in rtf.values() if not math.isnan(v)))
    return {"rtf": rtf, "peak_rss_mib": max(c["peak_rss_mib"] for c in costs),
            "open_s": _mean([c["open_s"] for c in costs]),
            "threads": costs[0]["threads"]}


def cost_markdown(rows: Dict[str, Dict[str, Any]]) -> List[str]:
    """The cost table of the e2e rows."""
    measured = {n: r["cost"] for n, r in rows.items() if r.get("cost")}
    if not measured:
        return []
    threads = next(iter(measured.values()))["threads"]
    lines = [f"Cost at the deployment thread count ({threads}): RTF per stage (processing s / audio s), peak RSS of the "
             "cell's child process (bundle opened, one turn), time to open the bundle.", "",
             "| variant | MB | RTF encode | RTF LLM | RTF DiT | RTF vocoder | RTF sum | peak RSS MiB | open s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in measured.items():
        r = c["rtf"]
        lines.append(f"| {name} | {rows[name]['bytes'] / 1e6:.2f} | " + " | ".join(f"{r[s]:.3g}" for s in STAGES)
                     + f" | {r['total']:.3g} | {c['peak_rss_mib']:.0f} | {c['open_s']:.2f} |")
    return lines + [""]


def plot_rtf(report: Dict[str, Any], folder: Path, label: str) -> List[Path]:
    """pareto_e2e_rtf.png: summed RTF vs the end-to-end headline error, the floor drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["components"].get("e2e", {})
    pts = [(r["cost"]["rtf"]["total"], max(r["headline"], 1e-12), n) for n, r in rows.items() if r.get("cost")]
    if not pts:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    for i, (x, y, n) in enumerate(pts):
        ax.annotate(n, (x, y), fontsize=7, xytext=(4, 4 - 12 * (i % 2)), textcoords="offset points")
    if report["floors"].get("e2e", 0) > 0:
        ax.axhline(report["floors"]["e2e"], ls="--", lw=0.8, color="grey")
    ax.set(xlabel="RTF, sum of the stages", ylabel=report["headline_metrics"]["e2e"], yscale="log",
           title=f"end to end {label}".strip())
    fig.tight_layout()
    path = folder / "pareto_e2e_rtf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
