"""The study's report, built from the stored cells: ``report.json`` (everything the plots and tables need, so
``kimia-edge study --replot`` redraws from it alone), ``report.md`` and PNG plots:

- ``pareto_<component>.png``: bytes on disk vs the component's headline error per variant, the noise floor drawn;
- ``kld_hist.png``: per-position KLD of each LLM row, per head;
- ``dit_chunks.png``: mel L1 per chunk of the streaming detokenizer, per DiT variant (over time);
- ``qdq_tensors_<graph>.png``: the worst tensors' SQNR per static int8 variant (``--qdq-debug``, qdq_debug.py).

Headline error per component (lower is better; a variant whose error is not above the floor's is "within the
noise floor" and is not called a loss): whisper_encoder / adaptor: relative L2; vq_encoder: semantic-id flip
rate; dit_step: mel L1 over the stream; vocoder: multi-resolution STFT distance; llm: mean KLD per head.
Intervals: over clips (bootstrap 95 %) in the component tables; per position for the LLM heads of one clip.
"""
from __future__ import annotations

import datetime
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from kimia_edge.quantization.study import budget, qdq_debug
from kimia_edge.quantization.study import metrics as M
from kimia_edge.quantization.study.cost import cost_markdown, cost_summary, plot_rtf

__all__ = ["HEADLINE", "build_report", "write_report", "replot", "markdown"]

# component -> (metric path in a cell's metrics, label)
HEADLINE: Dict[str, tuple] = {
    "whisper_encoder": (("rel_l2",), "relative L2 of the features"),
    "vq_encoder": (("flip_rate",), "semantic-id flip rate"),
    "adaptor": (("rel_l2",), "relative L2 of the embeddings"),
    "dit_step": (("mel_l1",), "mel L1 over the stream"),
    "vocoder": (("mrstft", "total"), "multi-resolution STFT distance"),
    "llm.text": (("heads", "text", "mean_kld", "value"), "text head mean KLD (nats)"),
    "llm.audio": (("heads", "audio", "mean_kld", "value"), "audio head mean KLD (nats)"),
    "e2e": (("speech_mrstft", "total"), "multi-resolution STFT distance of the answer's speech"),
}
_COLUMNS: Dict[str, Sequence[tuple]] = {  # component -> (metric path, column title, format)
    "whisper_encoder": ((("cosine",), "cosine", ".6f"), (("snr_db",), "SNR dB", ".1f"), (("rel_l2",), "rel L2", ".3g")),
    "vq_encoder": ((("flip_rate",), "id flip rate", ".4f"), (("cosine",), "pre-VQ cosine", ".6f"),
                   (("snr_db",), "SNR dB", ".1f")),
    "adaptor": ((("cosine",), "cosine", ".6f"), (("snr_db",), "SNR dB", ".1f"), (("rel_l2",), "rel L2", ".3g")),
    "dit_step": ((("mel_l1",), "mel L1", ".4g"), (("lsd_db",), "LSD dB", ".3g"), (("snr_db",), "mel SNR dB", ".1f"),
                 (("step_snr_db",), "step SNR dB", ".1f")),
    "vocoder": ((("snr_db",), "SNR dB", ".1f"), (("mrstft", "total"), "MR-STFT", ".4g")),
    "e2e": ((("wer",), "WER", ".3f"), (("audio_token_agreement",), "audio tokens", ".3f"),
            (("text_token_agreement",), "text tokens", ".3f"), (("greedy_agreement_steps",), "greedy steps", ".1f"),
            (("speech_mrstft", "total"), "speech MR-STFT", ".4g"), (("pesq",), "PESQ", ".2f"),
            (("stoi",), "STOI", ".3f")),
}
_COMPONENT_ORDER = ("whisper_encoder", "vq_encoder", "adaptor", "dit_step", "vocoder", "llm", "e2e")


def _get(d: Any, path: Sequence[str]) -> Optional[float]:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return None if d is None else float(d)


def _summary(values: List[float]) -> Dict[str, float]:
    """Mean over clips and the half-width of its bootstrap 95 % interval (0 for one clip)."""
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": math.nan, "pm": math.nan, "clips": 0}
    if any(math.isinf(x) for x in v):
        return {"mean": float(np.mean(v)), "pm": 0.0, "clips": len(v)}
    lo, hi = M.bootstrap_ci(v) if len(v) > 1 else (v[0], v[0])
    return {"mean": float(np.mean(v)), "pm": (hi - lo) / 2.0, "clips": len(v)}


