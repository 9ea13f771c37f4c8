"""``kimia-edge export`` on a tiny snapshot: a bundle whose every artifact is listed with its hash, precision and
measured error, that verifies, and that the runtime refuses once altered."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kimia_edge.cli import main
from kimia_edge.export.snapshot.make import make_snapshot
from kimia_edge.runtime.manifest import BundleError, load_bundle


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
    assert m.model["vocoder"]["hop_size"] == 480 and m.model["llm"]["kimia_token_offset"] == 152064
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
    with pytest.raises(BundleError, match="vocoder.fp16.onnx sha256 differs"):
        load_bundle(copy)


def test_export_refuses_an_existing_bundle(bundle: Path) -> None:
    manifest_before = json.loads((bundle / "manifest.json").read_text())
    with pytest.raises(FileExistsError):
        main(["export", "--snapshot", "unused", "--out", str(bundle), "--graphs", "vocoder", "--no-llm"])
    assert json.loads((bundle / "manifest.json").read_text()) == manifest_before
