"""Provider choice, TensorRT EP options and finding a cached engine: the GPU seam's logic, which needs no GPU."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kimia_edge.runtime import engines
from kimia_edge.runtime.engines import EngineTarget, GpuIdentity, engine_path, engine_runtime_missing
from kimia_edge.runtime.spec.manifest import Artifact, FileEntry, ShapeProfile
from kimia_edge.runtime.sessions import (
    CPU_EP, CUDA_EP, TRT_ENGINE, TRT_EP, ProviderUnavailable, find_engine, open_session, ort_provider_options,
    plan_providers, trt_shape_string,
)

GPU_ORT = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_ORT = ["CPUExecutionProvider"]


def test_auto_prefers_engine_then_trt_ep_then_cuda_then_cpu() -> None:
    assert plan_providers("auto", GPU_ORT, engine_runnable=True) == [TRT_ENGINE, TRT_EP, CUDA_EP, CPU_EP]
    assert plan_providers("auto", GPU_ORT, engine_runnable=False) == [TRT_EP, CUDA_EP, CPU_EP]
    assert plan_providers("auto", CPU_ORT, engine_runnable=False) == [CPU_EP]
    assert plan_providers("cpu", GPU_ORT, engine_runnable=True) == [CPU_EP]


def test_tensorrt_lists_cuda_between_tensorrt_and_the_cpu() -> None:
    """ONNX Runtime's documented TensorRT setup: what TensorRT cannot take runs on CUDA, not on the CPU."""
    assert plan_providers("tensorrt", GPU_ORT, engine_runnable=False) == [TRT_EP, CUDA_EP, CPU_EP]
    assert plan_providers("tensorrt", GPU_ORT, engine_runnable=True) == [TRT_ENGINE, TRT_EP, CUDA_EP, CPU_EP]
    # an ONNX Runtime build with the TensorRT EP but without CUDA's: nothing is invented
    assert plan_providers("tensorrt", [TRT_EP, CPU_EP], engine_runnable=False) == [TRT_EP, CPU_EP]
    # only our engine: nothing after it honours 'tensorrt', so no CUDA or CPU to fall to
    assert plan_providers("tensorrt", [CUDA_EP, CPU_EP], engine_runnable=True) == [TRT_ENGINE]
    assert plan_providers("cuda", GPU_ORT, engine_runnable=True) == [CUDA_EP]


def test_explicit_gpu_device_on_a_cpu_machine_is_an_error_not_a_fallback() -> None:
    with pytest.raises(ProviderUnavailable, match="onnxruntime-gpu"):
        plan_providers("cuda", CPU_ORT, engine_runnable=False)
    with pytest.raises(ProviderUnavailable, match="TensorRT"):
        plan_providers("tensorrt", CPU_ORT, engine_runnable=False)
    with pytest.raises(ValueError, match="device must be"):
        plan_providers("gpu", CPU_ORT, engine_runnable=False)


def _artifact(precision: str, tmp_path: Path) -> Artifact:
    return Artifact("dit_step", "dit", "onnx", precision, (FileEntry("m.onnx", 1, "ab" * 32),), profiles={
        "x_t": ShapeProfile((1, 1, 80), (1, 168, 80), (1, 400, 80)),
        "t": ShapeProfile((1,), (1,), (1,)),
    })


def test_trt_ep_options_follow_precision_and_profiles(tmp_path: Path) -> None:
    fp16 = ort_provider_options(TRT_EP, _artifact("fp16", tmp_path), tmp_path / "cache")
    assert fp16["trt_fp16_enable"] and not fp16["trt_int8_enable"]
    assert fp16["trt_profile_opt_shapes"] == "t:1,x_t:1x168x80"
    assert fp16["trt_engine_cache_path"] == fp16["trt_timing_cache_path"] == str(tmp_path / "cache" / "trt-ep")
    int8 = ort_provider_options(TRT_EP, _artifact("int8_qdq", tmp_path), None)
    assert int8["trt_int8_enable"] and int8["trt_fp16_enable"] and "trt_engine_cache_path" not in int8
    for precision in ("fp32", "int8_dynamic"):  # no builder flags in the registry: TensorRT runs it as it is
        opts = ort_provider_options(TRT_EP, _artifact(precision, tmp_path), None)
        assert not opts["trt_fp16_enable"] and not opts["trt_int8_enable"]
    with pytest.raises(ValueError, match="precision 'int4'"):
        ort_provider_options(TRT_EP, _artifact("int4", tmp_path), None)
    assert ort_provider_options(CPU_EP, _artifact("fp32", tmp_path), None) == {}


