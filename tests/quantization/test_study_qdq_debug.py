"""Per-tensor error of the static int8 variants (qdq_debug.py, ``study --qdq-debug``) on the tiny snapshot's adaptor:
known answers (the float graph against itself: ORT's eps-capped SQNR, ~313 dB, on every tensor; the QDQ graph: finite
errors naming real tensors of the graph), stored once and resumed, summarized in the report, redrawn by --replot,
and a child that fails is reported, not fatal."""
from __future__ import annotations

import json
import shutil

import onnx
import pytest

from kimia_edge.runtime.spec.precisions import INT8_QDQ

VARIANTS = f"adaptor={INT8_QDQ}"


@pytest.fixture(scope="module")
def debugged(tiny_snapshot, tiny_bundle, one_clip_audio, tmp_path_factory):
    from kimia_edge.quantization.study.run import run_study

    root = tmp_path_factory.mktemp("qdq_debug")
    audio = one_clip_audio
    out = root / "report"
    kw = dict(variants=VARIANTS, steps=8, bundle=tiny_bundle, progress=False, qdq_debug=True)
    counts = run_study(tiny_snapshot, audio, out, **kw)
    return out, audio, kw, counts


def test_float_graph_against_itself_is_exact_and_qdq_is_not(debugged, tmp_path):
    from kimia_edge.quantization.study.qdq_debug import DEBUG_FEEDS, tensor_errors
    from kimia_edge.quantization.study.run import StudyPaths, _load_pickle

    out, _, _, _ = debugged
    paths = StudyPaths(out)
    clip = next(p.name for p in paths.ref.iterdir())
    feeds = _load_pickle(paths.reference(clip, "adaptor"))["feeds"][:DEBUG_FEEDS]
    fp32 = paths.graph("adaptor", "fp32")
    same = tensor_errors(fp32, fp32, feeds, tmp_path)
    assert same["activations"] and not same["weights"]  # no DequantizeLinear of a weight in a float graph
    assert all(e["xmodel_err"] > 250 for e in same["activations"].values())  # 20 log10(|x| / eps)

    qdq = tensor_errors(fp32, paths.graph("adaptor", INT8_QDQ), feeds, tmp_path)
    graph = onnx.load(str(fp32)).graph
    tensors = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    assert qdq["activations"] and set(qdq["activations"]) <= tensors
    assert all(0 < e["xmodel_err"] < 100 and 0 < e["qdq_err"] < 100 for e in qdq["activations"].values())
    assert qdq["weights"] and all(0 < w < 100 for w in qdq["weights"].values())
    assert set(qdq["weights"]) <= {i.name for i in graph.initializer}


def test_stored_resumed_reported_and_replotted(debugged, tiny_snapshot):
    from kimia_edge.quantization.study.report import replot, write_report
    from kimia_edge.quantization.study.run import run_study

    out, audio, kw, counts = debugged
    assert counts["qdq_debug"] == 1
    stored = list((out / "qdq_debug").glob("*.json"))
    assert len(stored) == 1 and not list((out / "qdq_debug").glob(".work-*"))
    mtime = stored[0].stat().st_mtime_ns
    assert run_study(tiny_snapshot, audio, out, **kw) == {"cells": 3, "computed": 0, "reused": 3, "qdq_debug": 0}
    assert stored[0].stat().st_mtime_ns == mtime

    report = write_report(out)
    s = report["qdq_debug"][VARIANTS]
    stored_acts = json.loads(stored[0].read_text())["activations"]
    assert s["tensors"] == len(stored_acts) and 0 < len(s["worst"]) <= s["tensors"]
    worst = s["worst"][0]
    assert worst["xmodel_err"] == min(e["xmodel_err"] for e in stored_acts.values())
    assert [r["xmodel_err"] for r in s["worst"]] == sorted(r["xmodel_err"] for r in s["worst"])
    text = (out / "report.md").read_text()
    assert "## Per-tensor error" in text and f"| `{worst['tensor']}` ({worst['op']}) |" in text
    png = out / "qdq_tensors_adaptor.png"
    assert f"![{png.name}]({png.name})" in text
    png.unlink()
    replot(out)
    assert png.stat().st_size > 0


def test_a_failing_child_is_reported(debugged, tmp_path):
    from kimia_edge.quantization.study.qdq_debug import prepare_qdq_debug, report_section
    from kimia_edge.quantization.study.run import StudyPaths
    from kimia_edge.quantization.study.spec import parse_variants

    out, _, _, _ = debugged
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("qdq_debug"))
    clips = [p.name for p in StudyPaths(copy).ref.iterdir()]
    # 64 MiB of address space: the child cannot even import numpy / onnxruntime (a real failure, not a mock)
    assert prepare_qdq_debug(StudyPaths(copy), parse_variants(VARIANTS), clips, memory_mib=64) == 1
    why = report_section(copy)[VARIANTS]["unavailable"]
    assert "64 MiB" in why
    assert prepare_qdq_debug(StudyPaths(copy), parse_variants(VARIANTS), clips) == 1  # retried, now computed
    assert "worst" in report_section(copy)[VARIANTS]
