"""Per-block ONNX sensitivity (quantization/study/onnx_blocks.py) on the tiny DiT step from the session bundle: the
blocks come from the graph's own module scopes, a block's variant quantizes that block's nodes and no other, and
every block gets a measured, finite, non-zero impact in the report, and an end-to-end cell with the one-block graph
in the bundle."""
from __future__ import annotations

import json
import math

import onnx


def test_dit_blocks_one_at_a_time(tiny_snapshot, tiny_bundle, one_clip_audio, tmp_path):
    from kimia_edge.quantization.study.onnx_blocks import graph_blocks, measure_blocks, quantize_block
    from kimia_edge.quantization.study.report import write_report
    from kimia_edge.quantization.study.run import StudyPaths, run_study

    audio = one_clip_audio
    out = tmp_path / "report"
    # the end-to-end floor brings the golden turns the blocks' end-to-end cells compare against
    run_study(tiny_snapshot, audio, out, variants="dit_step=int8_dynamic,e2e:fp32@F32", bundle=tiny_bundle,
              steps=8, progress=False)
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

    rows = measure_blocks(out, tiny_snapshot, "dit_step", e2e=True)
    assert {r["group"] for r in rows} == set(blocks)
    assert all(math.isfinite(r["impact"]) and r["impact"] > 0 for r in rows)
    # end to end: the DiT is downstream of the LLM, so the tokens and words stay and only the speech moves (more
    # than the fp32 runtime's own 1e-6); the ranking follows (e2e impact, speech MR-STFT, component impact)
    floor = json.loads(next((out / "cells").glob("e2e__fp32@F32__*.json")).read_text())["metrics"]
    for r in rows:
        cell = json.loads(next((out / "sensitivity").glob(f"e2e__dit_step=int8_dynamic@{r['group']}__*.json"))
                          .read_text())["metrics"]
        assert r["e2e_impact"] == 0 and cell["audio_token_agreement"] == 1 and cell["wer"] == 0
        assert r["e2e_mrstft"] == cell["speech_mrstft"]["total"] > 10 * floor["speech_mrstft"]["total"]
    keys = [(r["e2e_impact"], r["e2e_mrstft"], r["impact"]) for r in rows]
    assert keys == sorted(keys)
    assert not [p for p in (out / "cache" / "bundles").iterdir() if p.name.startswith("blocks+")]
    report = write_report(out)
    assert [r["group"] for r in report["sensitivity_blocks"]["dit_step"]] == [r["group"] for r in rows]
    assert (out / "sensitivity_dit_step.png").stat().st_size > 0
