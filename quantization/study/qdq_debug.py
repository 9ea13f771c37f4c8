"""Per-tensor error of the static int8 (QDQ) variants, by ONNX Runtime's own debugging tools
(``onnxruntime.quantization.qdq_loss_debug``), opt-in (``kimia-edge study --qdq-debug``).

For each int8_qdq* variant of a graph (the registry's precisions with ``needs_calibration``), on the first
``DEBUG_FEEDS`` reference feeds of one clip (the first clip id in sorted order): both graphs are augmented so that
every float tensor is an output (``modify_model_output_intermediate_tensors``), run on the feeds
(``collect_activations``), matched (``create_activation_matching``) and compared (``compute_activation_error``):

- ``xmodel_err``: SQNR (dB) of the QDQ model's dequantized tensor against the float model's tensor of that name
  (the error accumulated up to that point);
- ``qdq_err``: SQNR (dB) of that tensor before vs after its own QuantizeLinear / DequantizeLinear pair (the error the
  activation's scale adds there);
- weights: SQNR (dB) of each dequantized weight against the float one (``compute_weight_error``).

ORT's SQNR is 20 log10(|x| / max(|x - y|, eps)): identical tensors give about 313 dB, not infinity. Lower is worse.

Stored as ``qdq_debug/<graph>__<variant>__<clip>.json`` (atomic, one per variant; a re-run skips the stored ones),
each computed in a child process (run.run_child: a graph too large for the machine is reported, not fatal). All
activations of the feeds are held in memory, twice: that is why only a few feeds are used.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from kimia_edge.export.fileio import unshared_graph

__all__ = ["DEBUG_FEEDS", "WORST", "tensor_errors", "prepare_qdq_debug", "report_section", "markdown_section",
           "plot"]

log = logging.getLogger(__name__)

DEBUG_FEEDS = 1  # reference feeds of the clip run through both augmented graphs (tiny vocoder, 2 feeds: ~3 GB RSS)
WORST = 10       # tensors per variant in report.json / report.md / the bar charts


def _graph_inputs(model: Path) -> List[str]:
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


def _collect(model: Path, feeds: Sequence[Dict[str, np.ndarray]], workdir: Path) -> Dict[str, List[np.ndarray]]:
    """Every float tensor of ``model`` on each feed: {tensor name: [array per feed]}."""
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    from kimia_edge.export.fileio import external_data_file

    workdir.mkdir(parents=True, exist_ok=True)
    augmented = workdir / f"{model.stem}.augmented.onnx"
    modify_model_output_intermediate_tensors(str(model), str(augmented),
                                             save_as_external_data=external_data_file(model).exists())
    names = _graph_inputs(model)
    try:
        return collect_activations(str(augmented), [{n: f[n] for n in names} for f in feeds])
    finally:
        for p in workdir.glob(f"{augmented.name}*"):
            p.unlink()


def tensor_errors(float_model: Path, other_model: Path, feeds: Sequence[Dict[str, np.ndarray]],
                  workdir: Path) -> Dict[str, Any]:
    """{"activations": {tensor: {"xmodel_err", "qdq_err" (dB), "op": the float graph's op making it}}, "weights":
    {weight: dB}} of ``other_model`` (a QDQ
    graph) against ``float_model`` on ``feeds``. A model without QDQ pairs (e.g. the float model itself, the
    known-answer case) is compared tensor by tensor of the same name."""
    from onnxruntime.quantization.qdq_loss_debug import (compute_activation_error, compute_weight_error,
                                                         create_activation_matching, create_weight_matching)

    with unshared_graph(Path(float_model)) as fm, unshared_graph(Path(other_model)) as om:
        float_acts = _collect(fm, feeds, workdir)
        other_acts = _collect(om, feeds, workdir)
        weights = {n: float(v) for n, v in compute_weight_error(create_weight_matching(str(fm), str(om))).items()}
    match = create_activation_matching(other_acts, float_acts)
    if not match:
        match = {n: {"pre_qdq": a, "post_qdq": a, "float": float_acts[n]} for n, a in other_acts.items()
                 if n in float_acts}
    # only tensors seen on both sides of their QDQ pair and in the float model (ORT's function needs all three)
    match = {n: m for n, m in match.items() if m.get("float") is not None and m.get("pre_qdq") is not None
             and m.get("post_qdq") is not None}
    import onnx

    producer = {o: n.op_type for n in onnx.load(str(float_model), load_external_data=False).graph.node
                for o in n.output}
    acts = {n: {**{k: float(v) for k, v in e.items()}, "op": producer.get(n, "input")}
            for n, e in compute_activation_error(match).items()}
    return {"activations": acts, "weights": weights}


def _debug_path(root: Path, component: str, variant: str, clip: str) -> Path:
    return Path(root) / "qdq_debug" / f"{component}__{variant}__{clip}.json"


def debug_child(out: str, component: str, variant: str, clip: str, workdir: str) -> None:
    """The child's side: computes one variant's tensor errors and stores them atomically."""
    import time

    from kimia_edge.quantization.study.run import STUDY_VERSION, StudyPaths, _load_pickle, write_json

    paths = StudyPaths(Path(out))
    feeds = _load_pickle(paths.reference(clip, component))["feeds"][:DEBUG_FEEDS]
    start = time.perf_counter()
    errors = tensor_errors(paths.graph(component, "fp32"), paths.graph(component, variant), feeds, Path(workdir))
    write_json(_debug_path(paths.root, component, variant, clip),
               {"component": component, "variant": variant, "clip": clip, "feeds": len(feeds),
                "seconds": time.perf_counter() - start, "version": STUDY_VERSION, **errors})


def prepare_qdq_debug(paths, variants, clips: Sequence[str], memory_mib: Optional[int] = None) -> int:
    """Stores the tensor errors of every QDQ variant made in this study that has none yet; returns how many were
    computed. A child that fails stores the reason instead (a re-run tries again)."""
    import shutil

    from kimia_edge.quantization.study.run import run_child, write_json
    from kimia_edge.quantization.study.spec import E2E, LLM
    from kimia_edge.runtime.spec.precisions import onnx_precision

    if not clips:
        return 0
    clip = sorted(clips)[0]
    done = 0
    for v in variants:
        if v.component in (LLM, E2E) or v.floor or not onnx_precision(v.name).needs_calibration:
            continue
        target = _debug_path(paths.root, v.component, v.name, clip)
        if target.exists() and "unavailable" not in json.loads(target.read_text()):
            continue
        if not paths.graph(v.component, v.name).exists():
            continue  # not made (its cells say why)
        work = target.parent / f".work-{target.stem}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            why = run_child(f"{__name__}:debug_child", [str(paths.root), v.component, v.name, clip, str(work)],
                            tmpdir=work / "tmp", memory_mib=memory_mib)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if why is not None:
            log.warning("%s: no per-tensor error (%s)", v.label, why)
            write_json(target, {"component": v.component, "variant": v.name, "clip": clip, "unavailable": why})
        done += 1
    return done


def _worst(errors: Dict[str, Any], key: str, n: int) -> List[Dict[str, Any]]:
    rows = [{"tensor": t, **e} for t, e in errors.items() if e.get(key) is not None]
    return sorted(rows, key=lambda r: r[key])[:n]


def report_section(out: Path, n: int = WORST) -> Dict[str, Any]:
    """report.json's "qdq_debug": per "graph=variant" the clip, the tensor count and the ``n`` tensors of lowest
    xmodel SQNR (and the ``n`` worst weights), or why it was not computed."""
    section: Dict[str, Any] = {}
    for p in sorted((Path(out) / "qdq_debug").glob("*.json")):
        d = json.loads(p.read_text())
        label = f"{d['component']}={d['variant']}"
        if "unavailable" in d:
            section[label] = {"clip": d["clip"], "unavailable": d["unavailable"]}
            continue
        weights = {t: {"sqnr_db": e} for t, e in d["weights"].items()}
        section[label] = {"clip": d["clip"], "feeds": d["feeds"], "seconds": d["seconds"],
                          "tensors": len(d["activations"]), "weights": len(weights),
                          "worst": _worst(d["activations"], "xmodel_err", n),
                          "worst_weights": _worst(weights, "sqnr_db", n)}
    return section


def _db(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.1f}"


def markdown_section(report: Dict[str, Any]) -> List[str]:
    section = report.get("qdq_debug") or {}
    if not section:
        return []
    lines = ["## Per-tensor error of the static int8 (QDQ) variants", "",
             "ONNX Runtime's `qdq_loss_debug` on the first feeds of one clip: SQNR in dB (lower is worse; identical "
             "tensors give about 313 dB). xmodel = the QDQ model's tensor vs the float model's; qdq = the tensor "
             "before vs after its own QuantizeLinear / DequantizeLinear.", ""]
    for label, s in section.items():
        if "unavailable" in s:
            lines += [f"**{label}**: not computed ({s['unavailable']}).", ""]
            continue
        lines += [f"**{label}** (clip {s['clip']}, {s['feeds']} feeds, {s['tensors']} tensors, {s['seconds']:.1f} s):",
                  "", "| tensor | xmodel SQNR dB | qdq SQNR dB |", "|---|---:|---:|"]
        lines += [f"| `{r['tensor']}` ({r.get('op', '?')}) | {_db(r['xmodel_err'])} | {_db(r['qdq_err'])} |"
                  for r in s["worst"]]
        if s["worst_weights"]:
            lines += ["", "Worst weights: " + ", ".join(f"`{r['tensor']}` {_db(r['sqnr_db'])} dB"
                                                        for r in s["worst_weights"][:5]) + "."]
        lines.append("")
    return lines


def plot_names(report: Dict[str, Any]) -> List[str]:
    graphs = {label.split("=")[0] for label, s in (report.get("qdq_debug") or {}).items() if "worst" in s}
    return [f"qdq_tensors_{g}.png" for g in sorted(graphs)]


def plot(report: Dict[str, Any], folder: Path, label: str = "") -> List[Path]:
    """qdq_tensors_<graph>.png: per QDQ variant of the graph, a bar chart of its worst tensors' SQNR (both kinds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    section = {k: s for k, s in (report.get("qdq_debug") or {}).items() if "worst" in s}
    written = []
    for name in plot_names(report):
        graph = name[len("qdq_tensors_"):-len(".png")]
        rows = [(k, s) for k, s in section.items() if k.split("=")[0] == graph]
        height = 0.3 * sum(len(s["worst"]) for _, s in rows) + 1.2 * len(rows)  # inches
        fig, axes = plt.subplots(len(rows), 1, figsize=(8, height), squeeze=False)
        for ax, (k, s) in zip(axes[:, 0], rows):
            names = [f"{r['tensor'][-32:]} ({r.get('op', '?')})" for r in s["worst"]]
            y = np.arange(len(names))
            cap = lambda v: min(v, 320.0)  # noqa: E731 - identical tensors: ORT's eps-capped ~313 dB
            ax.barh(y - 0.2, [cap(r["xmodel_err"]) for r in s["worst"]], height=0.4, label="xmodel")
            ax.barh(y + 0.2, [cap(r["qdq_err"]) for r in s["worst"]], height=0.4, label="qdq")
            ax.set_yticks(y, names, fontsize=6)
            ax.invert_yaxis()
            ax.set(xlabel="SQNR dB (lower is worse)", title=f"{k}: worst tensors {label}".strip())
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(folder / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
