"""The budgeted mixed-precision recommendation for the LLM (issue [Q] item 5, ``kimia-edge study --budget SPEC``).

SPEC: comma-separated bounds ``METRIC>=X`` or ``METRIC<=X`` (the mean over clips is compared). On the LLM cells
(teacher-forced against the F32 export, and its free greedy run):

    text_top1, audio_top1                 top-1 agreement per head (0..1), >=
    text_mean_kld, audio_mean_kld         mean KLD per head (nats), <=
    text_p99_kld, audio_p99_kld           99th-percentile KLD per head (nats), <=
    audio_token_agreement, text_token_agreement   token agreement of the free greedy run (0..1), >=
    greedy_agreement_steps                steps of the free greedy run until the first divergence, >=

On the end-to-end cells (``end_to_end.py``: the runtime Pipeline over a bundle of fp32 graphs and the mix's GGUF,
one greedy chat turn against the golden torch pipeline):

    e2e_audio_token_agreement, e2e_text_token_agreement   token agreement of the turn (0..1), >=
    e2e_wer                               WER of the answer's text (0..1), <=
    e2e_greedy_steps                      steps until the first (audio, text) divergence, >=
    e2e_mrstft                            multi-resolution STFT distance of the speech, <=
    e2e_pesq, e2e_stoi                    PESQ (wide band, MOS-LQO) and STOI (0..1) of the speech, >=
                                          (a turn without speech has none: the bound misses)

Objective: the smallest bytes on disk (trunk + audio). Greedy on the sensitivity ranking (``sensitivity.py``: by
end-to-end impact, then KLD): start from the F32 model, add the groups one at a time in order of increasing impact
(least sensitive first), measure the resulting mix (every clip; its end-to-end cells too when a bound names an
``e2e_`` metric) and keep the group only if every bound still holds, else back off and try the next. With
``keep_type`` (e.g. ``Q8_0``, a row the study prepared), a group that breaks the budget at the base type is tried at
``keep_type`` before it stays F32. The uniform quant is tried first: if it meets the budget there is nothing to keep.

The result is a mix spec (``gguf_mix``) ``kimia-edge export --llm-quants`` accepts: the quant type with the groups
it keeps at another type, e.g. ``Q4_K_M+trunk.blk.0-1=F32+audio.output=Q8_0``. The study then measures that spec (F32
when nothing can be quantized) as an ordinary LLM variant made by the exporter's own path (llama.cpp's quantizer with
tensor-type overrides; equal to the assembled mix byte for byte) and, whatever the budget, as the end-to-end cell
``e2e:fp32@SPEC`` beside the uniform end-to-end row ``e2e:fp32@TYPE``; ``measured`` holds both and whether the
budget holds on them. A budget that even the F32 model misses, or that no mix with any group quantized meets, is
reported as such (``status``), not raised.
"""
from __future__ import annotations

import hashlib
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from kimia_edge.quantization.study.run import StudyPaths, write_json
from kimia_edge.quantization.study.sensitivity import E2E_ONNX, e2e_means, group_name, measure_mix, measure_layers

__all__ = ["METRICS", "E2E_METRICS", "Bound", "parse_budget", "within", "mix_spec", "recommend", "RECOMMENDATION_FILE"]

RECOMMENDATION_FILE = "recommendation.json"

# name -> (path into an LLM cell's metrics, the direction a bound must have)
METRICS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "text_top1": (("heads", "text", "top1_agreement", "value"), ">="),
    "audio_top1": (("heads", "audio", "top1_agreement", "value"), ">="),
    "text_mean_kld": (("heads", "text", "mean_kld", "value"), "<="),
    "audio_mean_kld": (("heads", "audio", "mean_kld", "value"), "<="),
    "text_p99_kld": (("heads", "text", "p99_kld", "value"), "<="),
    "audio_p99_kld": (("heads", "audio", "p99_kld", "value"), "<="),
    "audio_token_agreement": (("audio_token_agreement",), ">="),
    "text_token_agreement": (("text_token_agreement",), ">="),
    "greedy_agreement_steps": (("greedy_agreement_steps",), ">="),
}
# name (sensitivity.e2e_means) -> the direction a bound must have; values from the end-to-end cells
E2E_METRICS: Dict[str, str] = {"e2e_audio_token_agreement": ">=", "e2e_text_token_agreement": ">=",
                               "e2e_wer": "<=", "e2e_greedy_steps": ">=", "e2e_mrstft": "<=", "e2e_pesq": ">=",
                               "e2e_stoi": ">="}
