"""Per-block sensitivity of an ONNX graph (issue [Q] item 5): one transformer block int8 at a time, the rest fp32.

The blocks are read from the graph itself: torch's exporter records each node's module scopes
(``pkg.torch.onnx.name_scopes``), so ``dit.blocks.3`` (DiT step) or ``encoder.layers.5`` (Whisper encoder) names the
MatMul / Gemm / Conv nodes of one block; nodes outside every block form ``other``. For each block, ONNX Runtime's
``quantize_dynamic`` (the ``int8_dynamic`` precision's settings, ``quantization/variants.py``) quantizes only that
block's nodes (``nodes_to_quantize``; the rest stays fp32, the same as excluding it). The variant
``int8_dynamic@<block>`` is measured by the study's own graph cell (``run.graph_cell``: the component's usual
metrics against the torch reference) and stored as ``REPORT/sensitivity/<graph>__int8_dynamic@<block>__<clip>.json``.
Impact = the component's headline error (``report.HEADLINE``: mel L1 over the stream for the DiT step).

With ``e2e`` (the study has end-to-end references), each block's graph also gets an end-to-end cell while it exists:
the runtime Pipeline over a bundle whose ``<graph>`` int8_dynamic artifact is that one-block graph (mix
``fp32,<graph>=int8_dynamic@F32``: every other graph fp32, the F32 GGUF), against the golden torch pipeline, stored
as ``REPORT/sensitivity/e2e__<graph>=int8_dynamic@<block>__<clip>.json``. The blocks are then ranked by
(e2e impact = (1 - audio-token agreement) + WER, the speech's MR-STFT distance, the component impact): a graph
upstream of the LLM (the encoders) can change the tokens, one downstream (DiT, vocoder) only the speech.

The unit of an ONNX mix that ``kimia-edge export`` / ``--precision`` accepts stays the graph
(``fp32,dit_step=int8_dynamic``): the ranking says which blocks carry a graph's int8 loss, it is not exported per
block.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from kimia_edge.quantization.study.run import StudyPaths, graph_cell, write_json
from kimia_edge.quantization.study.sensitivity import SENSITIVITY_DIR, e2e_impact, e2e_means
from kimia_edge.runtime.spec.precisions import INT8_DYNAMIC
from kimia_edge.quantization.study.spec import E2E, Cell, StudyVariant

__all__ = ["PRECISION", "graph_blocks", "quantize_block", "measure_blocks", "block_ranking", "e2e_variant",
           "e2e_mix"]

PRECISION = INT8_DYNAMIC
_BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers)\.\d+$")
_QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")  # the ops variants.to_int8_dynamic quantizes


def graph_blocks(path: Path) -> Dict[str, List[str]]:
    """{block scope: names of its MatMul / Gemm / Conv nodes} in graph order, ``other`` for the rest."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out: Dict[str, List[str]] = {}
    for node in model.graph.node:
        if node.op_type not in _QUANTIZED_OPS:
            continue
        props = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
        block = next((s for s in scopes if _BLOCK.search(s)), "other")
        out.setdefault(block, []).append(node.name)
    return out


def quantize_block(src: Path, dst: Path, nodes: Sequence[str], signed_weights: bool = True) -> Path:
    """``src`` with only ``nodes`` quantized as the ``int8_dynamic`` precision does (see variants.to_int8_dynamic)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from kimia_edge.export.fileio import external_data_file, unshared_graph

    weights = dict(weight_type=QuantType.QInt8, per_channel=True, reduce_range=True) if signed_weights \
        else dict(weight_type=QuantType.QUInt8)
    with unshared_graph(src) as readable:
        quantize_dynamic(str(readable), str(dst), op_types_to_quantize=list(_QUANTIZED_OPS),
                         nodes_to_quantize=list(nodes), use_external_data_format=external_data_file(src).exists(),
                         **weights)
    return dst


def e2e_variant(graph: str, block: str) -> StudyVariant:
    """The end-to-end cell of one block's graph (its name, not a mix: ``e2e_mix`` is what runs)."""
    return StudyVariant(E2E, f"{graph}={PRECISION}@{block}")


def e2e_mix(graph: str) -> str:
    """The mix a one-block cell runs: that graph at int8_dynamic (the one-block file), the rest fp32, F32 GGUF."""
    return f"fp32,{graph}={PRECISION}@F32"


