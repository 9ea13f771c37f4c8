"""TensorRT engines, built on the target: an engine only runs on the TensorRT version and GPU that built it, so the
bundle carries ONNX graphs and their profile shapes (``Artifact.profiles``) and the device builds its engines from
them (``kimia-edge engines build --bundle DIR``, see ``runtime/engines_cli.py``). Engines are cached under
``<cache root>/engines`` (cache root: ``default_cache_dir()`` unless given), one file per artifact named by a key
of everything that makes an engine wrong to reuse: the ONNX sha256 from the manifest, the TensorRT version, the
GPU name and compute capability, the precision, the profiles and the workspace. The session factory
(``runtime/sessions.py``) computes the same path to find them.

Builder flags come from the precision registry (``ONNX_PRECISIONS[name].tensorrt``): fp32 none, fp16 FP16, int8
QDQ FP16 + INT8 (explicit quantization: the scales are the graph's QDQ nodes); a precision whose entry is None
(int8 dynamic) is refused.

Untested on GPU: TensorRT cannot be installed on the machines this was written on. ``tensorrt`` and cuda-python
are imported inside the functions that need them; everything else (keys, paths, flags) is unit-tested.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from kimia_edge.runtime.bundle import default_cache_dir
from kimia_edge.runtime.fileio import atomic_write
from kimia_edge.runtime.spec.manifest import Artifact, ShapeProfile
from kimia_edge.runtime.spec.precisions import ONNX_PRECISIONS, onnx_precision

__all__ = ["ENGINES_SUBDIR", "DEFAULT_WORKSPACE_BYTES", "EngineUnavailable", "GpuIdentity", "EngineTarget",
           "EngineBuildConfig", "builder_flags", "buildable_precisions", "engine_cache_key", "onnx_digest",
           "engines_dir", "engine_config", "engine_path", "engine_target", "engine_runtime_missing", "build_engine",
           "cuda_runtime"]

log = logging.getLogger(__name__)

ENGINES_SUBDIR = "engines"
DEFAULT_WORKSPACE_BYTES = 2 << 30  # fits Jetson Orin NX 8 GB next to the LLM
_INSTALL_HINT = ("engines are built on the target: an NVIDIA GPU with TensorRT and cuda-python (JetPack's TensorRT on "
                 "Jetson; `pip install .[gpu] cuda-python` elsewhere)")


class EngineUnavailable(RuntimeError):
    """TensorRT engines cannot be built or run here; the message names what is missing."""


@dataclass(frozen=True)
class GpuIdentity:
    name: str
    compute_capability: str  # "8.7" for Orin


@dataclass(frozen=True)
class EngineTarget:
    """What an engine is bound to besides its graph: the TensorRT version and the GPU."""

    tensorrt_version: str
    gpu: GpuIdentity


def buildable_precisions() -> Tuple[str, ...]:
    """The registry's precisions TensorRT can build an engine from."""
    return tuple(name for name, p in ONNX_PRECISIONS.items() if p.tensorrt is not None)


def builder_flags(precision: str) -> Tuple[str, ...]:
    """The ``trt.BuilderFlag`` names ``precision`` needs, from the registry; ValueError if TensorRT cannot build it."""
    entry = onnx_precision(precision)
    if entry.tensorrt is None:
        raise ValueError(f"TensorRT cannot build an engine from the {precision} variant ({entry.description}); "
                         f"it builds {', '.join(buildable_precisions())}")
    return entry.tensorrt


