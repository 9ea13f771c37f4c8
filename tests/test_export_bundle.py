"""``kimia-edge export`` on a tiny snapshot: a bundle whose every artifact is listed with its hash, precision and
measured error, that verifies, and that the runtime refuses once altered."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from kimia_edge.cli import main
from kimia_edge.export.snapshot.make import make_snapshot
from kimia_edge.runtime.bundle import load_bundle
from kimia_edge.runtime.spec.manifest import BundleError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, shared_audio: Path) -> Path:
    root = tmp_path_factory.mktemp("export")
    snap = make_snapshot(root / "snap", "tiny", seed=11)
    out = root / "bundle"
    code = main(["export", "--snapshot", str(snap), "--out", str(out), "--graphs", "vocoder",
                 "--calibration-audio", str(shared_audio / "qa_example.wav"), "--llm-quants", "Q8_0"])
    assert code == 0
    return out


def test_bundle_lists_every_artifact_with_measured_errors(bundle: Path) -> None:
    m = load_bundle(bundle)
    have = {(a.name, a.precision) for a in m.artifacts}
    assert {("vocoder", p) for p in ("fp32", "fp16", "int8_dynamic", "int8_qdq")} <= have
    assert {("llm_trunk", "F16"), ("llm_audio", "F16"), ("llm_adaptor", "F16"), ("llm_trunk", "Q8_0")} <= have
    assert ("llm_adaptor", "Q8_0") not in have  # the adaptor is stored once, shared by every LLM variant
    voc = m.artifact("vocoder", "fp32")
    assert voc.error["max_abs"] < 1e-4 and voc.profiles["mel"].opt[1] == 80
    assert "speech_rel_l2" in m.artifact("vocoder", "int8_qdq").error  # measured on speech-derived mel too
    assert m.model.vocoder.hop_size == 480 and m.model.token_offset == 152064
    assert m.source["config_sha256"] and not any(p.name.startswith(".") for p in bundle.parent.iterdir())
    listed = {f.path for a in m.artifacts for f in a.files} | {"manifest.json"}
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    assert on_disk == listed  # nothing unlisted, nothing missing


def test_altered_artifact_is_refused(bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    target = copy / load_bundle(copy).artifact("vocoder", "fp16").path
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="vocoder.fp16.onnx: sha256 differs"):
        load_bundle(copy)


def test_export_refuses_an_existing_bundle(bundle: Path, capsys: pytest.CaptureFixture) -> None:
    manifest_before = json.loads((bundle / "manifest.json").read_text())
    assert main(["export", "--snapshot", "unused", "--out", str(bundle), "--graphs", "vocoder", "--no-llm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists (pass --overwrite to replace it)" in err[0]
    assert json.loads((bundle / "manifest.json").read_text()) == manifest_before
    with pytest.raises(FileExistsError):  # -v shows the traceback instead
        main(["-v", "export", "--snapshot", "unused", "--out", str(bundle), "--graphs", "vocoder", "--no-llm"])


def test_variant_outside_its_tolerance_is_not_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kimia_edge.export.graphs.vocoder import VocoderGraph

    monkeypatch.setattr(VocoderGraph, "variant_rel_l2", {**VocoderGraph.variant_rel_l2, "int8_dynamic": 1e-9})
    snap = make_snapshot(tmp_path / "snap", "tiny", seed=12)
    out = tmp_path / "bundle"
    assert main(["export", "--snapshot", str(snap), "--out", str(out), "--graphs", "vocoder", "--precision", "fp32",
                 "fp16", "int8_dynamic", "--no-llm"]) == 0
    m = load_bundle(out)
    assert {a.precision for a in m.artifacts if a.name == "vocoder"} == {"fp32", "fp16"}
    rejected = m.artifact("vocoder", "fp32").extra["rejected_variants"]["int8_dynamic"]
    assert rejected["rel_l2"] > rejected["tolerance_rel_l2"] == 1e-9
    assert not list(out.glob("vocoder.int8_dynamic*"))
    assert m.artifact("vocoder", "fp16").error["rel_l2"] <= m.artifact("vocoder", "fp16").error["tolerance_rel_l2"]


def test_variants_of_an_external_data_graph_keep_external_data(tmp_path: Path, shared_audio: Path) -> None:
    """Every graph stores its weights in <graph>.onnx.data (memory-mapped by ONNX Runtime; over 2 GB protobuf allows
    nothing else); its variants must too."""
    import onnx

    from kimia_edge.export.graphs import base, graph_spec
    from kimia_edge.export.graphs.base import compare, run_onnx, run_torch
    from kimia_edge.export.fileio import graph_files
    from kimia_edge.quantization.variants import make_variant

    spec = graph_spec("vocoder")
    module = spec.build(make_snapshot(tmp_path / "snap", "tiny", seed=13, components=["vocoder"]))
    fp32 = base.export_graph(spec, module, tmp_path / "vocoder.fp32.onnx").path
    assert [f.name for f in graph_files(fp32)] == ["vocoder.fp32.onnx", "vocoder.fp32.onnx.data"]
    x = spec.example_inputs(module, spec.parity_lengths[0], seed=5)
    calibration = [{"mel": x[0].numpy()}]
    for precision in ("fp16", "int8_dynamic", "int8_qdq"):
        path = make_variant(precision, fp32, tmp_path / f"vocoder.{precision}.onnx", calibration,
                            spec.int8_dynamic_signed_weights)
        files = graph_files(path)
        assert [f.name for f in files] == [path.name, path.name + ".data"], precision
        graph = onnx.load(str(path), load_external_data=False)
        inline = [len(t.raw_data) for t in graph.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        assert max(inline, default=0) <= 1024 < files[1].stat().st_size, precision  # weights in the data file
        err = compare(spec, run_onnx(path, spec, x), run_torch(module, x))
        assert err.rel_l2 <= spec.variant_rel_l2[precision], (precision, err)


def test_a_variant_is_made_from_a_graph_hard_linked_elsewhere(tmp_path: Path) -> None:
    """onnx refuses to read external data through a file with other hard links; the study hard-links its cached
    graphs into bundles, and a variant made from such a graph afterwards must still be made (from a private copy)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kimia_edge.export.fileio import graph_files, unshared_graph
    from kimia_edge.quantization.variants import make_variant

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    src = tmp_path / "cache" / "g.fp32.onnx"
    src.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src),
              save_as_external_data=True, location="g.fp32.onnx.data", size_threshold=0)
    (tmp_path / "bundle").mkdir()
    for f in graph_files(src):
        os.link(f, tmp_path / "bundle" / f.name)
    with pytest.raises(Exception, match="hard link|multiple"):
        onnx.load(str(src))
    dst = make_variant("fp16", src, tmp_path / "g.fp16.onnx")
    half = onnx.load(str(dst))
    assert [t.data_type for t in half.graph.initializer] == [TensorProto.FLOAT16]
    with unshared_graph(src) as readable:
        assert readable != src and onnx.load(str(readable)).graph.initializer[0].name == "w"
    assert sorted(p.name for p in src.parent.iterdir()) == ["g.fp32.onnx", "g.fp32.onnx.data"]  # the copy is gone
