"""End-to-end cells of `kimia-edge study`: the mix syntax, known answers of the turn comparison, and one mix on one
clip of the tiny snapshot (serial, then the same cells on a local Ray instance: same numbers)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kimia_edge.quantization.study.end_to_end import DEFAULT_MIXES, compare_turns, extract_mixes
from kimia_edge.quantization.study.spec import StudyVariant, parse_variants

MIX = "fp32,dit_step=int8_dynamic@Q8_0"


def test_mix_syntax():
    assert extract_mixes(f"e2e:{MIX},llm=Q8_0") == ("llm=Q8_0", [MIX])
    assert extract_mixes(f"adaptor=fp16, e2e:int8_dynamic@Q4_K_M") == ("adaptor=fp16", ["int8_dynamic@Q4_K_M"])
    got = parse_variants(f"e2e:{MIX}")
    assert got == [StudyVariant("e2e", "fp32@F32"), StudyVariant("e2e", "noise_seed"), StudyVariant("e2e", MIX)]
    assert {StudyVariant("e2e", m) for m in DEFAULT_MIXES} <= set(parse_variants(None))
    for bad, what in (("e2e:fp33@Q8_0", "fp33"), ("e2e:fp32", "e2e:ONNX_SPEC@GGUF_ROW"), ("e2e:fp32@Q9_X", "Q9_X"),
                      ("e2e:nosuch=fp16@Q8_0", "nosuch")):
        with pytest.raises(ValueError, match=what):
            parse_variants(bad)


def _turn(text, fed, tokens, wav):
    return {"text": text, "fed": fed, "audio_tokens": tokens, "wav": wav, "sample_rate_hz": 24000}


def test_compare_turns_known_answers():
    rng = np.random.default_rng(0)
    tone = np.sin(2 * np.pi * 220 * np.arange(24000) / 24000)
    wav = (0.3 * tone * (1 + 0.5 * rng.standard_normal(24000))).astype(np.float32)
    ref = _turn("a b c d", [(1, 2), (3, 4), (5, 6), (7, 8)], [1, 2, 3, 4], wav)
    same = compare_turns(ref, ref)
    assert (same["wer"], same["audio_token_agreement"], same["text_token_agreement"]) == (0.0, 1.0, 1.0)
    assert same["greedy_agreement_steps"] == same["greedy_steps"] == 4
    assert same["speech_mrstft"]["total"] == 0.0 and same["stoi"] > 0.999 and same["pesq"] > 4.5
    other = compare_turns(ref, _turn("a b x d", [(1, 2), (3, 4), (5, 9), (7, 8)], [1, 2, 9], 0.5 * wav))
    assert other["wer"] == 0.25 and other["audio_token_agreement"] == 0.5 and other["text_token_agreement"] == 0.75
    assert other["greedy_agreement_steps"] == 2
    # a gain g on the same speech: spectral convergence |1 - g|, log magnitude |ln g| (metrics docstring)
    assert other["speech_mrstft"]["spectral_convergence"] == pytest.approx(0.5, abs=1e-6)
    assert other["speech_mrstft"]["log_magnitude"] == pytest.approx(np.log(2), abs=1e-3)
    short = compare_turns(ref, _turn("a b c d", ref["fed"], ref["audio_tokens"], wav[:12000]))
    assert short["speech_seconds"] == [1.0, 0.5] and short["speech_mrstft"]["total"] > 1  # the missing half counts
    silent = compare_turns(ref, _turn("", [], [], np.zeros(0, np.float32)))
    assert silent["wer"] == 1.0 and silent["pesq"] is None and silent["stoi"] is None


def _metrics(out: Path) -> dict:
    return {p.name: json.loads(p.read_text())["metrics"] for p in sorted((out / "cells").glob("*.json"))}


def test_tiny_end_to_end_cells_serial_and_on_ray(tiny_snapshot, tiny_bundle, one_clip_audio, tmp_path):
    """One mix on one clip, 12 greedy steps: the mix, its two floors, the cost, the report; then the same cells on a
    local Ray instance (2 CPUs) give the same numbers."""
    pytest.importorskip("ray", reason="--ray needs Ray (the test and study extras install it)")
    from kimia_edge.quantization.study.end_to_end import bundle_dir
    from kimia_edge.quantization.study.report import write_report
    from kimia_edge.quantization.study.run import StudyPaths, run_study
    from kimia_edge.runtime.bundle import load_bundle

    audio = one_clip_audio
    out = tmp_path / "report"
    kw = dict(variants=f"e2e:{MIX}", steps=12, bundle=tiny_bundle, progress=False)
    assert run_study(tiny_snapshot, audio, out, **kw) == {"cells": 3, "computed": 3, "reused": 0}
    load_bundle(bundle_dir(StudyPaths(out), MIX), verify=True)  # a real bundle: every sha256 checks

    report = write_report(out)
    e2e = report["components"]["e2e"]
    seed = e2e["noise_seed"]
    assert seed["wer"]["mean"] == 0 and seed["audio_token_agreement"]["mean"] == 1 and seed["headline"] > 0
    assert report["floors"]["e2e"] == max(seed["headline"], e2e["fp32@F32"]["headline"])
    mix = e2e[MIX]
    assert 0 <= mix["audio_token_agreement"]["mean"] <= 1 and mix["within_floor"] in (True, False)
    assert mix["bytes"] < e2e["fp32@F32"]["bytes"]  # int8 DiT and Q8_0 LLM against fp32 and F32
    cell = json.loads((out / "cells" / f"e2e__{MIX}__{next(iter(report['header']['clips']))}.json").read_text())
    cost = cell["cost"]
    assert cost["torch_loaded"] is False and cost["peak_rss_mib"] > 50 and cost["threads"] >= 1
    assert all(cost["rtf"][s] > 0 for s in ("encode", "llm", "dit", "vocoder"))
    assert "dit_step" in cost["providers"] and "int8_dynamic" in cost["providers"]["dit_step"]
    text = (out / "report.md").read_text()
    assert "## e2e" in text and "| noise_seed |" in text and "RTF DiT" in text
    assert (out / "pareto_e2e.png").stat().st_size > 0 and (out / "pareto_e2e_rtf.png").stat().st_size > 0

    on_ray = tmp_path / "ray"
    shutil.copytree(out, on_ray, ignore=shutil.ignore_patterns("cells"))
    assert run_study(tiny_snapshot, audio, on_ray, jobs=2, ray="local", **kw)["computed"] == 3
    assert _metrics(on_ray) == _metrics(out)
    assert all(json.loads(p.read_text())["pooled"] for p in (on_ray / "cells").glob("*.json"))