def test_shape_string_syntax() -> None:
    assert trt_shape_string({"b": ShapeProfile((1, 2), (1, 3), (1, 4)), "a": ShapeProfile((5,), (6,), (7,))}, "max") == "a:7,b:1x4"


def _double_graph(root: Path, precision: str = "fp32") -> Artifact:
    """A one-node ONNX graph (y = x + x) in ``root``, listed as a bundle would list it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "double", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), root / "double.onnx")
    return Artifact("double", "test", "onnx", precision, (FileEntry.of(root, "double.onnx"),),
                    profiles={"x": ShapeProfile((1,), (4,), (16,))})


def test_open_session_on_cpu_reports_the_provider_it_got(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    art = _double_graph(tmp_path)
    with caplog.at_level(logging.INFO, logger="kimia_edge.runtime.sessions"):
        sess = open_session(tmp_path, art, device="cpu", threads=1, cache_dir=tmp_path / "cache")
    assert sess.provider == CPU_EP and "runs on CPUExecutionProvider" in caplog.text
    (out,) = sess.run({"x": np.array([1.5, -2.0], dtype=np.float32)})
    assert out.tolist() == [3.0, -4.0]


def test_fast_start_opens_without_repacking_the_weights(tmp_path: Path) -> None:
    art = _double_graph(tmp_path)
    key = "session.disable_prepacking"
    packed = open_session(tmp_path, art, device="cpu", threads=1, cache_dir=tmp_path / "cache")
    fast = open_session(tmp_path, art, device="cpu", threads=1, cache_dir=tmp_path / "cache", prepack=False)
    assert fast.impl.get_session_options().get_session_config_entry(key) == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # the default: ORT prepacks
        packed.impl.get_session_options().get_session_config_entry(key)
    x = {"x": np.array([0.25, 8.0], dtype=np.float32)}
    assert fast.run(x)[0].tolist() == packed.run(x)[0].tolist() == [0.5, 16.0]


NO_TRT = engine_runtime_missing()
ORIN = EngineTarget("10.3.0", GpuIdentity("Orin", "8.7"))


@pytest.mark.skipif(NO_TRT is None, reason="TensorRT and cuda-python import here: the GPU test covers this")
def test_factory_finds_the_cached_engine_and_logs_why_it_cannot_run_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine sits where `kimia-edge engines build` would put it for this (pretended) TensorRT and GPU; there
    is no tensorrt module, so the factory must say so and fall back to ONNX Runtime."""
    art = _double_graph(tmp_path, "fp16")
    cache = tmp_path / "cache"
    monkeypatch.setattr(engines, "engine_target", lambda: ORIN)
    placed = engine_path(art, cache, ORIN.tensorrt_version, ORIN.gpu)
    assert placed.parent == cache / "engines"
    assert find_engine(art, cache)[0] is None  # not built yet
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"engine")
    assert find_engine(art, cache) == (placed, "")
    with caplog.at_level(logging.INFO, logger="kimia_edge.runtime.sessions"):
        sess = open_session(tmp_path, art, device="auto", threads=1, cache_dir=cache)
    assert sess.provider == CPU_EP
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(placed) in m and "TensorRT is not installed" in m and "falling back" in m for m in warned), warned
    with pytest.raises(ProviderUnavailable, match="TensorRT"):  # asked for explicitly: an error, not a fallback
        open_session(tmp_path, art, device="tensorrt", cache_dir=cache)


def test_factory_looks_for_the_engine_of_this_gpu_and_tensorrt_only(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    art = _double_graph(tmp_path, "fp16")
    cache = tmp_path / "cache"
    other = engine_path(art, cache, ORIN.tensorrt_version, GpuIdentity("RTX 4090", "8.9"))
    other.parent.mkdir(parents=True)
    other.write_bytes(b"engine for another GPU")
    monkeypatch.setattr(engines, "engine_target", lambda: ORIN)
    path, why = find_engine(art, cache)
    assert path is None and str(engine_path(art, cache, ORIN.tensorrt_version, ORIN.gpu)) in why
    # a precision TensorRT builds no engine from is not looked for at all
    assert find_engine(_double_graph(tmp_path, "int8_dynamic"), cache)[0] is None


@pytest.mark.skipif(NO_TRT is None, reason="TensorRT and cuda-python import here")
def test_without_tensorrt_the_factory_names_what_is_missing(tmp_path: Path) -> None:
    path, why = find_engine(_double_graph(tmp_path, "fp16"), tmp_path / "cache")
    assert path is None and "TensorRT is not installed" in why