def build_report(out: Path) -> Dict[str, Any]:
    """report.json's content from study.json and the stored cells."""
    from kimia_edge.quantization.study.run import StudyPaths, load_cells, reference_notes
    from kimia_edge.runtime.metrics import machine_label

    paths = StudyPaths(out)
    config = json.loads(paths.config.read_text())
    cells = load_cells(out)
    unavailable = {f"{c['component']}={c['variant']}": c["unavailable"] for c in cells if "unavailable" in c}
    cells = [c for c in cells if "unavailable" not in c]
    by_variant: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for c in cells:
        by_variant[(c["component"], c["variant"])].append(c)
    rows: Dict[str, Dict[str, Any]] = defaultdict(dict)
    for (component, variant), cs in sorted(by_variant.items()):
        row: Dict[str, Any] = {"floor": cs[0]["floor"], "bytes": cs[0]["cost"]["bytes"], "clips": len(cs),
                               "seconds": _summary([c["cost"]["seconds"] for c in cs]),
                               "pooled": any(c.get("pooled") for c in cs)}
        if component == "llm":
            for head in ("text", "audio"):
                hq = [c["metrics"]["heads"][head] for c in cs]
                row[head] = {k: _summary([_get(h, (k, "value")) for h in hq]) for k in
                             ("mean_kld", "p99_kld", "top1_agreement", "mean_delta_p", "rms_delta_p")}
                row[head]["position_pm"] = {k: float(np.mean([h[k]["pm"] for h in hq])) for k in
                                            ("mean_kld", "p99_kld", "top1_agreement", "rms_delta_p")}
                row[head]["delta_p_percentiles"] = {q: float(np.mean([h["delta_p_percentiles"][q] for h in hq]))
                                                    for q in hq[0]["delta_p_percentiles"]}
                row[head]["kld"] = [x for h in hq for x in h["kld"]]
            for k in ("greedy_agreement_steps", "audio_token_agreement", "text_token_agreement"):
                row[k] = _summary([c["metrics"][k] for c in cs])
            row["greedy_steps"] = cs[0]["metrics"]["greedy_steps"]
            row["tensor_types"] = cs[0]["cost"].get("tensor_types", {})
            row["headline"] = {h: row[h]["mean_kld"]["mean"] for h in ("text", "audio")}
        else:
            for path, _, _ in _COLUMNS.get(component, ()):
                row[".".join(path)] = _summary([_get(c["metrics"], path) for c in cs])
            row["headline"] = _summary([_get(c["metrics"], HEADLINE[component][0]) for c in cs])["mean"]
            if component == "e2e":
                row["cost"] = cost_summary(cs)
            if component == "dit_step":
                row["chunks_mel_l1"] = [[ch["mel_l1"] for ch in c["metrics"]["chunks"]] for c in cs]
        rows[component][variant] = row
    floors: Dict[str, Any] = {}
    for component, variants in rows.items():
        fl = [r["headline"] for r in variants.values() if r["floor"]]
        if component == "llm":
            floors[component] = {h: max((f[h] for f in fl), default=0.0) for h in ("text", "audio")}
        else:
            floors[component] = max((f for f in fl if not math.isnan(f)), default=0.0)
        for r in variants.values():
            if r["floor"]:
                continue
            if component == "llm":
                r["within_floor"] = {h: r["headline"][h] <= floors[component][h] for h in ("text", "audio")}
            else:
                r["within_floor"] = r["headline"] <= floors[component]
    generated = config["generated_snapshot"]
    return {
        "header": {
            "snapshot": config["source"]["snapshot"], "config_sha256": config["source"]["config_sha256"],
            "generated_snapshot": generated,
            "label": ("Generated snapshot: the weights are random, so these numbers demonstrate the pipeline, not "
                      "Kimi-Audio's accuracy." if generated else "Snapshot not marked as generated (real weights)."),
            "clips": config["clips"], "llm_steps": config["llm_steps"], "machine": machine_label(),
            "date": datetime.date.today().isoformat(), "cells": len(cells),
            "notes": ["int8_qdq (MinMax, Percentile, Entropy) is calibrated on the study's own clips (in-sample).",
                      "Every cell but the end-to-end ones (deployment thread count) runs on one thread; 'seconds' of pooled cells share the cores with other cells.",
                      *(f"LLM reference: {n}." for n in reference_notes(out))],
        },
        "headline_metrics": {k: v[1] for k, v in HEADLINE.items()},
        "components": {c: rows[c] for c in _COMPONENT_ORDER if c in rows},
        "floors": floors,
        "unavailable": unavailable,
        **budget.report_sections(out),  # per-group sensitivity and the --budget recommendation, if run
        "qdq_debug": qdq_debug.report_section(out),  # per-tensor error of the QDQ variants (--qdq-debug), if run
    }


