"""Per-layer sensitivity of the LLM (issue [Q] item 5): one tensor group quantized at a time, the rest F32.

For a quant type (e.g. ``Q4_K_M``, a row the study already quantized), every tensor group that the type really
changes (``gguf_mix.differing_groups``: ``trunk.blk.i``, ``audio.blk.j``, ``trunk.token_embd``, ``trunk.output``,
``audio.token_embd`` = the audio head) gets one mix: that group's tensors copied from the quantized files, every other
tensor from the F32 export (``gguf_mix.assemble_llm``). Each mix is measured per clip by the study's own LLM cell
(``run.llm_cell``: the same metrics as the uniform rows) and stored as ``REPORT/sensitivity/<key>.json`` as it
finishes (a re-run resumes); the mix's files are deleted once its cells are stored (on the full model each is
nearly the F32 size).

Impact of a group = the mean KLD of the text head plus that of the audio head (nats, mean over clips): a
continuous measure that top-1 or greedy agreement (steps) are not; the report shows those too. The ranking (least
sensitive first) is what ``budget.py`` quantizes in order.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from kimia_edge.quantization.gguf_mix import assemble_llm, differing_groups
from kimia_edge.quantization.study.run import StudyPaths, llm_cell, write_json
from kimia_edge.quantization.study.spec import LLM, Cell, StudyVariant

__all__ = ["SENSITIVITY_DIR", "group_name", "measure_mix", "measure_layers", "ranking", "impact", "plot_bars"]

SENSITIVITY_DIR = "sensitivity"


def group_name(role: str, group: str) -> str:
    """``("trunk", "blk.3")`` -> ``"trunk.blk.3"`` (the mix spec's scope syntax)."""
    return f"{role}.{group}"


def _folder(paths: StudyPaths) -> Path:
    return paths.root / SENSITIVITY_DIR


def impact(metrics_per_clip: Sequence[Dict[str, Any]]) -> float:
    """Text + audio mean KLD (nats), mean over clips."""
    vals = [m["heads"]["text"]["mean_kld"]["value"] + m["heads"]["audio"]["mean_kld"]["value"]
            for m in metrics_per_clip]
    return float(sum(vals) / len(vals))


def measure_mix(paths: StudyPaths, qtype: str, name: str, quantized: Sequence[Tuple[str, str]],
                clips: Sequence[str]) -> List[Dict[str, Any]]:
    """The cells (one per clip) of the mix whose ``quantized`` (role, group)s come from the ``qtype`` files and the
    rest from F32; stored as sensitivity/<name>__<clip>.json, reused when present. Returns the cell dicts."""
    folder = _folder(paths)
    keys = {c: folder / f"{LLM}__{name}__{c}.json" for c in clips}
    if all(k.exists() for k in keys.values()):
        return [json.loads(keys[c].read_text()) for c in clips]
    f32, quant = paths.gguf / "F32", paths.gguf / qtype
    if not (quant / ".done").exists():
        raise FileNotFoundError(f"{quant}: the {qtype} row is not prepared (add llm={qtype} to the study)")
    chosen = set(quantized)
    mix = paths.gguf / name
    try:
        assemble_llm([f32, quant], lambda role, group: int((role, group) in chosen), mix)
        (mix / ".done").touch()
        out = []
        for c in clips:
            if keys[c].exists():
                out.append(json.loads(keys[c].read_text()))
                continue
            cell = llm_cell(paths, Cell(StudyVariant(LLM, name), c))
            cell.update(component=LLM, variant=name, clip=c, qtype=qtype,
                        quantized=[group_name(r, g) for r, g in quantized])
            write_json(keys[c], cell)
            out.append(cell)
        return out
    finally:
        shutil.rmtree(mix, ignore_errors=True)


def measure_layers(out: Path, qtype: str, clips: Optional[Sequence[str]] = None,
                   progress: bool = True) -> List[Dict[str, Any]]:
    """Measures every group ``qtype`` changes, one at a time (see the module doc); returns ``ranking``."""
    from tqdm import tqdm

    paths = StudyPaths(out)
    clips = list(clips or json.loads(paths.config.read_text())["clips"])
    groups = differing_groups(paths.gguf / "F32", paths.gguf / qtype)
    for role, group in tqdm(groups, desc=f"sensitivity {qtype}", unit="group", disable=not progress):
        measure_mix(paths, qtype, f"{qtype}@{group_name(role, group)}", [(role, group)], clips)
    return ranking(out, qtype)


def ranking(out: Path, qtype: str) -> List[Dict[str, Any]]:
    """[{group, role, impact, bytes, text_top1, audio_top1, ...}] of the stored one-group cells of ``qtype``,
    least sensitive first."""
    cells: Dict[str, List[Dict[str, Any]]] = {}
    for p in sorted(_folder(StudyPaths(out)).glob(f"{LLM}__{qtype}@*.json")):
        c = json.loads(p.read_text())
        cells.setdefault(c["variant"].split("@", 1)[1], []).append(c)
    rows = []
    for group, cs in cells.items():
        ms = [c["metrics"] for c in cs]
        mean = lambda f: float(sum(f(m) for m in ms) / len(ms))  # noqa: E731
        rows.append({"group": group, "impact": impact(ms), "bytes": cs[0]["cost"]["bytes"], "clips": len(cs),
                     "text_mean_kld": mean(lambda m: m["heads"]["text"]["mean_kld"]["value"]),
                     "audio_mean_kld": mean(lambda m: m["heads"]["audio"]["mean_kld"]["value"]),
                     "text_top1": mean(lambda m: m["heads"]["text"]["top1_agreement"]["value"]),
                     "audio_top1": mean(lambda m: m["heads"]["audio"]["top1_agreement"]["value"]),
                     "greedy_agreement_steps": mean(lambda m: m["greedy_agreement_steps"])})
    return sorted(rows, key=lambda r: (r["impact"], r["group"]))


def plot_bars(rows: Sequence[Dict[str, Any]], qtype: str, path: Path, label: str = "",
              series: Sequence[Tuple[str, str]] = (("text_mean_kld", "text head"), ("audio_mean_kld", "audio head")),
              ylabel: str = "mean KLD (nats)") -> Path:
    """Bars per group (in model order) of each ``series`` (row key, legend) for that group alone at ``qtype``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def order(r):  # model order: trunk before audio, embeddings / heads before numbered layers, layers by number
        g = r["group"]
        return (g.startswith("audio."), bool(re.search(r"\d", g)), re.sub(r"\d+", lambda m: m[0].zfill(6), g))

    rows = sorted(rows, key=order)
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(rows) + 2), 3.8))
    width = 0.8 / len(series)
    for i, (key, legend) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [max(r[key], 1e-12) for r in rows], width=width, label=legend)
    ax.set_xticks(x, [r["group"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set(ylabel=ylabel, yscale="log", title=f"{qtype}: one group quantized, rest F32\n{label}".strip())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
