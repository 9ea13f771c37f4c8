"""Bundle writing is atomic; loading refuses unknown versions, malformed manifests, files that do not match the
manifest and paths that lead outside the bundle; later loads re-hash only what changed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kimia_edge.cli import main
from kimia_edge.export.bundle import BundleWriter
from kimia_edge.runtime.bundle import load_bundle, verify_bundle
from kimia_edge.runtime.spec.manifest import BundleError, ShapeProfile


def _write(out: Path, model) -> None:
    with BundleWriter(out, model=model, source={"snapshot": "test"}) as w:
        w.path("a.onnx").write_bytes(b"graph")
        w.path("a.onnx.data").write_bytes(b"\x00" * 100)
        w.add("vocoder", "vocoder", "onnx", "fp32", ["a.onnx", "a.onnx.data"], error={"max_abs": 1e-6},
              profiles={"mel": ShapeProfile((1, 80, 1), (1, 80, 120), (1, 80, 400))})


def test_round_trip(tmp_path: Path, tiny_model_config) -> None:
    out = tmp_path / "bundle"
    _write(out, tiny_model_config)
    m = load_bundle(out)
    art = m.artifact("vocoder", "fp32")
    assert art.bytes == 105 and art.path == "a.onnx" and art.error == {"max_abs": 1e-6}
    assert art.profiles["mel"].opt == (1, 80, 120)
    assert m.model == tiny_model_config
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary folder left behind
    with pytest.raises(BundleError, match="no artifact vocoder/fp16.*vocoder/fp32"):
        m.artifact("vocoder", "fp16")


def test_altered_or_missing_file_is_refused(tmp_path: Path, tiny_model_config) -> None:
    out = tmp_path / "bundle"
    _write(out, tiny_model_config)
    (out / "a.onnx.data").write_bytes(b"\x01" + b"\x00" * 99)
    with pytest.raises(BundleError, match="a.onnx.data: sha256 differs"):
        load_bundle(out)
    (out / "a.onnx").unlink()
    assert any("a.onnx is missing" in p for p in verify_bundle(out))
    assert main(["bundle", "verify", str(out)]) == 1


def test_unknown_version_is_refused(tmp_path: Path, tiny_model_config) -> None:
    out = tmp_path / "bundle"
    _write(out, tiny_model_config)
    raw = json.loads((out / "manifest.json").read_text())
    raw["version"] = 99
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="version 99 is not supported"):
        load_bundle(out)


def test_interrupted_export_leaves_nothing(tmp_path: Path, tiny_model_config) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="exporter died"):
        with BundleWriter(out, model=tiny_model_config, source={}) as w:
            w.path("half.onnx").write_bytes(b"half")
            raise RuntimeError("exporter died")
    assert list(tmp_path.iterdir()) == []


def test_bad_profile_and_duplicates_are_refused(tmp_path: Path, tiny_model_config) -> None:
    with pytest.raises(BundleError, match="min <= opt <= max"):
        with BundleWriter(tmp_path / "b", model=tiny_model_config, source={}) as w:
            w.path("x").write_bytes(b"x")
            w.add("x", "dit", "onnx", "fp32", ["x"], profiles={"x": ShapeProfile((1, 5), (1, 3), (1, 9))})
    assert list(tmp_path.iterdir()) == []


def test_cli_verify_ok(tmp_path: Path, tiny_model_config, capsys: pytest.CaptureFixture) -> None:
    _write(tmp_path / "bundle", tiny_model_config)
    assert main(["bundle", "verify", str(tmp_path / "bundle")]) == 0
    assert "ok:" in capsys.readouterr().out


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path)


def _count_hashes(monkeypatch: pytest.MonkeyPatch) -> list:
    from kimia_edge.runtime import bundle as bundle_module

    hashed: list = []
    real = bundle_module.sha256_file
    monkeypatch.setattr(bundle_module, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    return hashed


def test_later_loads_hash_only_what_changed(tmp_path: Path, tiny_model_config, monkeypatch: pytest.MonkeyPatch) -> None:
    out, cache = tmp_path / "bundle", tmp_path / "cache"
    _write(out, tiny_model_config)
    hashed = _count_hashes(monkeypatch)
    assert verify_bundle(out, cache_dir=cache) == [] and sorted(hashed) == ["a.onnx", "a.onnx.data"]
    hashed.clear()
    load_bundle(out, cache_dir=cache)
    assert hashed == []  # size and mtime match the stamp of the full verification
    data = out / "a.onnx.data"
    data.write_bytes(b"\x01" + b"\x00" * 99)  # same size, new mtime
    with pytest.raises(BundleError, match="a.onnx.data: sha256 differs"):
        load_bundle(out, cache_dir=cache)
    assert hashed == ["a.onnx.data"]
    with pytest.raises(BundleError, match="a.onnx.data: sha256 differs"):  # a failed file is never stamped
        load_bundle(out, cache_dir=cache)


def test_only_the_artifacts_that_open_are_checked(tmp_path: Path, tiny_model_config,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "bundle"
    with BundleWriter(out, model=tiny_model_config, source={}) as w:
        for name in ("vocoder", "dit_step"):
            w.path(f"{name}.onnx").write_bytes(name.encode())
            w.add(name, name, "onnx", "fp32", [f"{name}.onnx"])
    (out / "dit_step.onnx").write_bytes(b"tampered")
    hashed = _count_hashes(monkeypatch)
    load_bundle(out, artifacts=[("vocoder", "fp32")], cache_dir=tmp_path / "cache")
    assert hashed == ["vocoder.onnx"]
    with pytest.raises(BundleError, match="dit_step.onnx: sha256 differs"):
        load_bundle(out, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("path", ["../outside.bin", "/etc/hostname", "link/outside.bin"])
def test_paths_leading_outside_the_bundle_are_refused(tmp_path: Path, tiny_model_config, path: str) -> None:
    out = tmp_path / "bundle"
    _write(out, tiny_model_config)
    (tmp_path / "outside.bin").write_bytes(b"secret")
    (out / "link").symlink_to(tmp_path, target_is_directory=True)
    raw = json.loads((out / "manifest.json").read_text())
    raw["artifacts"][0]["files"][0]["path"] = path
    (out / "manifest.json").write_text(json.dumps(raw))
    problems = verify_bundle(out, cache_dir=tmp_path / "cache")
    assert any("lies outside the bundle folder" in p for p in problems), problems
    assert not any("bytes" in p for p in problems)  # nothing about the outside file is told


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b'{"format": "kimia-edge-bundle", "version": 2, "model": [], "source": {}, "artifacts": []}', "model must be an object"),
])
def test_malformed_manifests_are_refused_with_the_reason(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path)


def test_model_section_round_trips_and_is_validated(tmp_path: Path, tiny_model_config) -> None:
    from kimia_edge.runtime.spec.manifest import ModelConfig

    raw = tiny_model_config.to_dict()
    assert ModelConfig.from_dict(json.loads(json.dumps(raw))) == tiny_model_config
    raw["dit"]["model"]["dit"]["num_heads"] = 7  # does not divide hidden_size
    with pytest.raises(BundleError, match="model.dit: num_heads"):
        ModelConfig.from_dict(raw)
    raw = tiny_model_config.to_dict()
    del raw["special_tokens"]["text_eos"]
    with pytest.raises(BundleError, match="model.special_tokens"):
        ModelConfig.from_dict(raw)


def test_overwrite_replaces_a_bundle_or_an_empty_folder_and_nothing_else(tmp_path: Path, tiny_model_config,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bundle"
    _write(out, tiny_model_config)
    (out / "stale.bin").write_bytes(b"from the old bundle")
    with BundleWriter(out, model=tiny_model_config, source={}, overwrite=True) as w:
        w.path("new.onnx").write_bytes(b"new")
        w.add("vocoder", "vocoder", "onnx", "fp32", ["new.onnx"])
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "new.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging or replaced folder left

    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's work")
    with pytest.raises(FileExistsError, match="is not a kimia-edge bundle"):
        with BundleWriter(mine, model=tiny_model_config, source={}, overwrite=True):
            pass
    assert (mine / "notes.txt").read_text() == "the user's work"
    monkeypatch.chdir(mine)  # `--out . --overwrite` in a user's folder: one line, exit 2, nothing lost
    assert main(["export", "--snapshot", str(tmp_path / "none"), "--out", ".", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a kimia-edge bundle" in err[0]
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # and no staging folder inside it

    empty = tmp_path / "empty"
    empty.mkdir()
    with BundleWriter(empty, model=tiny_model_config, source={}, overwrite=True) as w:
        w.path("x.onnx").write_bytes(b"x")
        w.add("vocoder", "vocoder", "onnx", "fp32", ["x.onnx"])
    assert (empty / "manifest.json").is_file()


def test_bundles_get_a_folders_usual_permissions(tmp_path: Path, tiny_model_config) -> None:
    import os

    out = tmp_path / "bundle"
    _write(out, tiny_model_config)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