def _fmt(s: Dict[str, float], fmt: str) -> str:
    if s is None or s.get("clips", 1) == 0 or math.isnan(s["mean"]):
        return "n/a"
    text = format(s["mean"], fmt) if not math.isinf(s["mean"]) else ("∞" if s["mean"] > 0 else "-∞")
    return text + (f" ± {format(s['pm'], fmt)}" if s["pm"] and not math.isnan(s["pm"]) else "")


def markdown(report: Dict[str, Any]) -> str:
    h = report["header"]
    lines = ["# Quantization study", "", f"**{h['label']}**", "",
             f"Snapshot `{Path(h['snapshot']).name}` (config sha256 {h['config_sha256'][:12]}), "
             f"{len(h['clips'])} clip(s): {', '.join(sorted(h['clips']))}; {h['cells']} cells; LLM: "
             f"{h['llm_steps']} greedy F32 steps after a chat prompt on each clip, teacher-forced; {h['machine']}, "
             f"{h['date']}.", ""]
    lines += [f"- {n}" for n in h["notes"]]
    lines += ["- Noise floor rows (`fp32`: ONNX Runtime's fp32 export vs torch; `torch_threads`, `F32_threads`: the "
              "reference with another thread count vs itself) bound what counts as a loss: a variant whose headline "
              "error is not above its component's floor is marked *within floor*.",
              "- ± is the half-width of a bootstrap 95 % interval over clips (none with one clip); the LLM's "
              "per-position intervals are in report.json.", ""]
    for component, variants in report["components"].items():
        if component == "llm":
            continue
        cols = _COLUMNS.get(component, ())
        lines += [f"## {component}", "", f"Headline: {report['headline_metrics'][component]}.", "",
                  "| variant | MB | " + " | ".join(c[1] for c in cols) + " | s / clip | verdict |",
                  "|---|---:|" + "---:|" * len(cols) + "---:|---|"]
        for name, r in variants.items():
            verdict = "floor" if r["floor"] else ("within floor" if r["within_floor"] else "loss")
            lines.append(f"| {name} | {r['bytes'] / 1e6:.3f} | "
                         + " | ".join(_fmt(r.get(".".join(p)), f) for p, _, f in cols)
                         + f" | {r['seconds']['mean']:.3g} | {verdict} |")
        lines.append("")
        if component == "e2e":
            from kimia_edge.quantization.study.end_to_end import REPORT_NOTE

            lines += [REPORT_NOTE, ""] + cost_markdown(variants)
    if "llm" in report["components"]:
        lines += ["## LLM (GGUF)", "", "KLD = KL(F32 ‖ variant) in nats per position; top-1 = the two argmaxes agree "
                  "(llama.cpp's \"same top p\"); Δp = p_variant − p_F32 of the F32 top token; greedy = steps of a free "
                  "greedy run until the first (audio, text) divergence.", "",
                  "| variant | MB | head | mean KLD | p99 KLD | top-1 | RMS Δp | Δp p1 / p50 / p99 | verdict |",
                  "|---|---:|---|---:|---:|---:|---:|---|---|"]
        for name, r in report["components"]["llm"].items():
            for head in ("text", "audio"):
                q = r[head]
                pm = q["position_pm"]
                d = q["delta_p_percentiles"]
                verdict = "floor" if r["floor"] else ("within floor" if r["within_floor"][head] else "loss")
                lines.append(
                    f"| {name} | {r['bytes'] / 1e6:.2f} | {head} | {q['mean_kld']['mean']:.3g} ± {pm['mean_kld']:.2g} | "
                    f"{q['p99_kld']['mean']:.3g} | {100 * q['top1_agreement']['mean']:.1f} % ± "
                    f"{100 * pm['top1_agreement']:.1f} | {q['rms_delta_p']['mean']:.3g} ± {pm['rms_delta_p']:.2g} | "
                    f"{d['p1']:.3g} / {d['p50']:.3g} / {d['p99']:.3g} | {verdict} |")
        lines += ["", "| variant | greedy agreement (steps) | audio-token agreement | text-token agreement | "
                  "tensor types (trunk + audio) |", "|---|---:|---:|---:|---|"]
        for name, r in report["components"]["llm"].items():
            types = ", ".join(f"{k} {v}" for k, v in r.get("tensor_types", {}).items())
            lines.append(f"| {name} | {_fmt(r['greedy_agreement_steps'], '.1f')} of {r['greedy_steps']} | "
                         f"{_fmt(r['audio_token_agreement'], '.3f')} | {_fmt(r['text_token_agreement'], '.3f')} | "
                         f"{types} |")
        lines.append("")
    if report.get("unavailable"):
        lines += ["## Not measured", "", "| variant | why |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(report["unavailable"].items())] + [""]
    lines += budget.markdown_section(report)
    lines += qdq_debug.markdown_section(report)
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in _plot_names(report)]
    return "\n".join(lines) + "\n"


