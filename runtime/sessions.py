"""One factory for inference sessions: it chooses the provider per artifact — a TensorRT engine, or ONNX
Runtime with the TensorRT EP, the CUDA EP, or the CPU — and reports which one it got. It never falls back
silently: every fallback is logged with its reason, and ``strict=True`` turns it into an error.

Engines are built on the device (``kimia-edge engines build``, runtime/engines.py) into ``<cache root>/engines``;
the factory looks for the one whose key matches the artifact, this TensorRT version and this GPU. ONNX Runtime's
TensorRT EP keeps its own caches in ``<cache root>/trt-ep``. The cache root is ``cache_dir`` or
``default_cache_dir()``.

The choice itself (``plan_providers``, ``ort_provider_options``, ``find_engine``) needs neither a GPU nor TensorRT
and is unit-tested; running on a GPU is untested here (no GPU on the machines this was written on).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from kimia_edge.runtime import engines
from kimia_edge.runtime.bundle import default_cache_dir, unopenable
from kimia_edge.runtime.spec.manifest import Artifact, ShapeProfile
from kimia_edge.runtime.spec.precisions import ONNX_PRECISIONS, onnx_precision

log = logging.getLogger(__name__)

TRT_ENGINE = "TensorRTEngine"  # our own runner of a prebuilt engine (runtime/trt_engine.py)
TRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda", "tensorrt")
TRT_EP_SUBDIR = "trt-ep"  # ORT TensorRT EP's engine and timing caches, beside engines/ under the cache root


class ProviderUnavailable(RuntimeError):
    """The requested device cannot be used here; the message says why."""


def plan_providers(device: str, ort_available: Sequence[str], engine_runnable: bool) -> List[str]:
    """Providers to try, best first, for ``device`` given what this machine offers.

    ``ort_available``: ``onnxruntime.get_available_providers()``. ``engine_runnable``: an engine for the artifact,
    this TensorRT version and this GPU is in the cache (``find_engine``) and tensorrt + cuda-python import.
    Raises ProviderUnavailable if an explicitly requested device cannot be had. With ONNX Runtime's TensorRT EP the
    list is TensorRT, CUDA, CPU (ONNX Runtime's documented order: TensorRT takes the subgraphs it supports, CUDA the
    rest); ``open_session`` still holds the session to its first provider, so getting CUDA or the CPU first for
    ``device="tensorrt"`` is a logged fallback (an error with ``strict``).
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    gpu_eps = [p for p in (TRT_EP, CUDA_EP) if p in ort_available]
    if device == "cpu":
        return [CPU_EP]
    if device == "tensorrt":
        # ONNX Runtime's documented TensorRT setup: the nodes TensorRT cannot take run on CUDA, not on the CPU
        ort_plan = [TRT_EP] + ([CUDA_EP] if CUDA_EP in ort_available else []) + [CPU_EP]
        plan = ([TRT_ENGINE] if engine_runnable else []) + (ort_plan if TRT_EP in ort_available else [])
        if not plan:
            raise ProviderUnavailable("device 'tensorrt' asked for, but neither a runnable engine nor ONNX Runtime's "
                                      "TensorRT EP is available (install onnxruntime-gpu and TensorRT)")
        return plan
    if device == "cuda":
        if CUDA_EP not in ort_available:
            raise ProviderUnavailable(f"device 'cuda' asked for, but ONNX Runtime offers only {list(ort_available)} "
                                      "(install onnxruntime-gpu instead of onnxruntime)")
        return [CUDA_EP]
    return ([TRT_ENGINE] if engine_runnable else []) + gpu_eps + [CPU_EP]