def measure_blocks(out: Path, snapshot: Path, graph: str, clips: Optional[Sequence[str]] = None,
                   e2e: bool = False) -> List[Dict]:
    """Every block of ``graph`` int8 alone, measured per clip (resumes); returns ``block_ranking``. The study must
    hold the graph (its fp32 export and references: ``--variants GRAPH=int8_dynamic``) and, with ``e2e``, the
    end-to-end references (an ``e2e:`` mix, e.g. ``e2e:fp32@F32``)."""
    import shutil

    from tqdm import tqdm

    from kimia_edge.export.graphs import graph_spec
    from kimia_edge.quantization.study.end_to_end import e2e_cell, write_mix_bundle

    paths = StudyPaths(out)
    clips = list(clips or json.loads(paths.config.read_text())["clips"])
    fp32 = paths.graph(graph, "fp32")
    if not fp32.exists():
        raise FileNotFoundError(f"{fp32}: the study holds no {graph} graph (add --variants {graph}={PRECISION})")
    signed = graph_spec(graph).int8_dynamic_signed_weights
    folder = paths.root / SENSITIVITY_DIR
    for block, nodes in tqdm(graph_blocks(fp32).items(), desc=f"{graph} blocks", unit="block"):
        v, ev = StudyVariant(graph, f"{PRECISION}@{block}"), e2e_variant(graph, block)
        todo = [c for c in clips if not (folder / f"{Cell(v, c).key}.json").exists()]
        todo_e2e = [c for c in clips if e2e and not (folder / f"{Cell(ev, c).key}.json").exists()]
        if not todo and not todo_e2e:
            continue
        target = paths.graph(graph, v.name)
        quantize_block(fp32, target, nodes, signed)
        bundle = paths.root / "cache" / "bundles" / f"blocks+{graph}+{block}"
        try:
            for c in todo:
                cell = graph_cell(paths, snapshot, Cell(v, c))
                cell.update(component=graph, variant=v.name, clip=c, block=block, nodes=len(nodes))
                write_json(folder / f"{Cell(v, c).key}.json", cell)
            if todo_e2e:
                shutil.rmtree(bundle, ignore_errors=True)  # a bundle of an interrupted run may hold another file
                write_mix_bundle(paths, snapshot, e2e_mix(graph), out=bundle, graphs={graph: target})
            for c in todo_e2e:
                cell = e2e_cell(paths, Cell(ev, c), mix=e2e_mix(graph), bundle=bundle)
                cell.update(component=E2E, variant=ev.name, clip=c, block=block, graph=graph, nodes=len(nodes))
                write_json(folder / f"{Cell(ev, c).key}.json", cell)
        finally:
            target.unlink(missing_ok=True)
            shutil.rmtree(bundle, ignore_errors=True)
    return block_ranking(out, graph)


def block_ranking(out: Path, graph: str) -> List[Dict[str, Any]]:
    """[{group, impact, bytes, clips}] of the stored one-block cells of ``graph``, least sensitive first."""
    from kimia_edge.quantization.study.report import HEADLINE

    cells: Dict[str, List[Dict[str, Any]]] = {}
    for p in sorted((Path(out) / SENSITIVITY_DIR).glob(f"{graph}__{PRECISION}@*.json")):
        c = json.loads(p.read_text())
        cells.setdefault(c["block"], []).append(c)
    e2e_cells: Dict[str, List[Dict[str, Any]]] = {}
    for p in sorted((Path(out) / SENSITIVITY_DIR).glob(f"{E2E}__{graph}={PRECISION}@*.json")):
        c = json.loads(p.read_text())
        e2e_cells.setdefault(c["block"], []).append(c)
    rows = []
    for block, cs in cells.items():
        vals = []
        for c in cs:
            m = c["metrics"]
            for k in HEADLINE[graph][0]:
                m = m[k]
            vals.append(float(m))
        es = [c["metrics"] for c in e2e_cells.get(block, [])]
        es = es if len(es) == len(cs) else []  # a block's e2e figures count once every clip has one
        rows.append({"group": block, "impact": sum(vals) / len(vals), "bytes": cs[0]["cost"]["bytes"],
                     "clips": len(cs), "metric": HEADLINE[graph][1],
                     "e2e_impact": e2e_impact(es) if es else None, **(e2e_means(es) if es else {})})
    return sorted(rows, key=lambda r: (r["e2e_impact"] is None, r["e2e_impact"] or 0.0,
                                       r.get("e2e_mrstft") or 0.0, r["impact"], r["group"]))
