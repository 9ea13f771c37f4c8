"""Per-block ONNX sensitivity (quantization/study/onnx_blocks.py) on the tiny DiT step from the session bundle: the
blocks come from the graph's own module scopes, a block's variant quantizes that block's nodes and no other, and
every block gets a measured, finite, non-zero impact in the report."""
from __future__ import annotations

import math
import shutil

import onnx


def test_dit_blocks_one_at_a_time(tiny_snapshot, tiny_bundle, shared_audio, tmp_path):
    from kimia_edge.quantization.study.onnx_blocks import graph_blocks, measure_blocks, quantize_block
    from kimia_edge.quantization.study.report import write_report
    from kimia_edge.quantization.study.run import StudyPaths, run_study

    audio = tmp_path / "audio"
    audio.mkdir()
    shutil.copyfile(shared_audio / "qa_example.wav", audio / "qa_example.wav")
    out = tmp_path / "report"
    run_study(tiny_snapshot, audio, out, variants="dit_step=int8_dynamic", bundle=tiny_bundle, progress=False)
    fp32 = StudyPaths(out).graph("dit_step", "fp32")
    blocks = graph_blocks(fp32)
    depth = sum(1 for b in blocks if b.startswith("dit.blocks."))
    assert depth >= 2 and set(blocks) == {*(f"dit.blocks.{i}" for i in range(depth)), "other"}

    variant = quantize_block(fp32, tmp_path / "b0.onnx", blocks["dit.blocks.0"])
    ops = {n.name: n.op_type for n in onnx.load(str(variant)).graph.node}
    untouched = [n for b, names in blocks.items() if b != "dit.blocks.0" for n in names]
    # every other block stays fp32 (quantize_dynamic splits every Gemm into MatMul + Add, quantized or not)
    assert all(ops.get(n) in ("MatMul", "Gemm") or ops.get(f"{n}_MatMul") == "MatMul" for n in untouched)
    assert any(n not in ops for n in blocks["dit.blocks.0"])  # block 0's nodes were rewritten (MatMulInteger)

    rows = measure_blocks(out, tiny_snapshot, "dit_step")
    assert {r["group"] for r in rows} == set(blocks)
    assert all(math.isfinite(r["impact"]) and r["impact"] > 0 for r in rows)
    assert [r["impact"] for r in rows] == sorted(r["impact"] for r in rows)
    report = write_report(out)
    assert [r["group"] for r in report["sensitivity_blocks"]["dit_step"]] == [r["group"] for r in rows]
    assert (out / "sensitivity_dit_step.png").stat().st_size > 0
