"""Per-group LLM sensitivity and the --budget recommendation on a tiny study (one clip, 8 steps): the groups ranked by
their end-to-end impact (then KLD); the recommended mix meets every bound, LLM and end-to-end, when the exporter's path
makes it and the study measures it as an LLM row and as an end-to-end cell; a budget nothing meets is reported as
such; the budget syntax names what is wrong."""
from __future__ import annotations

import json

import pytest

from kimia_edge.export.gguf_quantize import QUANT_TYPES
from kimia_edge.quantization.gguf_mix import parse_mix, tensor_group
from kimia_edge.quantization.study.budget import METRICS, mix_spec, parse_budget, within

# On the tiny snapshot (8 steps, qa_example) uniform Q4_K_M gives mean KLD ~7e-4 (text) / ~9e-4 (audio), while
# every layer alone stays below ~7e-4: this budget needs a mix.
MIX_BUDGET = "audio_mean_kld<=0.0002,text_mean_kld<=0.0001"
# The end-to-end bounds hold for uniform Q4_K_M on tiny (its 7-step turn keeps its tokens): naming them makes the
# greedy's trials measure their end-to-end cells, and the recommendation is the uniform type.
E2E_BUDGET = "e2e_audio_token_agreement>=0.99,e2e_wer<=0.01,e2e_text_token_agreement>=0.99"


def test_parse_budget_and_spec():
    b = parse_budget("audio_top1>=0.99, text_mean_kld<=1e-3")
    assert [(x.metric, x.op, x.value) for x in b] == [("audio_top1", ">=", 0.99), ("text_mean_kld", "<=", 1e-3)]
    for bad, why in (("audio_top1>0.9", "METRIC>=X"), ("wer<=0.1", "unknown metric"), ("text_top1<=0.9", "bounded"),
                     ("", "no bound")):
        with pytest.raises(ValueError, match=why):
            parse_budget(bad)
    assert "audio_token_agreement" in METRICS
    e = parse_budget("e2e_audio_token_agreement>=0.99,e2e_wer<=0.05,e2e_pesq>=3")
    assert [x.e2e for x in e] == [True, True, True] and not b[0].e2e
    for bad, why in (("e2e_wer>=0.1", "bounded with <="), ("e2e_stoi<=0.9", "bounded with >="), ("e2e_x>=1", "unknown")):
        with pytest.raises(ValueError, match=why):
            parse_budget(bad)
    # NaN (no speech, no PESQ) meets no bound; an e2e bound without e2e cells is an error, not a silent pass
    no_speech = {"audio_token_agreement": 1.0, "text_token_agreement": 1.0, "wer": 0.0, "greedy_agreement_steps": 3,
                 "speech_mrstft": None, "pesq": None, "stoi": None}
    assert not within(e, [], [no_speech])["ok"] and within(e[:2], [], [no_speech])["ok"]
    with pytest.raises(ValueError, match="end-to-end"):
        e[0].value_of([{}])
    kept = [("trunk", "blk.0"), ("trunk", "blk.1"), ("trunk", "blk.3"), ("audio", "blk.0"), ("trunk", "output")]
    assert mix_spec("Q4_K_M", kept) == "Q4_K_M+trunk.blk.0-1=F32+trunk.blk.3=F32+trunk.output=F32+audio.blk.0=F32"
    assert mix_spec("Q4_K_M", kept[:1], also={"Q8_0": [("trunk", "blk.2"), ("trunk", "blk.3"), ("audio", "output")]}) \
        == "Q4_K_M+trunk.blk.0=F32+trunk.blk.2-3=Q8_0+audio.output=Q8_0"


def test_cli_refuses_bad_budget_before_any_work(tmp_path, capsys):
    from kimia_edge.cli import main

    base = ["study", "--snapshot", str(tmp_path / "none"), "--audio", str(tmp_path), "--out", str(tmp_path / "o")]
    for extra, why in ((["--budget", "wer<=0.1"], "unknown metric"), (["--budget-keep", "Q8_0"], "needs --budget"),
                       (["--budget", "e2e_wer<=0.1", "--budget-keep", "Q9_Z"], "llama.cpp type")):
        assert main([*base, *extra]) != 0
        assert why in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before the study started (no snapshot there to study)


