"""Provider choice, TensorRT EP options and engine cache keys: the GPU seam's logic, which needs no GPU."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kimia_edge.export.bundle import BundleWriter
from kimia_edge.export.tensorrt import EngineBuildConfig, GpuIdentity, build_engine, engine_cache_key
from kimia_edge.runtime.bundle import load_bundle
from kimia_edge.runtime.spec.manifest import ShapeProfile
from kimia_edge.runtime.sessions import (
    CPU_EP, CUDA_EP, TRT_ENGINE, TRT_EP, ProviderUnavailable, open_session, ort_provider_options, plan_providers,
    trt_shape_string,
)

GPU_ORT = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_ORT = ["CPUExecutionProvider"]


def test_auto_prefers_engine_then_trt_ep_then_cuda_then_cpu() -> None:
    assert plan_providers("auto", GPU_ORT, engine_runnable=True) == [TRT_ENGINE, TRT_EP, CUDA_EP, CPU_EP]
    assert plan_providers("auto", GPU_ORT, engine_runnable=False) == [TRT_EP, CUDA_EP, CPU_EP]
    assert plan_providers("auto", CPU_ORT, engine_runnable=False) == [CPU_EP]
    assert plan_providers("cpu", GPU_ORT, engine_runnable=True) == [CPU_EP]


def test_explicit_gpu_device_on_a_cpu_machine_is_an_error_not_a_fallback() -> None:
    with pytest.raises(ProviderUnavailable, match="onnxruntime-gpu"):
        plan_providers("cuda", CPU_ORT, engine_runnable=False)
    with pytest.raises(ProviderUnavailable, match="TensorRT"):
        plan_providers("tensorrt", CPU_ORT, engine_runnable=False)
    with pytest.raises(ValueError, match="device must be"):
        plan_providers("gpu", CPU_ORT, engine_runnable=False)


def _artifact(precision: str, tmp_path: Path, tiny_model_config):
    with BundleWriter(tmp_path / precision, model=tiny_model_config, source={}) as w:
        w.path("m.onnx").write_bytes(b"x")
        w.add("dit_step", "dit", "onnx", precision, ["m.onnx"], profiles={
            "x_t": ShapeProfile((1, 1, 80), (1, 168, 80), (1, 400, 80)),
            "t": ShapeProfile((1,), (1,), (1,)),
        })
    return load_bundle(tmp_path / precision).artifacts[0]


def test_trt_ep_options_follow_precision_and_profiles(tmp_path: Path, tiny_model_config) -> None:
    fp16 = ort_provider_options(TRT_EP, _artifact("fp16", tmp_path, tiny_model_config), tmp_path / "cache")
    assert fp16["trt_fp16_enable"] and not fp16["trt_int8_enable"]
    assert fp16["trt_profile_opt_shapes"] == "t:1,x_t:1x168x80"
    assert fp16["trt_engine_cache_path"] == str(tmp_path / "cache")
    int8 = ort_provider_options(TRT_EP, _artifact("int8_qdq", tmp_path, tiny_model_config), None)
    assert int8["trt_int8_enable"] and "trt_engine_cache_path" not in int8
    assert ort_provider_options(CPU_EP, _artifact("fp32", tmp_path, tiny_model_config), None) == {}


def test_engine_cache_key_changes_with_everything_that_matters() -> None:
    gpu = GpuIdentity("Orin", "8.7")
    prof = {"x": ShapeProfile((1, 1), (1, 8), (1, 16))}
    base = engine_cache_key("abc", "10.3.0", gpu, EngineBuildConfig("fp16", prof))
    assert base == engine_cache_key("abc", "10.3.0", gpu, EngineBuildConfig("fp16", dict(prof)))
    variants = [
        engine_cache_key("abd", "10.3.0", gpu, EngineBuildConfig("fp16", prof)),
        engine_cache_key("abc", "10.4.0", gpu, EngineBuildConfig("fp16", prof)),
        engine_cache_key("abc", "10.3.0", GpuIdentity("RTX 4090", "8.9"), EngineBuildConfig("fp16", prof)),
        engine_cache_key("abc", "10.3.0", gpu, EngineBuildConfig("int8", prof)),
        engine_cache_key("abc", "10.3.0", gpu, EngineBuildConfig("fp16", {"x": ShapeProfile((1, 1), (1, 8), (1, 32))})),
        engine_cache_key("abc", "10.3.0", gpu, EngineBuildConfig("fp16", prof, workspace_bytes=1 << 30)),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    with pytest.raises(ValueError, match="precision"):
        engine_cache_key("abc", "10", gpu, EngineBuildConfig("int4"))


def test_shape_string_syntax() -> None:
    assert trt_shape_string({"b": ShapeProfile((1, 2), (1, 3), (1, 4)), "a": ShapeProfile((5,), (6,), (7,))}, "max") == "a:7,b:1x4"


def test_open_session_on_cpu_reports_the_provider_it_got(tmp_path: Path, tiny_model_config,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "double", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with BundleWriter(tmp_path / "b", model=tiny_model_config, source={}) as w:
        onnx.save(model, w.path("double.onnx"))
        w.add("double", "test", "onnx", "fp32", ["double.onnx"])
    art = load_bundle(tmp_path / "b").artifacts[0]
    with caplog.at_level(logging.INFO, logger="kimia_edge.runtime.sessions"):
        sess = open_session(tmp_path / "b", art, device="cpu", threads=1)
    assert sess.provider == CPU_EP and "runs on CPUExecutionProvider" in caplog.text
    (out,) = sess.run({"x": np.array([1.5, -2.0], dtype=np.float32)})
    assert out.tolist() == [3.0, -4.0]


def test_building_an_engine_without_tensorrt_says_what_is_needed(tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the GPU build test covers this machine")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="TensorRT is not installed"):
        build_engine(tmp_path / "m.onnx", "abc", "m", EngineBuildConfig("fp16"), tmp_path)
