"""Bundle writing is atomic; loading refuses unknown versions and files that do not match the manifest."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kimia_edge.cli import main
from kimia_edge.export.bundle import BundleWriter
from kimia_edge.runtime.spec.manifest import BundleError, ShapeProfile, load_bundle, verify_bundle


def _write(out: Path) -> None:
    with BundleWriter(out, model={"dit": {"hidden": 8}}, source={"snapshot": "test"}) as w:
        w.path("a.onnx").write_bytes(b"graph")
        w.path("a.onnx.data").write_bytes(b"\x00" * 100)
        w.add("vocoder", "vocoder", "onnx", "fp32", ["a.onnx", "a.onnx.data"], error={"max_abs": 1e-6},
              profiles={"mel": ShapeProfile((1, 80, 1), (1, 80, 120), (1, 80, 400))})


def test_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    _write(out)
    m = load_bundle(out)
    art = m.artifact("vocoder", "fp32")
    assert art.bytes == 105 and art.path == "a.onnx" and art.error == {"max_abs": 1e-6}
    assert art.profiles["mel"].opt == (1, 80, 120)
    assert m.model == {"dit": {"hidden": 8}}
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary folder left behind
    with pytest.raises(BundleError, match="no artifact vocoder/fp16.*vocoder/fp32"):
        m.artifact("vocoder", "fp16")


def test_altered_or_missing_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    _write(out)
    (out / "a.onnx.data").write_bytes(b"\x01" + b"\x00" * 99)
    with pytest.raises(BundleError, match="a.onnx.data sha256 differs"):
        load_bundle(out)
    (out / "a.onnx").unlink()
    assert any("a.onnx is missing" in p for p in verify_bundle(out))
    assert main(["bundle", "verify", str(out)]) == 1


def test_unknown_version_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    _write(out)
    raw = json.loads((out / "manifest.json").read_text())
    raw["version"] = 99
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="version 99 is not supported"):
        load_bundle(out)


def test_interrupted_export_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="exporter died"):
        with BundleWriter(out, model={}, source={}) as w:
            w.path("half.onnx").write_bytes(b"half")
            raise RuntimeError("exporter died")
    assert list(tmp_path.iterdir()) == []


def test_bad_profile_and_duplicates_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="min <= opt <= max"):
        with BundleWriter(tmp_path / "b", model={}, source={}) as w:
            w.path("x").write_bytes(b"x")
            w.add("x", "dit", "onnx", "fp32", ["x"], profiles={"x": ShapeProfile((1, 5), (1, 3), (1, 9))})
    assert list(tmp_path.iterdir()) == []


def test_cli_verify_ok(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write(tmp_path / "bundle")
    assert main(["bundle", "verify", str(tmp_path / "bundle")]) == 0
    assert "ok:" in capsys.readouterr().out


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path)
