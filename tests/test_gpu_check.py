"""bench/gpu_check.{sh,py}, the GPU-ready check, on a machine without a GPU: the CPU run of the same driver passes
with CPUExecutionProvider as the expected provider, every GPU path asked for here is refused as a silent CPU
fallback (not passed), and the shell script stops at its first step. Timings are printed, never asserted."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kimia_edge.runtime.sessions import CPU_EP, CUDA_EP, TRT_EP

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check(bench_module):
    return bench_module("gpu_check")


def _no_gpu_here() -> None:
    import llama_cpp
    import onnxruntime as ort

    if CUDA_EP in ort.get_available_providers() or llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this machine has GPU-capable onnxruntime or llama.cpp: the refusal cases need a CPU-only one")


def _rows(path: Path) -> list:
    return json.loads(path.read_text())


def test_cpu_run_passes_with_the_cpu_as_expected_provider(gpu_check, tiny_bundle: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rows.json"
    rc = gpu_check.main(["--bundle", str(tiny_bundle), "--device", "cpu", "--precisions", "fp32", "--work",
                         str(tmp_path / "work"), "--repeats", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    rows = _rows(out)
    assert rc == 0, printed
    assert "all" in printed and "rows passed" in printed and "load average" in printed
    graphs = [r for r in rows if r["path"] == "ort-cpu"]
    assert [r["stage"] for r in graphs] == ["whisper_encoder", "vq_encoder", "dit_step", "vocoder"]
    for r in graphs:  # the profile says every node ran on the CPU; same provider, same feeds: same outputs
        assert r["provider"].startswith(CPU_EP) and "nodes" in r["provider"]
        assert r["rel_l2"] <= 1e-6 and r["max_abs"] <= 1e-5 and r["ms"] > 0
    (llm,) = [r for r in rows if r["path"] == "llama-cpu"]
    assert llm["provider"].startswith("llama.cpp 0/") and llm["rel_l2"] <= 1e-6 and llm["precision"] == "F16"
    turn = {r["stage"]: r for r in rows if r["path"] == "e2e-cpu"}
    assert turn["detokenizer+vocoder"]["rtf"] > 0 and turn["detokenizer+vocoder"]["first_audio_s"] > 0
    assert turn["LLM decode"]["ms"] > 0 and turn["audio tokenizer"]["rtf"] > 0
    header = printed.splitlines()[2]
    for column in ("path", "stage", "provider", "RTF", "first audio s", "max abs", "rel L2", "status"):
        assert column in header


def test_asking_for_the_gpu_here_is_refused_as_a_silent_cpu_fallback(gpu_check, tiny_bundle: Path,
                                                                       tmp_path: Path) -> None:
    _no_gpu_here()
    out = tmp_path / "rows.json"
    rc = gpu_check.main(["--bundle", str(tiny_bundle), "--paths", "ort-cuda", "ort-tensorrt", "trt-engine",
                         "llama-gpu", "e2e-cuda", "--precisions", "fp32", "--work", str(tmp_path / "work"),
                         "--repeats", "1", "--json", str(out)])
    rows = _rows(out)
    assert rc == 1
    assert all(r["status"] == "ok" for r in rows if r["path"] == "reference")
    gpu_rows = [r for r in rows if r["path"] != "reference"]
    assert {r["path"] for r in gpu_rows} == {"ort-cuda", "ort-tensorrt", "trt-engine", "llama-gpu", "e2e-cuda"}
    assert all(r["status"] == "FAIL" and r["rel_l2"] is None for r in gpu_rows)  # nothing measured, nothing passed
    for r in gpu_rows:
        if r["path"] == "trt-engine":  # the engines verb itself says why
            assert "engines build exited 2" in r["detail"] and "TensorRT" in r["detail"]
        else:
            assert "silent CPU fallback" in r["detail"] and r["path"] in r["detail"]


def _matmul_model(path: Path) -> Path:
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_session_that_asked_for_cuda_and_runs_on_the_cpu_is_refused(gpu_check, tmp_path: Path) -> None:
    """What onnxruntime-gpu does on a machine whose CUDA cannot load, and the CPU package always: it warns and runs on
    the CPU. The check reads the session's real providers and its profile."""
    import onnxruntime as ort

    _no_gpu_here()
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "profile")
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        session = ort.InferenceSession(str(_matmul_model(tmp_path / "m.onnx")), so,
                                       providers=[CUDA_EP, CPU_EP])
    session.run(None, {"x": np.ones((2, 4), np.float32)})
    placement = gpu_check.profile_placement(Path(session.end_profiling()))
    assert placement == {CPU_EP: Counter({"MatMul": 1})}
    with pytest.raises(gpu_check.SilentFallback, match="silent CPU fallback: asked for CUDAExecutionProvider"):
        gpu_check.check_placement("ort-cuda", session.get_providers(), placement, CUDA_EP)
    assert gpu_check.check_placement("ort-cpu", session.get_providers(), placement, CPU_EP) == \
        f"{CPU_EP} 1/1 nodes"