def trt_shape_string(profiles: Mapping[str, ShapeProfile], which: str) -> str:
    """ORT TensorRT EP profile syntax: ``"x:1x120x80,t:1"`` for ``which`` in min | opt | max."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in getattr(p, which))}" for name, p in sorted(profiles.items()))


def ort_provider_options(provider: str, artifact: Artifact, cache_dir: Optional[Path]) -> Dict[str, Any]:
    """Options for one ORT execution provider, from the artifact's precision (its TensorRT builder flags in the
    precision registry) and profile shapes. ``cache_dir``: the cache root (TensorRT EP caches go to
    ``<root>/trt-ep``); None: no cache."""
    if provider == TRT_EP:
        flags = onnx_precision(artifact.precision).tensorrt or ()  # None: TensorRT builds no engine of it, run as is
        opts: Dict[str, Any] = {
            "trt_fp16_enable": "FP16" in flags,
            "trt_int8_enable": "INT8" in flags,  # explicit quantization: scales come from QDQ nodes
        }
        if cache_dir is not None:
            ep_cache = str(Path(cache_dir) / TRT_EP_SUBDIR)
            opts.update({
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": ep_cache,
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": ep_cache,
            })
        if artifact.profiles:
            for which in ("min", "opt", "max"):
                opts[f"trt_profile_{which}_shapes"] = trt_shape_string(artifact.profiles, which)
        return opts
    if provider == CUDA_EP:
        return {"cudnn_conv_algo_search": "HEURISTIC"}
    return {}


@dataclass
class Session:
    """An opened artifact: ``run(feeds) -> outputs`` plus the provider that actually runs it."""

    name: str
    provider: str
    impl: Any
    output_names: Tuple[str, ...]
    input_names: Tuple[str, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        return self.impl.run(None, dict(feeds))


def find_engine(artifact: Artifact, cache_root: Optional[Path]) -> Tuple[Optional[Path], str]:
    """(path, "") of the cached engine of ``artifact`` for this machine's TensorRT version and GPU — the path
    ``kimia-edge engines build`` writes (default workspace) — or (None, why there is none)."""
    entry = ONNX_PRECISIONS.get(artifact.precision)
    if artifact.format != "onnx" or entry is None or entry.tensorrt is None:
        return None, f"TensorRT builds no engine from a {artifact.format} artifact at {artifact.precision}"
    try:
        target = engines.engine_target()
    except engines.EngineUnavailable as exc:
        return None, str(exc)
    path = engines.engine_path(artifact, cache_root, target.tensorrt_version, target.gpu)
    if not path.is_file():
        return None, f"no engine at {path} (build it on this device: kimia-edge engines build --bundle DIR)"
    return path, ""


def _runnable_engine(artifact: Artifact, cache_root: Path, device: str) -> Optional[Path]:
    """The engine to run ``artifact`` with, or None; says why not (a found engine that cannot run: a warning)."""
    path, why = find_engine(artifact, cache_root)
    if path is None:
        log.log(logging.INFO if device == "tensorrt" else logging.DEBUG, "%s: no TensorRT engine: %s", artifact.name, why)
        return None
    missing = engines.engine_runtime_missing()
    if missing:
        log.warning("%s: engine %s is cached but cannot run here (%s); falling back to ONNX Runtime",
                    artifact.name, path, missing)
        return None
    return path


def open_session(
    bundle_root: Path,
    artifact: Artifact,
    device: str = "auto",
    threads: Optional[int] = None,
    cache_dir: Optional[Path] = None,
    strict: bool = False,
    prepack: bool = True,
    profile_prefix: Optional[str] = None,
    arena: bool = True,
) -> Session:
    """Opens ``artifact`` of the bundle at ``bundle_root`` on the best provider ``device`` allows.

    ``prepack``: ONNX Runtime's CPU kernels repack every MatMul weight into their own layout when the session opens
    (a copy of the weights; 14-26 s for the full-size DiT step here) and run faster afterwards (5.4-7.0 vs 7.05 s per
    full-size DiT step, docs/benchmarks.md). False opens in a fraction of a second on the memory-mapped weights.
    ``arena``: ONNX Runtime's CPU memory arena keeps the activations' memory between runs (the largest run's, for
    the session's life); False returns it after every run (low-memory mode: about 100 MiB less per small-size
    Whisper session after a run, docs/benchmarks.md).

    ``cache_dir``: the cache root (default ``default_cache_dir()``): engines in ``engines/``, the TensorRT EP's
    caches in ``trt-ep/``. Logs the provider it got at INFO, and every fallback at WARNING with the reason; with
    ``strict`` a fallback from the first planned provider raises ProviderUnavailable instead.

    ``profile_prefix``: ONNX Runtime sessions record a per-node profile (each node with the provider that ran it) to
    a JSON file whose name starts with it; ``session.impl.end_profiling()`` returns its path (bench/gpu_check.py
    reads it to refuse a silent CPU fallback node by node).
    """
    import onnxruntime as ort

    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    engine = _runnable_engine(artifact, cache_root, device) if device in ("auto", "tensorrt") else None
    plan = plan_providers(device, ort.get_available_providers(), engine is not None)
    if plan[0] == TRT_ENGINE and engine is not None:
        from kimia_edge.runtime.trt_engine import TrtEngineSession

        try:
            impl = TrtEngineSession(engine)
            log.info("%s: running on the TensorRT engine %s", artifact.name, engine.name)
            return Session(artifact.name, TRT_ENGINE, impl, impl.output_names, impl.input_names)
        except Exception as exc:  # fall through to ORT, loudly
            if strict:
                raise ProviderUnavailable(f"{artifact.name}: TensorRT engine failed to load: {exc}") from exc
            log.warning("%s: TensorRT engine failed to load (%s); trying %s", artifact.name, exc, plan[1:])
        plan = plan[1:]
        if not plan:  # device 'tensorrt' without ORT's TensorRT EP: nothing left that honours the request
            raise ProviderUnavailable(f"{artifact.name}: the TensorRT engine failed to load and ONNX Runtime offers "
                                      "no TensorRT EP")

    so = ort.SessionOptions()
    threads = threads or int(os.environ.get("KIMIA_EDGE_THREADS", "0")) or None
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not prepack:  # the memory-mapped weights are used as they lie: opens in ~0.1 s instead of seconds per GB
        so.add_session_config_entry("session.disable_prepacking", "1")
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    so.enable_cpu_mem_arena = arena
    if TRT_EP in plan:
        try:
            (cache_root / TRT_EP_SUBDIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # ORT then builds without a cache: slower starts, same results
            log.warning("%s: TensorRT EP cache folder not writable (%s)", artifact.name, exc)
    providers = [(p, ort_provider_options(p, artifact, cache_root)) for p in plan]
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf, NoSuchFile

    try:
        impl = ort.InferenceSession(str(bundle_root / artifact.path), sess_options=so, providers=providers)
    except (InvalidProtobuf, InvalidGraph, NoSuchFile, Fail) as exc:  # the file, not the machine
        raise unopenable(bundle_root / artifact.path, f"ONNX Runtime ({artifact.name}/{artifact.precision})",
                         exc) from exc
    got = impl.get_providers()[0]  # what ORT really uses; get_available_providers() lies on CPU-only machines
    if got != plan[0]:
        msg = f"{artifact.name}: asked for {plan[0]}, ONNX Runtime gave {got} (is a GPU visible and is CUDA/TensorRT installed?)"
        if strict:
            raise ProviderUnavailable(msg)
        log.warning(msg)
    log.info("%s (%s) runs on %s", artifact.name, artifact.precision, got)
    return Session(
        artifact.name, got, impl,
        tuple(o.name for o in impl.get_outputs()), tuple(i.name for i in impl.get_inputs()),
    )


def open_file_session(path: Path, threads: Optional[int] = None) -> Session:
    """An ONNX file outside any bundle, on the CPU (tests, benchmarks)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    impl = ort.InferenceSession(str(path), sess_options=so, providers=[CPU_EP])
    return Session(Path(path).stem, CPU_EP, impl, tuple(o.name for o in impl.get_outputs()),
                   tuple(i.name for i in impl.get_inputs()))