@dataclass(frozen=True)
class EngineBuildConfig:
    precision: str
    profiles: Dict[str, ShapeProfile] = field(default_factory=dict)
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES

    def validate(self) -> None:
        """ValueError (or BundleError for a profile) naming what is wrong."""
        builder_flags(self.precision)
        if self.workspace_bytes <= 0:
            raise ValueError(f"workspace_bytes must be positive, got {self.workspace_bytes}")
        for name, p in self.profiles.items():
            p.validate(name)

    @property
    def flags(self) -> Tuple[str, ...]:
        return builder_flags(self.precision)


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu: GpuIdentity, config: EngineBuildConfig) -> str:
    """A key that changes whenever a cached engine would be wrong to reuse."""
    config.validate()
    payload = {
        "onnx": onnx_sha256,
        "tensorrt": trt_version,
        "gpu": asdict(gpu),
        "precision": config.precision,
        "workspace": config.workspace_bytes,
        "profiles": {k: [list(p.min), list(p.opt), list(p.max)] for k, p in sorted(config.profiles.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def onnx_digest(artifact: Artifact) -> str:
    """The graph's sha256 from the manifest; with external data (more than one file) a digest of every file's
    path and sha256, since the weights live outside the ``.onnx`` file."""
    if len(artifact.files) == 1:
        return artifact.files[0].sha256
    lines = "".join(f"{f.path}\0{f.sha256}\n" for f in artifact.files)
    return hashlib.sha256(lines.encode()).hexdigest()


def engines_dir(cache_root: Optional[Path] = None) -> Path:
    """``<cache root>/engines``; the cache root defaults to ``default_cache_dir()``."""
    return Path(cache_root if cache_root is not None else default_cache_dir()) / ENGINES_SUBDIR


def engine_config(artifact: Artifact, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> EngineBuildConfig:
    """The build configuration of ``artifact``: its precision and its profiles from the manifest."""
    return EngineBuildConfig(artifact.precision, dict(artifact.profiles), workspace_bytes)


def engine_path(artifact: Artifact, cache_root: Optional[Path], trt_version: str, gpu: GpuIdentity,
                workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> Path:
    """Where the engine of ``artifact`` for this TensorRT version and GPU is cached (a pure function: the builder
    writes there, the session factory looks there). ValueError for a format or precision TensorRT cannot build."""
    if artifact.format != "onnx":
        raise ValueError(f"{artifact.name}/{artifact.precision}: TensorRT builds engines from ONNX graphs, "
                         f"not {artifact.format}")
    key = engine_cache_key(onnx_digest(artifact), trt_version, gpu, engine_config(artifact, workspace_bytes))
    return engines_dir(cache_root) / f"{artifact.name}.{key}.engine"


def cuda_runtime() -> Any:
    """cuda-python's runtime API (``cuda.bindings.runtime`` since 12.6, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def engine_runtime_missing() -> Optional[str]:
    """None if the ``tensorrt`` and cuda-python modules import here, else what is missing."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: bindings installed without libnvinfer
        return f"TensorRT is not installed ({exc})"
    try:
        cuda_runtime()
    except (ImportError, OSError) as exc:
        return f"cuda-python is not installed ({exc})"
    return None


def current_gpu() -> GpuIdentity:
    """The GPU this process builds for and runs on (device 0); EngineUnavailable if there is none."""
    cudart = cuda_runtime()
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise EngineUnavailable(f"no CUDA GPU is visible (cudaGetDeviceProperties: error {err})")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuIdentity(name=name.strip("\x00").strip(), compute_capability=f"{props.major}.{props.minor}")


def engine_target() -> EngineTarget:
    """This machine's TensorRT version and GPU; EngineUnavailable names what is missing (one line)."""
    missing = engine_runtime_missing()
    if missing:
        raise EngineUnavailable(f"{missing}; {_INSTALL_HINT}")
    import tensorrt as trt

    return EngineTarget(tensorrt_version=trt.__version__, gpu=current_gpu())


def build_engine(bundle_root: Path, artifact: Artifact, cache_root: Optional[Path] = None,
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> Tuple[Path, bool]:
    """Builds the engine of ``artifact`` (an ONNX graph of the bundle at ``bundle_root``), or finds it in the cache.
    Returns (engine path, True if built now). Needs TensorRT and a GPU (EngineUnavailable otherwise). Untested on GPU.
    """
    config = engine_config(artifact, workspace_bytes)
    flags = config.flags  # refuses a precision TensorRT cannot build before looking for TensorRT
    target = engine_target()
    path = engine_path(artifact, cache_root, target.tensorrt_version, target.gpu, workspace_bytes)
    if path.is_file():
        log.info("%s: engine cache hit %s", artifact.name, path.name)
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    import tensorrt as trt

    onnx_path = Path(bundle_root) / artifact.path
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse the graph: {errors}")
    bc = builder.create_builder_config()
    bc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    for flag in flags:
        bc.set_flag(getattr(trt.BuilderFlag, flag))
    if config.profiles:
        profile = builder.create_optimization_profile()
        for name, p in config.profiles.items():
            profile.set_shape(name, p.min, p.opt, p.max)
        bc.add_optimization_profile(profile)
    timing_path = path.parent / f"timing.{target.tensorrt_version}.{target.gpu.compute_capability}.cache"
    timing = bc.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    bc.set_timing_cache(timing, ignore_mismatch=False)

    log.info("%s: building a %s TensorRT engine (minutes on Jetson)", artifact.name, config.precision)
    serialized = builder.build_serialized_network(network, bc)
    if serialized is None:
        raise RuntimeError(f"{artifact.name}: TensorRT failed to build the engine (see the log above)")
    atomic_write(path, lambda f: f.write(bytes(serialized)))
    atomic_write(timing_path, lambda f: f.write(bytes(bc.get_timing_cache().serialize())))
    return path, True