def test_compute_nodes_left_on_the_cpu_fail_shape_glue_does_not(gpu_check) -> None:
    providers = [CUDA_EP, CPU_EP]
    ok = {CUDA_EP: Counter({"MatMul": 4, "Softmax": 2}), CPU_EP: Counter({"Shape": 3, "Gather": 1})}
    assert gpu_check.check_placement("ort-cuda", providers, ok, CUDA_EP) == f"{CUDA_EP} 6/10 nodes"
    bad = {CUDA_EP: Counter({"Add": 4}), CPU_EP: Counter({"MatMul": 2, "Conv": 1, "Shape": 1})}
    with pytest.raises(gpu_check.SilentFallback, match=r"compute nodes ran on CPUExecutionProvider \(Conv x1, MatMul x2\)"):
        gpu_check.check_placement("ort-cuda", providers, bad, CUDA_EP)
    with pytest.raises(gpu_check.SilentFallback, match="no node ran on CUDAExecutionProvider"):
        gpu_check.check_placement("ort-cuda", providers, {CPU_EP: Counter({"Add": 1})}, CUDA_EP)
    with pytest.raises(gpu_check.CheckFailed, match="lists no node"):
        gpu_check.check_placement("ort-cuda", providers, {}, CUDA_EP)


def test_tensorrt_nodes_left_to_cuda_pass_and_are_named_the_cpu_still_fails(gpu_check) -> None:
    """The TensorRT EP's session lists TensorRT, CUDA, CPU (runtime/sessions.plan_providers): nodes TensorRT cannot
    take run on CUDA, which is no CPU fallback; a compute node on the CPU still is."""
    providers = [TRT_EP, CUDA_EP, CPU_EP]
    ok = {TRT_EP: Counter({"TRTKernel_graph_0": 2}), CUDA_EP: Counter({"Softmax": 1}), CPU_EP: Counter({"Shape": 1})}
    assert gpu_check.check_placement("ort-tensorrt", providers, ok, TRT_EP) == f"{TRT_EP} 2/4 nodes ({CUDA_EP} 1)"
    bad = {TRT_EP: Counter({"TRTKernel_graph_0": 1}), CUDA_EP: Counter({"Softmax": 1}), CPU_EP: Counter({"MatMul": 1})}
    with pytest.raises(gpu_check.SilentFallback, match=r"compute nodes ran on CPUExecutionProvider \(MatMul x1\)"):
        gpu_check.check_placement("ort-tensorrt", providers, bad, TRT_EP)
    with pytest.raises(gpu_check.SilentFallback, match="asked for TensorrtExecutionProvider"):  # CUDA got it all
        gpu_check.check_placement("ort-tensorrt", [CUDA_EP, CPU_EP], {CUDA_EP: Counter({"MatMul": 1})}, TRT_EP)


def test_llama_offload_is_read_from_its_log_and_partial_offload_fails(gpu_check) -> None:
    def load(devices: list) -> str:
        return "".join(f"load_tensors: layer {i:3d} assigned to device {d}, is_swa = 0\n" for i, d in enumerate(devices))

    log = load(["CUDA0"] * 29) + "llama_context: ...\n" + load(["CPU"] * 2 + ["CUDA0"] * 5)
    assert gpu_check.offloaded_layers(log) == [(29, 29), (5, 7)]
    # without the per-layer lines: the summary line GPU builds print
    counts = gpu_check.offloaded_layers("load_tensors: offloaded 29/29 layers to GPU\nload_tensors: offloaded 7/7 layers to GPU\n")
    assert counts == [(29, 29), (7, 7)]
    assert gpu_check.check_offload("llama-gpu", True, counts, 2, True) == "llama.cpp 29/29, 7/7 layers on GPU"
    with pytest.raises(gpu_check.SilentFallback, match="offloaded 20/29 layers"):
        gpu_check.check_offload("llama-gpu", True, [(20, 29), (7, 7)], 2, True)
    with pytest.raises(gpu_check.SilentFallback, match="no GPU offload"):
        gpu_check.check_offload("llama-gpu", False, counts, 2, True)
    with pytest.raises(gpu_check.CheckFailed, match="1 offloaded-layer counts for 2 models"):
        gpu_check.check_offload("llama-gpu", True, counts[:1], 2, True)
    with pytest.raises(gpu_check.CheckFailed, match="on the CPU path"):
        gpu_check.check_offload("llama-cpu", False, counts, 2, False)


def test_parity_is_max_abs_and_rel_l2_over_all_outputs(gpu_check) -> None:
    ref = [np.array([3.0, 4.0]), np.array([[0.0]])]
    assert gpu_check.parity(ref, [np.array([3.0, 4.0]), np.array([[0.0]])]) == (0.0, 0.0)
    max_abs, rel = gpu_check.parity(ref, [np.array([3.0, 4.5]), np.array([[0.0]])])
    assert max_abs == pytest.approx(0.5) and rel == pytest.approx(0.1)
    with pytest.raises(gpu_check.CheckFailed, match="expected"):
        gpu_check.parity(ref, [np.array([3.0, 4.0])])


def test_the_script_stops_at_its_first_step_without_nvidia_smi(tmp_path: Path) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi is on this machine: the script would start installing")
    env = dict(os.environ, GPU_CHECK_DIR=str(tmp_path / "work"))
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 2
    assert "1/6" in done.stdout and "nvidia-smi not found" in done.stderr
    assert not (tmp_path / "work" / "venv").exists()