def _plot_names(report: Dict[str, Any]) -> List[str]:
    names = [f"pareto_{c}.png" for c in report["components"]]
    if "llm" in report["components"]:
        names.append("kld_hist.png")
    if "dit_step" in report["components"]:
        names.append("dit_chunks.png")
    if any(r.get("cost") for r in report["components"].get("e2e", {}).values()):
        names.append("pareto_e2e_rtf.png")
    return names + qdq_debug.plot_names(report)


def plot(report: Dict[str, Any], folder: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    label = "random weights: pipeline demo" if report["header"]["generated_snapshot"] else ""
    for component, variants in report["components"].items():
        fig, ax = plt.subplots(figsize=(6, 4))
        series = [("text", "o"), ("audio", "s")] if component == "llm" else [(None, "o")]
        for head, marker in series:
            xs, ys, names = [], [], []
            for name, r in variants.items():
                if r["floor"] and name != "fp32":
                    continue
                y = r["headline"][head] if head else r["headline"]
                xs.append(r["bytes"] / 1e6), ys.append(max(y, 1e-12)), names.append(name)
            ax.scatter(xs, ys, marker=marker, label=f"{head} head" if head else None)
            for i, (x, y, n) in enumerate(zip(xs, ys, names)):  # alternate offsets: near points stay readable
                ax.annotate(n, (x, y), fontsize=7, xytext=(4, 4 - 12 * (i % 2)), textcoords="offset points")
            floor = report["floors"][component][head] if head else report["floors"][component]
            if floor > 0:
                ax.axhline(floor, ls="--", lw=0.8, color="grey")
        metric = (report["headline_metrics"]["llm.text"].replace("text head ", "") if component == "llm"
                  else report["headline_metrics"][component])
        ax.set(xlabel="bytes on disk (MB)", ylabel=metric, yscale="log", title=f"{component} {label}".strip())
        if component == "llm":
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(folder / f"pareto_{component}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if "llm" in report["components"]:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for ax, head in zip(axes, ("text", "audio")):
            for name, r in report["components"]["llm"].items():
                k = np.asarray(r[head]["kld"])
                if r["floor"] or k.size == 0:
                    continue
                ax.hist(np.log10(np.maximum(k, 1e-12)), bins=30, histtype="step", label=name)
            ax.set(xlabel="log10 KLD per position (nats)", ylabel="positions", title=f"{head} head {label}".strip())
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        written.append(folder / "kld_hist.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if "dit_step" in report["components"]:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, r in report["components"]["dit_step"].items():
            if r["floor"] and name != "fp32":
                continue
            for i, chunks in enumerate(r["chunks_mel_l1"]):
                ax.plot(range(len(chunks)), np.maximum(chunks, 1e-12), marker=".", label=name if i == 0 else None)
        ax.set(xlabel="chunk (streaming order)", ylabel="mel L1", yscale="log", title=f"DiT per chunk {label}".strip())
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(folder / "dit_chunks.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return (written + plot_rtf(report, folder, label) + budget.plot_sections(report, folder, label)
            + qdq_debug.plot(report, folder, label))


def _write_outputs(report: Dict[str, Any], out: Path) -> None:
    plot(report, out)
    (out / "report.md").write_text(markdown(report))


def write_report(out: Path) -> Dict[str, Any]:
    """Builds report.json from the cells, then report.md and the plots from it."""
    from kimia_edge.quantization.study.run import write_json

    report = build_report(out)
    write_json(Path(out) / "report.json", report)
    _write_outputs(report, Path(out))
    return report


def replot(out: Path) -> Dict[str, Any]:
    """report.md and the plots again, from report.json alone."""
    report = json.loads((Path(out) / "report.json").read_text())
    _write_outputs(report, Path(out))
    return report
