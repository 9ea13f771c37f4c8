"""Per-group LLM sensitivity and the --budget recommendation on a tiny LLM-only study (one clip, 8 steps): the
recommended mix meets every bound when the exporter's path makes it and the study measures it; a budget nothing
meets is reported as such; the budget syntax names what is wrong."""
from __future__ import annotations

import json
import shutil

import pytest

from kimia_edge.export.gguf_quantize import QUANT_TYPES
from kimia_edge.quantization.gguf_mix import parse_mix, tensor_group
from kimia_edge.quantization.study.budget import METRICS, mix_spec, parse_budget

# On the tiny snapshot (8 steps, qa_example) uniform Q4_K_M gives mean KLD ~2e-4 (text) / ~5e-4 (audio), while
# every layer alone stays below ~3e-4: this budget needs a mix.
MIX_BUDGET = "audio_mean_kld<=0.0002,text_mean_kld<=0.0001"


def test_parse_budget_and_spec():
    b = parse_budget("audio_top1>=0.99, text_mean_kld<=1e-3")
    assert [(x.metric, x.op, x.value) for x in b] == [("audio_top1", ">=", 0.99), ("text_mean_kld", "<=", 1e-3)]
    for bad, why in (("audio_top1>0.9", "METRIC>=X"), ("wer<=0.1", "unknown metric"), ("text_top1<=0.9", "bounded"),
                     ("", "no bound")):
        with pytest.raises(ValueError, match=why):
            parse_budget(bad)
    assert "audio_token_agreement" in METRICS
    kept = [("trunk", "blk.0"), ("trunk", "blk.1"), ("trunk", "blk.3"), ("audio", "blk.0"), ("trunk", "output")]
    assert mix_spec("Q4_K_M", kept) == "Q4_K_M+trunk.blk.0-1=F32+trunk.blk.3=F32+trunk.output=F32+audio.blk.0=F32"


@pytest.fixture(scope="module")
def study(tiny_snapshot, shared_audio, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budget")
    audio = tmp / "audio"
    audio.mkdir()
    shutil.copyfile(shared_audio / "qa_example.wav", audio / "qa_example.wav")
    return tiny_snapshot, audio, tmp / "report"


def test_recommendation_meets_its_budget(study):
    import gguf

    from kimia_edge.quantization.study.budget import study_with_budget
    from kimia_edge.quantization.study.report import write_report
    from kimia_edge.runtime.spec.gguf import FILES

    snapshot, audio, out = study
    rec = study_with_budget(snapshot, audio, out, "Q4_K_M", MIX_BUDGET, steps=8, progress=False)
    assert rec["status"] == "mix", rec["why"]
    assert rec["measured"]["ok"] and rec["chosen"]["ok"]
    for bound in parse_budget(MIX_BUDGET):  # the measured variant's own cells, bound by bound
        cells = [json.loads(p.read_text()) for p in (out / "cells").glob(f"llm__{rec['spec']}__*.json")]
        assert cells and bound.value_of([c["metrics"] for c in cells]) <= bound.value
    uniform = next(t for t in rec["trials"] if len(t["quantized"]) == len(rec["ranking"]))
    assert not uniform["ok"]  # the budget did need a mix
    assert rec["measured"]["bytes"] < rec["trials"][0]["bytes"]  # smaller than F32
    assert rec["measured"]["values"] == rec["chosen"]["values"]  # exporter's file = the assembled trial, exactly
    # the groups the spec keeps are F32 in the exported files
    mix = parse_mix(rec["spec"], tuple(QUANT_TYPES))
    folder = out / "cache" / "gguf" / rec["spec"]
    kept = 0
    for role in ("trunk", "audio"):
        for t in gguf.GGUFReader(str(folder / FILES[role])).tensors:
            if mix.type_for(role, tensor_group(t.name)) == "F32":
                assert t.tensor_type.name == "F32", (role, t.name)
                kept += 1
    assert kept > 0
    report = write_report(out)
    assert report["recommendation"]["spec"] == rec["spec"]
    assert [r["group"] for r in report["sensitivity"]["Q4_K_M"]] == rec["ranking"]
    impacts = [r["impact"] for r in report["sensitivity"]["Q4_K_M"]]
    assert impacts == sorted(impacts) and impacts[-1] > 0
    assert (out / "sensitivity_Q4_K_M.png").stat().st_size > 0
    assert rec["spec"] in (out / "report.md").read_text()


def test_unmeetable_budget_is_reported(study):
    from kimia_edge.quantization.study.budget import study_with_budget

    snapshot, audio, out = study  # reuses the references and sensitivity cells of the test above when it ran
    rec = study_with_budget(snapshot, audio, out, "Q4_K_M", "greedy_agreement_steps>=9", steps=8, progress=False)
    assert rec["status"] == "unmet" and rec["spec"] is None and "even the F32" in rec["why"]
