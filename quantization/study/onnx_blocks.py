"""Per-block sensitivity of an ONNX graph (issue [Q] item 5): one transformer block int8 at a time, the rest fp32.

The blocks are read from the graph itself: torch's exporter records each node's module scopes
(``pkg.torch.onnx.name_scopes``), so ``dit.blocks.3`` (DiT step) or ``encoder.layers.5`` (Whisper encoder) names the
MatMul / Gemm / Conv nodes of one block; nodes outside every block form ``other``. For each block, ONNX Runtime's
``quantize_dynamic`` (the ``int8_dynamic`` precision's settings, ``quantization/variants.py``) quantizes only that
block's nodes (``nodes_to_quantize``; the rest stays fp32, the same as excluding it). The variant
``int8_dynamic@<block>`` is measured by the study's own graph cell (``run.graph_cell``: the component's usual
metrics against the torch reference) and stored as ``REPORT/sensitivity/<graph>__int8_dynamic@<block>__<clip>.json``.
Impact = the component's headline error (``report.HEADLINE``: mel L1 over the stream for the DiT step).

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
from kimia_edge.quantization.study.sensitivity import SENSITIVITY_DIR
from kimia_edge.runtime.spec.precisions import INT8_DYNAMIC
from kimia_edge.quantization.study.spec import Cell, StudyVariant

__all__ = ["PRECISION", "graph_blocks", "quantize_block", "measure_blocks", "block_ranking"]

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

    from kimia_edge.export.fileio import external_data_file

    weights = dict(weight_type=QuantType.QInt8, per_channel=True, reduce_range=True) if signed_weights \
        else dict(weight_type=QuantType.QUInt8)
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(_QUANTIZED_OPS), nodes_to_quantize=list(nodes),
                     use_external_data_format=external_data_file(src).exists(), **weights)
    return dst


def measure_blocks(out: Path, snapshot: Path, graph: str, clips: Optional[Sequence[str]] = None) -> List[Dict]:
    """Every block of ``graph`` int8 alone, measured per clip (resumes); returns ``block_ranking``. The study must
    hold the graph (its fp32 export and references: ``--variants GRAPH=int8_dynamic``)."""
    from tqdm import tqdm

    from kimia_edge.export.graphs import graph_spec

    paths = StudyPaths(out)
    clips = list(clips or json.loads(paths.config.read_text())["clips"])
    fp32 = paths.graph(graph, "fp32")
    if not fp32.exists():
        raise FileNotFoundError(f"{fp32}: the study holds no {graph} graph (add --variants {graph}={PRECISION})")
    signed = graph_spec(graph).int8_dynamic_signed_weights
    folder = paths.root / SENSITIVITY_DIR
    for block, nodes in tqdm(graph_blocks(fp32).items(), desc=f"{graph} blocks", unit="block"):
        v = StudyVariant(graph, f"{PRECISION}@{block}")
        todo = [c for c in clips if not (folder / f"{Cell(v, c).key}.json").exists()]
        if not todo:
            continue
        target = paths.graph(graph, v.name)
        quantize_block(fp32, target, nodes, signed)
        try:
            for c in todo:
                cell = graph_cell(paths, snapshot, Cell(v, c))
                cell.update(component=graph, variant=v.name, clip=c, block=block, nodes=len(nodes))
                write_json(folder / f"{Cell(v, c).key}.json", cell)
        finally:
            target.unlink(missing_ok=True)
    return block_ranking(out, graph)


def block_ranking(out: Path, graph: str) -> List[Dict[str, Any]]:
    """[{group, impact, bytes, clips}] of the stored one-block cells of ``graph``, least sensitive first."""
    from kimia_edge.quantization.study.report import HEADLINE

    cells: Dict[str, List[Dict[str, Any]]] = {}
    for p in sorted((Path(out) / SENSITIVITY_DIR).glob(f"{graph}__{PRECISION}@*.json")):
        c = json.loads(p.read_text())
        cells.setdefault(c["block"], []).append(c)
    rows = []
    for block, cs in cells.items():
        vals = []
        for c in cs:
            m = c["metrics"]
            for k in HEADLINE[graph][0]:
                m = m[k]
            vals.append(float(m))
        rows.append({"group": block, "impact": sum(vals) / len(vals), "bytes": cs[0]["cost"]["bytes"],
                     "clips": len(cs), "metric": HEADLINE[graph][1]})
    return sorted(rows, key=lambda r: (r["impact"], r["group"]))
