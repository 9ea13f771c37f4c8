"""`kimia-edge study` end to end on the tiny snapshot: two variants (one ONNX graph, one GGUF row) and their noise
floors on one clip, interrupted after its first cell and resumed, then the same study on a process pool (same
numbers), the report and --replot. The fp32 graphs come from the session bundle (no export here)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from kimia_edge.quantization.study.spec import StudyVariant, parse_variants

VARIANTS = "adaptor=int8_dynamic,llm=Q8_0"


def test_variant_spec():
    got = parse_variants(VARIANTS)
    assert got == [StudyVariant("adaptor", "fp32"), StudyVariant("adaptor", "torch_threads"),
                   StudyVariant("adaptor", "int8_dynamic"), StudyVariant("llm", "F32_threads"),
                   StudyVariant("llm", "Q8_0")]
    assert {v.component for v in parse_variants("fp16")} == {"whisper_encoder", "vq_encoder", "adaptor", "dit_step",
                                                             "vocoder"}
    assert StudyVariant("llm", "Q4_K_M+emb-heads-Q8_0") in parse_variants(None)
    assert StudyVariant("llm", "Q6_K") in parse_variants("Q6_K")
    for bad in ("adaptor=int3", "nosuch=fp16", "llm=Q9_X"):
        with pytest.raises(ValueError):
            parse_variants(bad)


class _Stop(Exception):
    pass


def _metrics(out: Path) -> dict:
    return {p.name: json.loads(p.read_text())["metrics"] for p in sorted((out / "cells").glob("*.json"))}


def test_tiny_study_resumes_and_pools(tiny_snapshot, tiny_bundle, one_clip_audio, tmp_path):
    from kimia_edge.quantization.study.report import replot, write_report
    from kimia_edge.quantization.study.run import run_study

    audio = one_clip_audio
    out = tmp_path / "report"
    kw = dict(variants=VARIANTS, steps=8, bundle=tiny_bundle, progress=False)

    def stop(key):
        raise _Stop(key)

    with pytest.raises(_Stop):  # interrupted right after the first cell is stored
        run_study(tiny_snapshot, audio, out, on_cell=stop, **kw)
    first = list((out / "cells").glob("*.json"))
    assert len(first) == 1
    mtime = first[0].stat().st_mtime_ns
    counts = run_study(tiny_snapshot, audio, out, **kw)
    assert counts == {"cells": 5, "computed": 4, "reused": 1}
    assert first[0].stat().st_mtime_ns == mtime  # the finished cell was not measured again
    assert run_study(tiny_snapshot, audio, out, **kw)["computed"] == 0

    pooled = tmp_path / "pooled"
    shutil.copytree(out, pooled, ignore=shutil.ignore_patterns("cells"))  # the references and variants, no cell
    assert run_study(tiny_snapshot, audio, pooled, jobs=2, **kw)["computed"] == 5
    assert _metrics(pooled) == _metrics(out)

    report = write_report(out)
    assert report["header"]["generated_snapshot"] and "random" in report["header"]["label"]
    adaptor = report["components"]["adaptor"]
    assert adaptor["torch_threads"]["headline"] <= adaptor["fp32"]["headline"] < 1e-5
    assert 0 < adaptor["int8_dynamic"]["headline"] < 0.2 and adaptor["int8_dynamic"]["within_floor"] is False
    llm = report["components"]["llm"]
    assert llm["F32_threads"]["headline"] == {"text": 0.0, "audio": 0.0}
    assert 0 < llm["Q8_0"]["headline"]["text"] < 0.05 and llm["Q8_0"]["greedy_steps"] == 8
    text = (out / "report.md").read_text()
    assert "random" in text and "| Q8_0 |" in text
    for png in ("pareto_adaptor.png", "pareto_llm.png", "kld_hist.png"):
        (out / png).unlink()
    replot(out)
    assert all((out / png).stat().st_size > 0 for png in ("pareto_adaptor.png", "pareto_llm.png", "kld_hist.png"))


def test_a_variant_that_cannot_be_made_is_reported_not_fatal(tmp_path):
    """mark_unavailable stores one cell per clip with the reason; the report lists it and measures the rest."""
    from kimia_edge.quantization.study.report import build_report, markdown
    from kimia_edge.quantization.study.run import StudyPaths, load_cells, mark_unavailable, write_json

    paths = StudyPaths(tmp_path)
    write_json(paths.config, {"version": 1, "source": {"snapshot": "snap", "config_sha256": "0" * 64},
                              "generated_snapshot": False, "clips": {"a-1": "a.wav", "b-2": "b.wav"}, "variants": [],
                              "llm_steps": 8, "bundle": None})
    floor = {"metrics": {"rel_l2": 1e-7, "cosine": 1.0, "snr_db": 130.0}, "cost": {"bytes": 10, "seconds": 0.1},
             "component": "adaptor", "variant": "fp32", "floor": True, "clip": "a-1"}
    write_json(paths.cells / "adaptor__fp32__a-1.json", floor)
    mark_unavailable(paths, StudyVariant("llm", "Q4_K_M+emb-heads-Q8_0"), ["a-1", "b-2"], "llama.cpp said no")
    assert len(load_cells(tmp_path)) == 3
    report = build_report(tmp_path)
    assert report["unavailable"] == {"llm=Q4_K_M+emb-heads-Q8_0": "llama.cpp said no"}
    assert list(report["components"]) == ["adaptor"]
    text = markdown(report)
    assert "not marked as generated" in text and "| llm=Q4_K_M+emb-heads-Q8_0 | llama.cpp said no |" in text


def test_bundle_of_another_snapshot_is_refused(tiny_bundle, tmp_path):
    from kimia_edge.quantization.study.run import StudyPaths, _fp32_graph

    other = tmp_path / "snap"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not exported from"):
        _fp32_graph(StudyPaths(tmp_path / "out"), other, "adaptor", tiny_bundle)


MAKER_LIMIT_MIB = 400  # tiny snapshot: the Whisper encoder's MinMax calibration needs more, int8_dynamic of the adaptor
# less (measured: the former fails with std::bad_alloc up to 800 MiB of address space, the latter runs in 200)


def test_a_maker_that_runs_out_of_memory_is_not_measured_and_retried(tiny_snapshot, tiny_bundle, one_clip_audio,
                                                                     tmp_path, monkeypatch):
    """A real failure: the maker children run under an address-space limit (RLIMIT_AS) that the Whisper encoder's
    static calibration exceeds. Its variant is reported not measured with the reason, the adaptor's int8_dynamic
    (made under the same limit) is measured in the same study, nothing half-made or temporary is left; a re-run
    without the limit retries it and measures it."""
    from kimia_edge.quantization.study.report import build_report, markdown
    from kimia_edge.quantization.study.run import MAKER_MEMORY_ENV, run_study
    from kimia_edge.runtime.spec.precisions import INT8_DYNAMIC, INT8_QDQ

    audio = one_clip_audio
    out = tmp_path / "report"
    kw = dict(variants=f"whisper_encoder={INT8_QDQ},adaptor={INT8_DYNAMIC}", steps=8, bundle=tiny_bundle,
              progress=False)
    monkeypatch.setenv(MAKER_MEMORY_ENV, str(MAKER_LIMIT_MIB))
    assert run_study(tiny_snapshot, audio, out, **kw)["cells"] == 6
    graphs = out / "cache" / "graphs"
    assert not (graphs / f"whisper_encoder.{INT8_QDQ}.onnx").exists()
    assert (graphs / f"adaptor.{INT8_DYNAMIC}.onnx").exists()
    assert not list(graphs.glob(".staging-*"))  # the staging folder, the child's TMPDIR (ort.quant.*) with it
    report = build_report(out)
    why = report["unavailable"][f"whisper_encoder={INT8_QDQ}"]
    assert f"{MAKER_LIMIT_MIB} MiB" in why
    assert re.search(r"MemoryError|bad_alloc|[Ff]ailed to allocate|killed by SIG|pthread_create", why), why
    assert report["components"]["adaptor"][INT8_DYNAMIC]["headline"] > 0
    assert INT8_QDQ not in report["components"]["whisper_encoder"]  # its floors are measured, it is not
    assert f"| whisper_encoder={INT8_QDQ} | {why} |" in markdown(report)

    monkeypatch.delenv(MAKER_MEMORY_ENV)
    counts = run_study(tiny_snapshot, audio, out, **kw)
    assert counts == {"cells": 6, "computed": 1, "reused": 5}  # the failure is retried, nothing else is redone
    report = build_report(out)
    assert "unavailable" not in report or not report["unavailable"]
    assert 0 < report["components"]["whisper_encoder"][INT8_QDQ]["headline"] < 1