@pytest.fixture(scope="module")
def study(tiny_snapshot, tiny_bundle, one_clip_audio, tmp_path_factory):
    """(snapshot, audio folder, report folder, run_study keywords): the session bundle's fp32 graphs (no export)."""
    tmp = tmp_path_factory.mktemp("budget")
    audio = one_clip_audio
    return tiny_snapshot, audio, tmp / "report", dict(steps=8, progress=False, bundle=tiny_bundle)


def test_recommendation_meets_its_budget(study):
    import gguf

    from kimia_edge.quantization.study.budget import study_with_budget
    from kimia_edge.quantization.study.report import write_report
    from kimia_edge.runtime.spec.gguf import FILES

    snapshot, audio, out, kw = study
    rec = study_with_budget(snapshot, audio, out, "Q4_K_M", MIX_BUDGET, **kw)
    assert rec["status"] == "mix", rec["why"]
    assert rec["measured"]["ok"] and rec["chosen"]["ok"]
    assert not rec["trials_end_to_end"] and rec["measured"]["llm"]["ok"] and rec["measured"]["e2e"]["ok"]
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob(f"llm__{rec['spec']}__*.json")]
    e2e = [json.loads(p.read_text()) for p in (out / "cells").glob(f"e2e__fp32@{rec['spec']}__*.json")]
    assert len(cells) == len(e2e) == 1  # the spec measured by the study, as an LLM row and end to end
    for bound in parse_budget(MIX_BUDGET):  # the measured variant's own cells, bound by bound
        got = bound.value_of([c["metrics"] for c in cells], [c["metrics"] for c in e2e])
        assert got == rec["measured"]["values"][bound.text]
        assert _ok(bound, got)
    assert rec["measured"]["e2e"]["means"]["e2e_wer"] == e2e[0]["metrics"]["wer"]
    assert rec["measured"]["e2e"]["means"]["e2e_greedy_steps"] == e2e[0]["metrics"]["greedy_agreement_steps"]
    assert (out / "cells" / e2e[0]["clip"]).parent.joinpath(
        f"e2e__fp32@{rec['qtype']}__{e2e[0]['clip']}.json").exists()  # beside the uniform end-to-end row
    uniform = next(t for t in rec["trials"] if len(t["quantized"]) == len(rec["ranking"]))
    assert not uniform["ok"]  # the budget did need a mix
    assert rec["measured"]["bytes"] < rec["trials"][0]["bytes"]  # smaller than F32
    assert rec["measured"]["values"] == rec["chosen"]["values"]  # exporter's file = the assembled trial, exactly
    # no budget bound names an e2e metric: the trials have no end-to-end cells; no mix's files or bundle outlive
    # its cells
    assert not list((out / "sensitivity").glob("e2e__fp32@Q4_K_M~*.json"))
    assert not [p for p in (out / "cache" / "gguf").iterdir() if "@" in p.name or "~" in p.name]
    assert not [p for p in (out / "cache" / "bundles").iterdir() if "~" in p.name or p.name.count("@") > 1]
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
    rows = report["sensitivity"]["Q4_K_M"]
    assert [r["group"] for r in rows] == rec["ranking"]
    for r in rows:  # the stated e2e impact, recomputed from the group's stored end-to-end cell
        m = json.loads(next((out / "sensitivity").glob(f"e2e__fp32@Q4_K_M@{r['group']}__*.json")).read_text())
        assert r["e2e_impact"] == pytest.approx((1 - m["metrics"]["audio_token_agreement"]) + m["metrics"]["wer"])
        assert m["cost"]["bytes"] > 0 and m["variant"] == f"fp32@Q4_K_M@{r['group']}"
    keys = [(r["e2e_impact"], r["impact"]) for r in rows]
    assert keys == sorted(keys) and rows[-1]["impact"] > 0  # e2e impact first, KLD breaks the ties
    md = (out / "report.md").read_text()
    assert "e2e impact" in md and f"e2e:fp32@{rec['spec']}" in md
    assert (out / "sensitivity_Q4_K_M.png").stat().st_size > 0
    assert rec["spec"] in (out / "report.md").read_text()


