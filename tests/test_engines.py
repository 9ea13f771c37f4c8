"""TensorRT engines built on the target (runtime/engines.py): the cache key and path and the builder flags from the
precision registry are tested here without TensorRT; building and running an engine needs TensorRT and a GPU and
skips without them."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kimia_edge.runtime.engines import (
    DEFAULT_WORKSPACE_BYTES, EngineBuildConfig, EngineUnavailable, GpuIdentity, build_engine, builder_flags,
    engine_cache_key, engine_path, engine_runtime_missing, engine_target, engines_dir, onnx_digest,
)
from kimia_edge.runtime.spec.manifest import Artifact, FileEntry, ShapeProfile

ORIN = GpuIdentity("Orin", "8.7")
PROF = {"x": ShapeProfile((1, 1), (1, 8), (1, 16))}


def _gpu_reason() -> str:
    try:
        engine_target()
    except EngineUnavailable:
        return "no TensorRT / no GPU on this machine"
    return ""


NO_GPU = _gpu_reason()


def _artifact(precision: str = "fp16", files: Optional[Dict[str, str]] = None) -> Artifact:
    files = files or {"g.onnx": "ab" * 32}
    return Artifact("vocoder", "vocoder", "onnx", precision, tuple(FileEntry(p, 1, h) for p, h in files.items()),
                    profiles=dict(PROF))


def test_builder_flags_come_from_the_precision_registry() -> None:
    assert builder_flags("fp32") == ()
    assert builder_flags("fp16") == ("FP16",)
    assert builder_flags("int8_qdq") == ("FP16", "INT8")
    with pytest.raises(ValueError, match=r"cannot build an engine from the int8_dynamic variant.*fp32, fp16, int8_qdq"):
        builder_flags("int8_dynamic")
    with pytest.raises(ValueError, match="precision 'int8'"):  # the old local spelling is not a precision
        builder_flags("int8")
    with pytest.raises(ValueError, match="int8_dynamic"):
        EngineBuildConfig("int8_dynamic").validate()


def test_engine_cache_key_changes_with_everything_that_matters() -> None:
    base = engine_cache_key("abc", "10.3.0", ORIN, EngineBuildConfig("fp16", PROF))
    assert base == engine_cache_key("abc", "10.3.0", ORIN, EngineBuildConfig("fp16", dict(PROF)))
    variants = [
        engine_cache_key("abd", "10.3.0", ORIN, EngineBuildConfig("fp16", PROF)),
        engine_cache_key("abc", "10.4.0", ORIN, EngineBuildConfig("fp16", PROF)),
        engine_cache_key("abc", "10.3.0", GpuIdentity("RTX 4090", "8.9"), EngineBuildConfig("fp16", PROF)),
        engine_cache_key("abc", "10.3.0", GpuIdentity("Orin", "8.9"), EngineBuildConfig("fp16", PROF)),
        engine_cache_key("abc", "10.3.0", ORIN, EngineBuildConfig("int8_qdq", PROF)),
        engine_cache_key("abc", "10.3.0", ORIN, EngineBuildConfig("fp16", {"x": ShapeProfile((1, 1), (1, 8), (1, 32))})),
        engine_cache_key("abc", "10.3.0", ORIN, EngineBuildConfig("fp16", PROF, workspace_bytes=1 << 30)),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    with pytest.raises(ValueError, match="workspace"):
        engine_cache_key("abc", "10", ORIN, EngineBuildConfig("fp16", workspace_bytes=0))


def test_engine_path_is_keyed_by_the_manifest_hashes_under_the_cache_root(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    art = _artifact()
    path = engine_path(art, tmp_path, "10.3.0", ORIN)
    key = engine_cache_key("ab" * 32, "10.3.0", ORIN, EngineBuildConfig("fp16", PROF, DEFAULT_WORKSPACE_BYTES))
    assert path == tmp_path / "engines" / f"vocoder.{key}.engine"
    assert engine_path(art, tmp_path, "10.3.0", ORIN, workspace_bytes=1 << 30) != path
    monkeypatch.setenv("KIMIA_EDGE_CACHE", str(tmp_path / "env-cache"))
    assert engines_dir() == tmp_path / "env-cache" / "engines"
    assert engine_path(art, None, "10.3.0", ORIN) == tmp_path / "env-cache" / "engines" / path.name
    # external data: the weights file is part of the key, not only the .onnx
    one = _artifact(files={"g.onnx": "ab" * 32, "g.onnx.data": "cd" * 32})
    two = _artifact(files={"g.onnx": "ab" * 32, "g.onnx.data": "ce" * 32})
    assert onnx_digest(art) == "ab" * 32 and onnx_digest(one) != onnx_digest(two)
    assert engine_path(one, tmp_path, "10.3.0", ORIN) != engine_path(two, tmp_path, "10.3.0", ORIN)
    with pytest.raises(ValueError, match="int8_dynamic"):
        engine_path(_artifact("int8_dynamic"), tmp_path, "10.3.0", ORIN)
    gguf = Artifact("llm_trunk", "llm", "gguf", "F16", (FileEntry("t.gguf", 1, "ab" * 32),))
    with pytest.raises(ValueError, match="from ONNX graphs, not gguf"):
        engine_path(gguf, tmp_path, "10.3.0", ORIN)


@pytest.mark.skipif(engine_runtime_missing() is None, reason="TensorRT and cuda-python import here")
def test_building_without_tensorrt_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match="TensorRT is not installed.*built on the target"):
        build_engine(tmp_path, _artifact(), tmp_path / "cache")
    with pytest.raises(ValueError, match="int8_dynamic"):  # refused before TensorRT is even looked for
        build_engine(tmp_path, _artifact("int8_dynamic"), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# --- GPU ----------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(bool(NO_GPU), reason=NO_GPU or "-")
def test_engine_is_built_once_then_cached_and_the_factory_runs_it(tmp_path: Path) -> None:
    from kimia_edge.runtime.sessions import TRT_ENGINE, open_session

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n"])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "double", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "double.onnx")
    art = Artifact("double", "test", "onnx", "fp32", (FileEntry.of(tmp_path, "double.onnx"),), profiles=dict(PROF))
    path, built = build_engine(tmp_path, art, tmp_path / "cache")
    assert built and path.is_file()
    assert build_engine(tmp_path, art, tmp_path / "cache") == (path, False)
    sess = open_session(tmp_path, art, device="tensorrt", cache_dir=tmp_path / "cache")
    assert sess.provider == TRT_ENGINE
    (out,) = sess.run({"x": np.arange(5, dtype=np.float32)[None]})
    assert out.tolist() == [[0.0, 2.0, 4.0, 6.0, 8.0]]
