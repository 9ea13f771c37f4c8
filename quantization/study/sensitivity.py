"""Per-layer sensitivity of the LLM (issue [Q] item 5): one tensor group quantized at a time, the rest F32.

For a quant type (e.g. ``Q4_K_M``, a row the study already quantized), every tensor group that the type really
changes (``gguf_mix.differing_groups``: ``trunk.blk.i``, ``audio.blk.j``, ``trunk.token_embd``, ``trunk.output``,
``audio.token_embd`` = the audio head) gets one mix: that group's tensors copied from the quantized files, every other
tensor from the F32 export (``gguf_mix.assemble_llm``). Each mix is measured per clip twice, while its files exist:

- by the study's own LLM cell (``run.llm_cell``: teacher-forced KLD / top-1 per head, the free greedy run against
  the F32 export), stored as ``REPORT/sensitivity/llm__<TYPE>@<group>__<clip>.json``;
- end to end (``end_to_end.e2e_cell``: one greedy chat turn of the runtime ``Pipeline`` over a real bundle of fp32
  graphs and this GGUF, against the golden torch pipeline), stored as
  ``REPORT/sensitivity/e2e__fp32@<TYPE>@<group>__<clip>.json``.

Cells are stored as they finish (a re-run resumes); the mix's files and bundle are deleted once its cells are stored
(on the full model each is nearly the F32 size).

Ranking (least sensitive first; the order ``budget.py`` quantizes in), by the end-to-end impact of the group:

    e2e impact = (1 - audio-token agreement) + WER of the answer text     (both 0..1, mean over clips)

i.e. the fraction of the spoken answer's tokens and of its words that the group alone changes, what a user hears and
reads. Greedy turns are discrete, so many groups tie at 0 (the turn is unchanged); ties are broken by the continuous
component impact, ``impact`` = text + audio mean KLD of the teacher-forced heads (nats, mean over clips), which the
report shows beside it (with top-1, the e2e token agreements, WER and speech distance).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from kimia_edge.quantization.gguf_mix import assemble_llm, differing_groups
from kimia_edge.quantization.study.run import StudyPaths, llm_cell, write_json
from kimia_edge.quantization.study.spec import E2E, LLM, Cell, StudyVariant

__all__ = ["SENSITIVITY_DIR", "E2E_ONNX", "group_name", "measure_mix", "measure_layers", "ranking", "impact",
           "e2e_impact", "e2e_means", "plot_bars"]

E2E_ONNX = "fp32"  # the graphs of every sensitivity mix's end-to-end cell: only the LLM varies

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


def _mean(vals: Sequence[Optional[float]]) -> Optional[float]:
    """Mean, None when any value is None (e.g. PESQ of a turn without speech)."""
    return None if not vals or any(v is None for v in vals) else float(sum(vals) / len(vals))


def e2e_means(e2e_metrics_per_clip: Sequence[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """Means over clips of the end-to-end cells' metrics (``end_to_end.compare_turns``): token agreements (0..1),
    WER (0..1), greedy steps until the first divergence, speech MR-STFT distance, PESQ (MOS-LQO), STOI (0..1)."""
    ms = e2e_metrics_per_clip
    return {"e2e_audio_token_agreement": _mean([m["audio_token_agreement"] for m in ms]),
            "e2e_text_token_agreement": _mean([m["text_token_agreement"] for m in ms]),
            "e2e_wer": _mean([m["wer"] for m in ms]),
            "e2e_greedy_steps": _mean([m["greedy_agreement_steps"] for m in ms]),
            "e2e_mrstft": _mean([(m["speech_mrstft"] or {}).get("total") for m in ms]),
            "e2e_pesq": _mean([m["pesq"] for m in ms]),
            "e2e_stoi": _mean([m["stoi"] for m in ms])}


def e2e_impact(e2e_metrics_per_clip: Sequence[Dict[str, Any]]) -> float:
    """(1 - audio-token agreement) + WER, mean over clips (0..2; 0 = the turn's tokens and words unchanged)."""
    vals = [(1.0 - m["audio_token_agreement"]) + m["wer"] for m in e2e_metrics_per_clip]
    return float(sum(vals) / len(vals))


def _cell_keys(folder: Path, name: str, clips: Sequence[str], e2e: bool) -> Dict[Tuple[str, str], Path]:
    keys = {(LLM, c): folder / f"{Cell(StudyVariant(LLM, name), c).key}.json" for c in clips}
    if e2e:
        keys.update({(E2E, c): folder / f"{Cell(StudyVariant(E2E, f'{E2E_ONNX}@{name}'), c).key}.json"
                     for c in clips})
    return keys


def measure_mix(paths: StudyPaths, qtype: str, name: str, quantized: Sequence[Tuple[str, str]],
                clips: Sequence[str], *, e2e: bool = True, snapshot: Optional[Path] = None,
                kept: Sequence[Tuple[str, str]] = (), keep_type: Optional[str] = None) -> Dict[str, Any]:
    """The cells of the mix whose ``quantized`` (role, group)s come from the ``qtype`` files, the ``kept`` ones from
    the ``keep_type`` files (a second prepared row, e.g. Q8_0) and the rest from F32: per clip an LLM cell and
    (``e2e``) an end-to-end cell ``fp32@<name>``, stored as sensitivity/<component>__<variant>__<clip>.json, reused
    when present. ``snapshot`` (for the bundle's profiles when not cached) defaults to the study's. Returns
    {"llm": [cell per clip], "e2e": [cell per clip] or None}."""
    folder = _folder(paths)
    keys = _cell_keys(folder, name, clips, e2e)
    tags = dict(qtype=qtype, quantized=[group_name(r, g) for r, g in quantized])
    if kept:
        tags.update(keep_type=keep_type, kept=[group_name(r, g) for r, g in kept])

    def result() -> Dict[str, Any]:
        load = lambda comp: [json.loads(keys[comp, c].read_text()) for c in clips]  # noqa: E731
        return {"llm": load(LLM), "e2e": load(E2E) if e2e else None}

    if all(k.exists() for k in keys.values()):
        return result()
    f32, quant = paths.gguf / "F32", paths.gguf / qtype
    sources = [f32, quant] + ([paths.gguf / keep_type] if kept else [])
    for t, src in zip(([qtype, keep_type] if kept else [qtype]), sources[1:]):
        if not (src / ".done").exists():
            raise FileNotFoundError(f"{src}: the {t} row is not prepared (add llm={t} to the study)")
    chosen, second = set(quantized), set(kept)
    mix = paths.gguf / name
    mix_e2e = f"{E2E_ONNX}@{name}"
    from kimia_edge.quantization.study.end_to_end import bundle_dir, e2e_cell, write_mix_bundle

    try:
        assemble_llm(sources, lambda role, group: 1 if (role, group) in chosen else 2 if (role, group) in second
                     else 0, mix)
        (mix / ".done").touch()
        for c in clips:
            if not keys[LLM, c].exists():
                cell = llm_cell(paths, Cell(StudyVariant(LLM, name), c))
                cell.update(component=LLM, variant=name, clip=c, **tags)
                write_json(keys[LLM, c], cell)
        if e2e and not all(keys[E2E, c].exists() for c in clips):
            config = json.loads(paths.config.read_text())
            write_mix_bundle(paths, Path(snapshot or config["source"]["snapshot"]), mix_e2e)
            for c in clips:
                if not keys[E2E, c].exists():
                    cell = e2e_cell(paths, Cell(StudyVariant(E2E, mix_e2e), c))
                    cell.update(component=E2E, variant=mix_e2e, clip=c, **tags)
                    write_json(keys[E2E, c], cell)
        return result()
    finally:
        shutil.rmtree(mix, ignore_errors=True)
        shutil.rmtree(bundle_dir(paths, mix_e2e), ignore_errors=True)


def measure_layers(out: Path, qtype: str, clips: Optional[Sequence[str]] = None, progress: bool = True, *,
                   e2e: bool = True, snapshot: Optional[Path] = None) -> List[Dict[str, Any]]:
    """Measures every group ``qtype`` changes, one at a time (see the module doc); returns ``ranking``. ``e2e``
    needs the study's end-to-end references (a study with an ``e2e:`` mix)."""
    from tqdm import tqdm

    paths = StudyPaths(out)
    clips = list(clips or json.loads(paths.config.read_text())["clips"])
    groups = differing_groups(paths.gguf / "F32", paths.gguf / qtype)
    for role, group in tqdm(groups, desc=f"sensitivity {qtype}", unit="group", disable=not progress):
        measure_mix(paths, qtype, f"{qtype}@{group_name(role, group)}", [(role, group)], clips, e2e=e2e,
                    snapshot=snapshot)
    return ranking(out, qtype)


def ranking(out: Path, qtype: str) -> List[Dict[str, Any]]:
    """[{group, e2e_impact, impact, bytes, text_top1, audio_top1, e2e_*, ...}] of the stored one-group cells of
    ``qtype``, least sensitive first: by ``e2e_impact`` (None without end-to-end cells: sorts last), then by the KLD
    ``impact`` (see the module doc)."""
    folder = _folder(StudyPaths(out))
    cells: Dict[str, List[Dict[str, Any]]] = {}
    e2e_cells: Dict[str, List[Dict[str, Any]]] = {}
    for p in sorted(folder.glob(f"{LLM}__{qtype}@*.json")):
        c = json.loads(p.read_text())
        cells.setdefault(c["variant"].split("@", 1)[1], []).append(c)
    for p in sorted(folder.glob(f"{E2E}__{E2E_ONNX}@{qtype}@*.json")):
        c = json.loads(p.read_text())
        e2e_cells.setdefault(c["variant"].split("@", 2)[2], []).append(c)
    rows = []
    for group, cs in cells.items():
        ms = [c["metrics"] for c in cs]
        mean = lambda f: float(sum(f(m) for m in ms) / len(ms))  # noqa: E731
        es = [c["metrics"] for c in e2e_cells.get(group, [])]
        es = es if len(es) == len(ms) else []  # a group's e2e figures count once every clip has one
        rows.append({"group": group, "e2e_impact": e2e_impact(es) if es else None, "impact": impact(ms),
                     "bytes": cs[0]["cost"]["bytes"], "clips": len(cs),
                     "text_mean_kld": mean(lambda m: m["heads"]["text"]["mean_kld"]["value"]),
                     "audio_mean_kld": mean(lambda m: m["heads"]["audio"]["mean_kld"]["value"]),
                     "text_top1": mean(lambda m: m["heads"]["text"]["top1_agreement"]["value"]),
                     "audio_top1": mean(lambda m: m["heads"]["audio"]["top1_agreement"]["value"]),
                     "greedy_agreement_steps": mean(lambda m: m["greedy_agreement_steps"]),
                     **(e2e_means(es) if es else {})})
    return sorted(rows, key=lambda r: (r["e2e_impact"] is None, r["e2e_impact"] or 0.0, r["impact"], r["group"]))


def plot_bars(rows: Sequence[Dict[str, Any]], qtype: str, path: Path, label: str = "",
              series: Sequence[Tuple[str, str]] = (("text_mean_kld", "text head"), ("audio_mean_kld", "audio head")),
              ylabel: str = "mean KLD (nats)",
              e2e_series: Sequence[Tuple[str, str, bool]] = (
                  ("e2e_audio_token_agreement", "1 − audio-token agreement", True), ("e2e_wer", "WER", False)),
              e2e_ylabel: str = "end-to-end impact") -> Path:
    """Bars per group (in model order) of each ``series`` (row key, legend) for that group alone at ``qtype``; when
    the rows carry end-to-end figures, a second panel below stacking ``e2e_series`` (row key, legend, plot 1 − value)
    of the same groups (default: the end-to-end impact, 1 − audio-token agreement + WER)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def order(r):  # model order: trunk before audio, embeddings / heads before numbered layers, layers by number
        g = r["group"]
        return (g.startswith("audio."), bool(re.search(r"\d", g)), re.sub(r"\d+", lambda m: m[0].zfill(6), g))

    rows = sorted(rows, key=order)
    x = np.arange(len(rows))
    e2e = any(r.get("e2e_impact") is not None for r in rows)
    fig, axes = plt.subplots(2 if e2e else 1, 1, figsize=(max(5, 0.45 * len(rows) + 2), 6.4 if e2e else 3.8),
                             sharex=True, squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(series)
    for i, (key, legend) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [max(r[key], 1e-12) for r in rows], width=width, label=legend)
    ax.set(ylabel=ylabel, yscale="log", title=f"{qtype}: one group quantized, rest F32\n{label}".strip())
    ax.legend(fontsize=8)
    if e2e:
        ax2 = axes[1][0]
        bottom = np.zeros(len(rows))
        for key, legend, one_minus in e2e_series:
            vals = np.array([(1.0 - r[key] if one_minus else r[key]) if r.get(key) is not None else 0.0
                             for r in rows])
            ax2.bar(x, vals, width=0.6, bottom=bottom, label=legend)
            bottom += vals
        ax2.set(ylabel=e2e_ylabel, ylim=(0, max(1.15 * float(bottom.max()), 0.05)))
        if not bottom.any():
            ax2.text(0.5, 0.5, "no group alone changes the turn", transform=ax2.transAxes, ha="center", fontsize=9)
        ax2.legend(fontsize=8)
    axes[-1][0].set_xticks(x, [r["group"] for r in rows], rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
