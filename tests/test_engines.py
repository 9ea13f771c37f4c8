"""TensorRT engines built on the target (runtime/engines.py, `kimia-edge engines build`): the cache key and path,
the builder flags from the precision registry, the choice of graphs and the verb's refusals are tested here
without TensorRT; building and running an engine needs TensorRT and a GPU and skips without them."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kimia_edge.cli import main
from kimia_edge.export.bundle import BundleWriter
from kimia_edge.runtime.engines import (
    DEFAULT_WORKSPACE_BYTES, EngineBuildConfig, EngineTarget, EngineUnavailable, GpuIdentity, build_engine, builder_flags,
    engine_cache_key, engine_path, engine_runtime_missing, engine_target, engines_dir, onnx_digest,
)
from kimia_edge.runtime.engines_cli import engine_artifacts
from kimia_edge.runtime.bundle import read_manifest
from kimia_edge.runtime.spec.manifest import Artifact, FileEntry, ModelConfig, ShapeProfile

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


# --- the verb -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_config(tiny_model_config: ModelConfig) -> ModelConfig:
    return tiny_model_config


def _bundle(out: Path, model: ModelConfig, graphs: Dict[str, tuple]) -> Path:
    """A bundle with placeholder files (nothing here parses them): ``graphs`` {name: precisions}, plus the LLM,
    codebook and tokenizer every pipeline opens."""
    with BundleWriter(out, model=model, source={}) as w:
        for name, precisions in graphs.items():
            for precision in precisions:
                w.path(f"{name}.{precision}.onnx").write_bytes(f"{name} {precision}".encode())
                w.add(name, name, "onnx", precision, [f"{name}.{precision}.onnx"], profiles=PROF)
        for name, component, fmt, precision, path in [("llm_trunk", "llm", "gguf", "F16", "t.gguf"),
                                                      ("llm_audio", "llm", "gguf", "F16", "a.gguf"),
                                                      ("vq_codebook", "vq_encoder", "npy", "fp32", "cb.npy"),
                                                      ("text_tokenizer", "tokenizer", "files", "-", "tok.model")]:
            w.path(path).write_bytes(path.encode())
            w.add(name, component, fmt, precision, [path])
    return out


ALL = {"whisper_encoder": ("fp32", "fp16", "int8_qdq"), "vq_encoder": ("fp32", "fp16"),
       "dit_step": ("fp32", "fp16", "int8_dynamic"), "vocoder": ("fp32",)}


def test_the_verb_builds_what_the_pipeline_opens(tmp_path: Path, model_config: ModelConfig) -> None:
    manifest = read_manifest(_bundle(tmp_path / "b", model_config, ALL))
    chosen = {g: a.precision for g, a in engine_artifacts(manifest, "fp16").items()}
    assert chosen == {"whisper_encoder": "fp16", "vq_encoder": "fp16", "dit_step": "fp16", "vocoder": "fp32"}
    chosen = {g: a.precision for g, a in engine_artifacts(manifest, "int8_qdq", text_only=True).items()}
    assert chosen == {"whisper_encoder": "int8_qdq", "vq_encoder": "fp32"}  # the VQ graph never opens int8
    with pytest.raises(ValueError, match="dit_step: TensorRT cannot build an engine from the int8_dynamic"):
        engine_artifacts(manifest, "fp16,dit_step=int8_dynamic")
    text_only = read_manifest(_bundle(tmp_path / "t", model_config,
                                      {k: v for k, v in ALL.items() if k in ("whisper_encoder", "vq_encoder")}))
    assert set(engine_artifacts(text_only, "fp16")) == {"whisper_encoder", "vq_encoder"}


@pytest.mark.skipif(not NO_GPU, reason="TensorRT and a GPU are here: the GPU test builds for real")
def test_the_verb_without_tensorrt_prints_one_line_and_exits_2(tmp_path: Path, model_config: ModelConfig,
                                                              capsys: pytest.CaptureFixture) -> None:
    bundle = _bundle(tmp_path / "b", model_config, ALL)
    cache = tmp_path / "cache"
    rc = main(["engines", "build", "--bundle", str(bundle), "--cache-dir", str(cache)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: cannot build TensorRT engines here: ")
    assert ("TensorRT is not installed" in err) or ("cuda-python is not installed" in err) or ("no CUDA GPU" in err)
    assert not (cache / "engines").exists()


def test_the_verb_reports_cached_engines_where_the_session_factory_looks(
        tmp_path: Path, model_config: ModelConfig, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a (pretended) TensorRT 10.3 on an Orin, engines placed at the factory's path are reported as cached;
    the one missing would need TensorRT to build and is reported as failed (exit 1), the others still listed."""
    from kimia_edge.runtime import engines
    from kimia_edge.runtime.sessions import find_engine

    bundle = _bundle(tmp_path / "b", model_config, ALL)
    cache = tmp_path / "cache"
    monkeypatch.setattr(engines, "engine_target", lambda: EngineTarget("10.3.0", ORIN))
    graphs = engine_artifacts(read_manifest(bundle), "fp16")
    placed = {}
    for graph in ("whisper_encoder", "vq_encoder", "dit_step"):
        placed[graph] = engine_path(graphs[graph], cache, "10.3.0", ORIN)
        placed[graph].parent.mkdir(parents=True, exist_ok=True)
        placed[graph].write_bytes(b"engine")
        assert find_engine(graphs[graph], cache) == (placed[graph], "")
    rc = main(["engines", "build", "--bundle", str(bundle), "--cache-dir", str(cache)])
    out, err = capsys.readouterr()
    rows = [line.split() for line in out.splitlines()[2:]]
    assert rc == 1 and out.splitlines()[0].startswith("TensorRT 10.3.0 on Orin (compute 8.7); engines in ")
    assert out.splitlines()[1].split() == ["graph", "precision", "engine", "file", "status"]
    assert rows[:3] == [[g, "fp16", placed[g].name, "cached"] for g in ("whisper_encoder", "vq_encoder", "dit_step")]
    assert rows[3] == ["vocoder", "fp32", "-", "FAILED"] and "error: vocoder:" in err


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


def test_a_precision_opens_only_on_the_graphs_the_registry_makes_it_of(tmp_path: Path, model_config: ModelConfig,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """int4 is made of MatMul graphs only: asked for everywhere, the vocoder opens fp32 without looking for it."""
    from kimia_edge.runtime.pipeline import PipelineOptions, choose_artifacts

    have = {**ALL, "whisper_encoder": ("fp32", "int4_matmulnbits"), "dit_step": ("fp32", "int4_matmulnbits")}
    manifest = read_manifest(_bundle(tmp_path / "b", model_config, have))
    with caplog.at_level("INFO"):
        chosen = choose_artifacts(manifest, PipelineOptions(precision="int4_matmulnbits"))
    assert {g: chosen[g].precision for g in ALL} == {"whisper_encoder": "int4_matmulnbits", "vq_encoder": "fp32",
                                                     "dit_step": "int4_matmulnbits", "vocoder": "fp32"}
    assert "vocoder: int4_matmulnbits is not used" in caplog.text and "no vocoder variant" not in caplog.text
    with pytest.raises(ValueError, match="TensorRT cannot build an engine from the int4_matmulnbits"):
        engine_artifacts(manifest, "fp16,dit_step=int4_matmulnbits")