def test_unmeetable_budget_is_reported(study):
    from kimia_edge.quantization.study.budget import study_with_budget

    snapshot, audio, out, kw = study  # reuses the references and sensitivity cells of the test above when it ran
    rec = study_with_budget(snapshot, audio, out, "Q4_K_M", "greedy_agreement_steps>=9", **kw)
    assert rec["status"] == "unmet" and rec["spec"] is None and "even the F32" in rec["why"]
    # an end-to-end bound the F32 model misses (the tiny turn stops after 7 steps): reported, and F32 (the
    # recommendation when nothing may be quantized) measured end to end as the fp32@F32 cell
    rec = study_with_budget(snapshot, audio, out, "Q4_K_M", "e2e_greedy_steps>=100", **kw)
    assert rec["status"] == "unmet" and rec["trials_end_to_end"] and not rec["measured"]["ok"]
    cell = json.loads(next((out / "cells").glob("e2e__fp32@F32__*.json")).read_text())
    assert rec["measured"]["spec"] == "F32" and rec["measured"]["e2e"]["variant"] == "fp32@F32"
    assert rec["measured"]["values"]["e2e_greedy_steps>=100"] == cell["metrics"]["greedy_agreement_steps"] < 100


def test_end_to_end_budget(study):
    """A budget on end-to-end metrics: the greedy's trials are measured end to end, the recommendation meets it, and
    ``measured`` holds the values of the study's own end-to-end cell of the spec."""
    from kimia_edge.quantization.study.budget import study_with_budget

    snapshot, audio, out, kw = study
    rec = study_with_budget(snapshot, audio, out, "Q4_K_M", E2E_BUDGET, **kw)
    assert rec["trials_end_to_end"] and rec["status"] == "uniform" and rec["spec"] == "Q4_K_M", rec["why"]
    assert rec["measured"]["ok"] and rec["measured"]["e2e"]["ok"] and rec["measured"]["llm"]["values"] == {}
    for t in rec["trials"][:2]:  # the F32 and the uniform trials, each with its end-to-end cell
        cell = json.loads(next((out / "sensitivity").glob(f"e2e__fp32@{t['name']}__*.json")).read_text())
        assert t["values"]["e2e_wer<=0.01"] == cell["metrics"]["wer"]
    cell = json.loads(next((out / "cells").glob("e2e__fp32@Q4_K_M__*.json")).read_text())["metrics"]
    want = {"e2e_audio_token_agreement>=0.99": cell["audio_token_agreement"], "e2e_wer<=0.01": cell["wer"],
            "e2e_text_token_agreement>=0.99": cell["text_token_agreement"]}
    assert rec["measured"]["values"] == rec["measured"]["e2e"]["values"] == want
    assert all(_ok(b, want[b.text]) for b in parse_budget(E2E_BUDGET))


def _ok(bound, value: float) -> bool:
    return value >= bound.value if bound.op == ">=" else value <= bound.value


@pytest.mark.slow
def test_second_type_before_f32(study):
    """--budget-keep Q8_0: the groups that break the KLD bounds at Q4_K_M are tried at Q8_0 before F32; the spec
    carries =Q8_0 scopes, the exporter's file of it measures as the assembled trial did, and it is smaller than the
    F32-kept mix."""
    from kimia_edge.quantization.study.budget import study_with_budget

    snapshot, audio, out, kw = study
    rec = study_with_budget(snapshot, audio, out, "Q4_K_M", MIX_BUDGET, keep_type="Q8_0", **kw)
    assert rec["status"] == "mix" and "=Q8_0" in rec["spec"] and "=F32" not in rec["spec"], rec["spec"]
    assert rec["measured"]["ok"] and rec["measured"]["e2e"]["means"]
    assert rec["measured"]["values"] == rec["chosen"]["values"]  # the exporter's =Q8_0 scopes = the Q8_0 row's bytes
    assert any(t.get("at_keep_type") for t in rec["trials"])
    f32_kept = next(t for t in rec["trials"] if t["ok"] and not t.get("at_keep_type")
                    and len(t["quantized"]) == len(rec["ranking"]) - 2)  # the mix of the F32-only greedy
    assert rec["measured"]["bytes"] < f32_kept["bytes"]