_DIRECTION = {**{k: op for k, (_, op) in METRICS.items()}, **E2E_METRICS}
_OPS: Dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Bound:
    metric: str
    op: str
    value: float

    @property
    def text(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    @property
    def e2e(self) -> bool:
        """Whether the bound is on the end-to-end cells."""
        return self.metric in E2E_METRICS

    def value_of(self, metrics_per_clip: Sequence[Dict[str, Any]],
                 e2e_per_clip: Optional[Sequence[Dict[str, Any]]] = None) -> float:
        """Mean over clips of the LLM cells' metrics, or (an ``e2e_`` bound) of the end-to-end cells' (NaN when a
        clip has no value, e.g. PESQ without speech: NaN meets no bound)."""
        if self.e2e:
            if e2e_per_clip is None:
                raise ValueError(f"{self.text}: needs the end-to-end cells")
            value = e2e_means(e2e_per_clip)[self.metric]
            return float("nan") if value is None else value
        vals = []
        for m in metrics_per_clip:
            for k in METRICS[self.metric][0]:
                m = m[k]
            vals.append(float(m))
        return sum(vals) / len(vals)


def parse_budget(spec: str) -> List[Bound]:
    """``"audio_top1>=0.99,text_top1>=0.99"`` -> bounds; ValueError naming a bad item, an unknown metric (with the
    known ones) or a bound in the direction that means nothing (``text_top1<=0.9``)."""
    bounds = []
    for item in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"([a-z0-9_]+)\s*(>=|<=)\s*([-+0-9.eE]+)", item)
        if m is None:
            raise ValueError(f"--budget {item!r}: expected METRIC>=X or METRIC<=X")
        name, op, value = m.groups()
        if name not in _DIRECTION:
            raise ValueError(f"--budget {item!r}: unknown metric {name!r}; known: {', '.join(_DIRECTION)}")
        if op != _DIRECTION[name]:
            raise ValueError(f"--budget {item!r}: {name} is bounded with {_DIRECTION[name]}")
        try:
            bounds.append(Bound(name, op, float(value)))
        except ValueError:
            raise ValueError(f"--budget {item!r}: {value!r} is not a number") from None
    if not bounds:
        raise ValueError("--budget: no bound given")
    return bounds


def within(bounds: Sequence[Bound], metrics_per_clip: Sequence[Dict[str, Any]],
           e2e_per_clip: Optional[Sequence[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """{"ok": every bound holds, "values": {bound text: measured value}}; ``e2e_per_clip``: the end-to-end cells'
    metrics, needed when a bound names an ``e2e_`` metric."""
    values = {b.text: b.value_of(metrics_per_clip, e2e_per_clip) for b in bounds}
    return {"ok": all(_OPS[b.op](values[b.text], b.value) for b in bounds), "values": values}


def _ranges(indices: Sequence[int]) -> List[str]:
    out, run = [], []
    for i in sorted(indices):
        if run and i != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return out


def mix_spec(qtype: str, kept: Sequence[Tuple[str, str]], keep_type: str = "F32",
             also: Optional[Dict[str, Sequence[Tuple[str, str]]]] = None) -> str:
    """The mix spec quantizing everything at ``qtype`` but the (role, group)s ``kept`` at ``keep_type`` (and those of
    ``also``, {type: groups}, at that type); layers of one file in consecutive runs become ranges
    (``trunk.blk.0-3``)."""
    parts = [qtype]
    for t, groups in [(keep_type, kept), *(also or {}).items()]:
        for role in ("trunk", "audio"):
            blocks = [int(g.split(".")[1]) for r, g in groups if r == role and g.startswith("blk.")]
            parts += [f"{role}.blk.{r}={t}" for r in _ranges(blocks)]
            parts += [f"{role}.{g}={t}" for r, g in sorted(groups) if r == role and not g.startswith("blk.")]
    return "+".join(parts)


def recommend(out: Path, qtype: str, budget: str, *, progress: bool = True, snapshot: Optional[Path] = None,
              keep_type: Optional[str] = None) -> Dict[str, Any]:
    """Sensitivity of every group at ``qtype`` (measured if missing, end to end too), then the greedy mix within
    ``budget`` (see the module doc; ``keep_type``: the second type a group that breaks the budget at ``qtype`` is
    tried at). Writes and returns REPORT/recommendation.json: status ("uniform", "mix", "nothing quantized",
    "unmet"), the spec, its trial values and every greedy trial."""
    from tqdm import tqdm

    bounds = parse_budget(budget)
    needs_e2e = any(b.e2e for b in bounds)
    paths = StudyPaths(out)
    clips = list(json.loads(paths.config.read_text())["clips"])
    rows = measure_layers(out, qtype, clips, progress=progress, snapshot=snapshot)
    by_name = {r["group"]: r for r in rows}
    order = [tuple(r["group"].split(".", 1)) for r in rows]  # least sensitive first
    trials: List[Dict[str, Any]] = []

    def trial(chosen: Sequence[Tuple[str, str]], second: Sequence[Tuple[str, str]] = ()) -> Dict[str, Any]:
        key = ",".join(sorted(group_name(r, g) for r, g in chosen))
        if second:  # the sets, not the order, name a mix (no second type: the names of earlier studies)
            key += f"|{keep_type}:" + ",".join(sorted(group_name(r, g) for r, g in second))
        name = f"{qtype}~{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        cells = measure_mix(paths, qtype, name, chosen, clips, e2e=needs_e2e, snapshot=snapshot, kept=second,
                            keep_type=keep_type)
        e2e = [c["metrics"] for c in cells["e2e"]] if cells["e2e"] else None
        t = {"name": name, "quantized": [group_name(r, g) for r, g in chosen], "bytes": cells["llm"][0]["cost"]["bytes"],
             **({"at_keep_type": [group_name(r, g) for r, g in second]} if second else {}),
             **within(bounds, [c["metrics"] for c in cells["llm"]], e2e)}
        trials.append(t)
        return t

    result: Dict[str, Any] = {"qtype": qtype, "budget": [b.text for b in bounds], "objective": "smallest bytes",
                              "ranking": [r["group"] for r in rows], "trials_end_to_end": needs_e2e,
                              "keep_type": keep_type}
    f32 = trial([])
    uniform = trial(order)
    if not f32["ok"]:
        result.update(status="unmet", spec=None, chosen=f32,
                      why="even the F32 model misses the budget: no mix can meet it")
    elif uniform["ok"]:
        result.update(status="uniform", spec=qtype, chosen=uniform, why=f"uniform {qtype} already meets the budget")
    else:
        chosen: List[Tuple[str, str]] = []
        second: List[Tuple[str, str]] = []
        best = f32
        for role, group in tqdm(order, desc="budget greedy", unit="group", disable=not progress):
            t = trial([*chosen, (role, group)], second)
            if t["ok"]:
                chosen.append((role, group))
                best = t
            elif keep_type is not None:
                t = trial(chosen, [*second, (role, group)])
                if t["ok"]:
                    second.append((role, group))
                    best = t
        if not chosen and not second:
            result.update(status="nothing quantized", spec=None, chosen=f32,
                          why=f"no group of {qtype}{' or ' + keep_type if keep_type else ''} can be quantized "
                              "within the budget: keep F32 (or F16)")
        else:
            kept = [g for g in order if g not in chosen and g not in second]
            base = qtype if chosen else keep_type
            spec = (mix_spec(qtype, kept, also={keep_type: second} if second else None) if chosen
                    else mix_spec(keep_type, kept))
            result.update(status="mix", spec=spec, chosen=best,
                          why=f"{len(chosen)} of {len(order)} groups at {qtype}"
                              + (f", {len(second)} at {keep_type}" if second else "") + ", the rest F32"
                              + ("" if base == qtype else f" (base {keep_type})"))
    result["trials"] = trials
    result["sensitivity_bytes"] = {g: by_name[g]["bytes"] for g in by_name}
    write_json(paths.root / RECOMMENDATION_FILE, result)
    return result


def load(out: Path) -> Optional[Dict[str, Any]]:
    path = Path(out) / RECOMMENDATION_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _cells(out: Path, component: str, variant: str) -> List[Dict[str, Any]]:
    from kimia_edge.quantization.study.run import load_cells

    return [c for c in load_cells(out) if c["component"] == component and c["variant"] == variant
            and "unavailable" not in c]


def measured(out: Path, rec: Dict[str, Any]) -> Dict[str, Any]:
    """The recommended spec's own study cells against the budget: {"spec", "bytes", "ok", "values" (each bound),
    "llm" {"ok", "values"} (LLM bounds, None without), "e2e" {"variant", "ok", "values" (e2e bounds), "means"
    (every e2e metric)}}. The spec is F32 when nothing may be quantized: its LLM figures are the F32 trial's (the
    F32 export against itself), its end-to-end cells the ``fp32@F32`` floor."""
    from kimia_edge.quantization.study.spec import E2E, LLM

    bounds = parse_budget(",".join(rec["budget"]))
    spec = rec["spec"] or "F32"
    variant = f"{E2E_ONNX}@{spec}"
    e2e = [c["metrics"] for c in _cells(out, E2E, variant)]
    if spec == "F32":
        llm_values = {b.text: rec["trials"][0]["values"][b.text] for b in bounds if not b.e2e}
        nbytes, llm = rec["trials"][0]["bytes"], None
    else:
        cells = _cells(out, LLM, spec)
        llm = [c["metrics"] for c in cells]
        llm_values = within([b for b in bounds if not b.e2e], llm)["values"] if any(not b.e2e for b in bounds) else {}
        nbytes = cells[0]["cost"]["bytes"]
    e2e_bounds = [b for b in bounds if b.e2e]
    e2e_values = within(e2e_bounds, [], e2e)["values"] if e2e and e2e_bounds else {}
    values = {b.text: (e2e_values.get(b.text, float("nan")) if b.e2e else llm_values[b.text]) for b in bounds}
    check = lambda bs: all(_OPS[b.op](values[b.text], b.value) for b in bs)  # noqa: E731
    return {"spec": spec, "bytes": nbytes, "ok": check(bounds), "values": values,
            "llm": {"ok": check([b for b in bounds if not b.e2e]), "values": llm_values} if llm or spec == "F32"
            else None,
            "e2e": {"variant": variant, "clips": len(e2e), "ok": check(e2e_bounds), "values": e2e_values,
                    "means": e2e_means(e2e) if e2e else None}}


def study_with_budget(snapshot: Path, audio: Path, out: Path, qtype: str, budget: Optional[str], *,
                      variants: Optional[str] = None, progress: bool = True, keep_type: Optional[str] = None,
                      **kw: Any) -> Optional[Dict[str, Any]]:
    """``kimia-edge study --sensitivity TYPE [--budget SPEC]``: the study with ``llm=TYPE`` and its end-to-end row
    ``e2e:fp32@TYPE`` (with the end-to-end floors) added, the per-group sensitivity at TYPE (LLM and end-to-end
    cells), and with a budget the recommendation, whose spec is then measured as an ordinary LLM variant (the
    exporter's path) and as the end-to-end cell ``e2e:fp32@SPEC`` beside the uniform rows; ``measured`` (see
    :func:`measured`) says whether those cells meet the budget."""
    from kimia_edge.quantization.study.run import run_study

    keep = f"llm={keep_type}" if budget is not None and keep_type not in (None, "F32") else None
    run_study(snapshot, audio, out, variants=",".join(filter(None, [variants, f"llm={qtype}", keep,
                                                                    f"e2e:{E2E_ONNX}@{qtype}"])),
              progress=progress, **kw)
    if budget is None:
        measure_layers(out, qtype, progress=progress, snapshot=snapshot)
        return None
    rec = recommend(out, qtype, budget, progress=progress, snapshot=snapshot,
                    keep_type=keep_type if keep_type != "F32" else None)
    spec = rec["spec"] or "F32"
    run_study(snapshot, audio, out, variants=",".join(filter(None, [f"llm={spec}" if spec != "F32" else "",
                                                                    f"e2e:{E2E_ONNX}@{spec}"])),
              progress=progress, **kw)
    rec["measured"] = measured(out, rec)
    write_json(Path(out) / RECOMMENDATION_FILE, rec)
    return rec


def study_sensitivity(snapshot: Path, audio: Path, out: Path, items: Sequence[str], budget: Optional[str], *,
                      variants: Optional[str] = None, progress: bool = True, keep_type: Optional[str] = None,
                      **kw: Any) -> Optional[Dict[str, Any]]:
    """``kimia-edge study --sensitivity ITEMS [--budget SPEC [--budget-keep TYPE]]``: each item is an ONNX graph (its
    blocks int8 one at a time, ``onnx_blocks.py``) or a llama.cpp type (the LLM's groups, ``study_with_budget``; with
    a budget, the recommendation at that type, Q4_K_M if no type is named, ``keep_type`` the second type of its
    greedy). Returns the recommendation (None without budget)."""
    from kimia_edge.quantization.study.onnx_blocks import PRECISION, measure_blocks
    from kimia_edge.quantization.study.run import run_study
    from kimia_edge.runtime.spec.graphs import ONNX_GRAPHS

    items = [i.strip() for i in items if i.strip()]
    graphs = [i for i in items if i in ONNX_GRAPHS]
    qtypes = [i for i in items if i not in ONNX_GRAPHS] or (["Q4_K_M"] if budget else [])
    if graphs:  # with the end-to-end floor: its golden turns are the reference of the blocks' end-to-end cells
        run_study(snapshot, audio, out, variants=",".join([*filter(None, [variants]), *(f"{g}={PRECISION}"
                                                                                         for g in graphs),
                                                           f"e2e:{E2E_ONNX}@F32"]),
                  progress=progress, **kw)
        for g in graphs:
            measure_blocks(out, snapshot, g, e2e=True)
    rec = None
    for i, q in enumerate(qtypes):
        rec = study_with_budget(snapshot, audio, out, q, budget if i == 0 else None, variants=variants,
                                progress=progress, keep_type=keep_type if i == 0 else None, **kw) or rec
    return rec


def _num(v: Optional[float], f: str = ".3g") -> str:
    """A table cell: ``v`` formatted, a dash when there is no value."""
    return "–" if v is None else format(v, f)


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def markdown_section(report: Dict[str, Any]) -> List[str]:
    """report.md lines for the sensitivity ranking(s) and the recommendation (empty when neither was run)."""
    lines: List[str] = []
    for qtype, rows in report.get("sensitivity", {}).items():
        lines += [f"## LLM per-group sensitivity at {qtype}", "",
                  f"One tensor group from the {qtype} files, every other tensor F32 (`gguf_mix`), measured by the LLM "
                  "cells and end to end (the runtime Pipeline over fp32 graphs and that GGUF vs the golden torch "
                  "pipeline). Ranked least sensitive first (the order the budget greedy quantizes in) by the "
                  "end-to-end impact = (1 − audio-token agreement) + WER of the turn, ties (greedy turns often do "
                  "not change at all) broken by the KLD impact = text + audio mean KLD (nats).", "",
                  "| group | e2e impact | e2e audio tokens | e2e text tokens | e2e WER | e2e steps | KLD impact | "
                  "text mean KLD | audio mean KLD | text top-1 | audio top-1 | greedy steps | MB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['group']} | {_num(r.get('e2e_impact'))} | {_pct(r.get('e2e_audio_token_agreement'))} | "
                  f"{_pct(r.get('e2e_text_token_agreement'))} | {_num(r.get('e2e_wer'))} | "
                  f"{_num(r.get('e2e_greedy_steps'), '.1f')} | {r['impact']:.3g} | {r['text_mean_kld']:.3g} | "
                  f"{r['audio_mean_kld']:.3g} | {100 * r['text_top1']:.1f} % | {100 * r['audio_top1']:.1f} % | "
                  f"{r['greedy_agreement_steps']:.1f} | {r['bytes'] / 1e6:.2f} |" for r in rows]
        lines += ["", f"![sensitivity {qtype}](sensitivity_{qtype}.png)", ""]
    for graph, rows in report.get("sensitivity_blocks", {}).items():
        lines += [f"## {graph}: per-block sensitivity at int8_dynamic", "",
                  f"One block's MatMul / Gemm / Conv nodes int8 (ONNX Runtime `quantize_dynamic`, "
                  f"`nodes_to_quantize`), the rest fp32 (`other` = the nodes outside every block), measured by the "
                  f"graph cell (impact = {rows[0]['metric'] if rows else 'headline'}) and end to end (that graph as "
                  "the bundle's int8_dynamic, every other graph fp32, the F32 GGUF, vs the golden pipeline). Ranked "
                  "least sensitive first by e2e impact = (1 − audio-token agreement) + WER, then the speech's "
                  "MR-STFT distance, then the component impact.", "",
                  "| block | e2e impact | e2e audio tokens | e2e WER | e2e speech MR-STFT | e2e PESQ | impact | MB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['group']} | {_num(r.get('e2e_impact'))} | {_num(r.get('e2e_audio_token_agreement'), '.1%')} | "
                  f"{_num(r.get('e2e_wer'))} | {_num(r.get('e2e_mrstft'), '.4g')} | {_num(r.get('e2e_pesq'))} | "
                  f"{r['impact']:.4g} | {r['bytes'] / 1e6:.3f} |" for r in rows]
        lines += ["", f"![{graph} blocks](sensitivity_{graph}.png)", ""]
    rec = report.get("recommendation")
    if rec:
        lines += ["## Recommendation under the budget", "",
                  f"Budget {', '.join(f'`{b}`' for b in rec['budget'])} (means over clips), objective: "
                  f"{rec['objective']}, quant type {rec['qtype']}: **{rec['status']}** — {rec['why']}.", ""]
        if rec.get("spec"):
            lines += [f"Spec (`kimia-edge export --llm-quants '{rec['spec']}'`, measured above as the LLM row of "
                      f"that name): `{rec['spec']}`.", ""]
        measured = rec.get("measured") or rec["chosen"]
        lines += [f"Measured ({'the study cells of `' + measured['spec'] + '`' if 'spec' in measured else 'trial'}"
                  f"): {measured['bytes'] / 1e6:.2f} MB, " + ", ".join(
            f"{k} = {v:.4g}" for k, v in measured["values"].items()) + f" → {'meets' if measured['ok'] else 'misses'} "
            "the budget.", ""]
        means = (measured.get("e2e") or {}).get("means")
        if means:
            lines += [f"End to end (`e2e:{measured['e2e']['variant']}`, beside the uniform `e2e:fp32@{rec['qtype']}` "
                      "row of the end-to-end table): "
                      + ", ".join(f"{k} = {_num(v, '.4g')}" for k, v in means.items()) + ".", ""]
        lines += [f"Greedy trials ({'LLM and end-to-end' if rec.get('trials_end_to_end') else 'LLM'} cells of each "
                  "assembled mix):", "",
                  "| trial | groups quantized | MB | " + " | ".join(rec["budget"]) + " | within |",
            "|---:|---:|---:|" + "---:|" * len(rec["budget"]) + "---|"]
        lines += [f"| {i} | {len(t['quantized'])}"
                  + (f" + {len(t['at_keep_type'])} at {rec['keep_type']}" if t.get("at_keep_type") else "")
                  + f" | {t['bytes'] / 1e6:.2f} | "
                  + " | ".join(f"{v:.4g}" for v in t["values"].values()) + f" | {'yes' if t['ok'] else 'no'} |"
                  for i, t in enumerate(rec["trials"])]
        lines.append("")
    return lines


def report_sections(out: Path) -> Dict[str, Any]:
    """report.json's "sensitivity" ({quant type: ranking}) and "recommendation", for those that were run."""
    from kimia_edge.quantization.study.sensitivity import SENSITIVITY_DIR, ranking

    qtypes = sorted({p.name.split("__")[1].split("@")[0]
                     for p in (Path(out) / SENSITIVITY_DIR).glob("llm__*@*.json")})
    sections: Dict[str, Any] = {"sensitivity": {q: ranking(out, q) for q in qtypes}} if qtypes else {}
    graphs = sorted({p.name.split("__")[0] for p in (Path(out) / SENSITIVITY_DIR).glob("*@*.json")} - {"llm", "e2e"})
    if graphs:
        from kimia_edge.quantization.study.onnx_blocks import block_ranking

        sections["sensitivity_blocks"] = {g: block_ranking(out, g) for g in graphs}
    rec = load(out)
    if rec is not None:
        sections["recommendation"] = rec
    return sections


def plot_sections(report: Dict[str, Any], folder: Path, label: str = "") -> List[Path]:
    """sensitivity_<TYPE>.png per ranking in ``report``."""
    from kimia_edge.quantization.study.onnx_blocks import PRECISION
    from kimia_edge.quantization.study.sensitivity import plot_bars

    written = [plot_bars(rows, q, Path(folder) / f"sensitivity_{q}.png", label)
               for q, rows in report.get("sensitivity", {}).items()]
    for graph, rows in report.get("sensitivity_blocks", {}).items():
        written.append(plot_bars(rows, PRECISION, Path(folder) / f"sensitivity_{graph}.png",
                                 f"{graph} {label}".strip(), series=(("impact", "this block int8"),),
                                 ylabel=rows[0]["metric"] if rows else "",
                                 e2e_series=(("e2e_audio_token_agreement", "1 − audio-token agreement", True),
                                             ("e2e_wer", "WER", False), ("e2e_mrstft", "speech MR-STFT", False)),
                                 e2e_ylabel="end to end"))
    return written
