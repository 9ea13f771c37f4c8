"""TensorRT engines from the bundle's ONNX graphs: fp16, or int8 from a calibrated QDQ graph (explicit
quantization), with one optimization profile per graph from the manifest's min/opt/max shapes, a timing
cache, and an engine cache keyed by everything that makes an engine unusable elsewhere (ONNX bytes,
TensorRT version, GPU name and compute capability, precision, profiles, workspace).

Untested on GPU: TensorRT cannot be installed on the machines this was written on (the PyPI packages are
placeholders that download from NVIDIA's own index). Everything that does not need the library — the cache
key, the build configuration — is plain Python and unit-tested.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict

from kimia_edge.export.fileio import atomic_write
from kimia_edge.runtime.spec.manifest import ShapeProfile

log = logging.getLogger(__name__)

ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_WORKSPACE_BYTES = 2 << 30  # fits Jetson Orin NX 8 GB next to the LLM


@dataclass(frozen=True)
class GpuIdentity:
    name: str
    compute_capability: str  # "8.7" for Orin


@dataclass(frozen=True)
class EngineBuildConfig:
    precision: str
    profiles: Dict[str, ShapeProfile] = field(default_factory=dict)
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES

    def validate(self) -> None:
        if self.precision not in ENGINE_PRECISIONS:
            raise ValueError(f"precision must be one of {ENGINE_PRECISIONS}, got {self.precision!r}")
        if self.workspace_bytes <= 0:
            raise ValueError(f"workspace_bytes must be positive, got {self.workspace_bytes}")
        for name, p in self.profiles.items():
            p.validate(name)


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


def engine_file_name(artifact_name: str, key: str) -> str:
    return f"{artifact_name}.{key}.engine"


def current_gpu() -> GpuIdentity:
    """The GPU this process would build for (needs cuda-python)."""
    from cuda import cudart

    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise RuntimeError(f"no CUDA device (cudaGetDeviceProperties error {err})")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuIdentity(name=name.strip("\x00"), compute_capability=f"{props.major}.{props.minor}")


def build_engine(onnx_path: Path, onnx_sha256: str, artifact_name: str, config: EngineBuildConfig, cache_dir: Path) -> Path:
    """Builds (or finds in ``cache_dir``) the engine for ``onnx_path``; returns its path. Needs TensorRT and a GPU."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError("TensorRT is not installed: engines can only be built on a machine with an NVIDIA GPU and "
                           "TensorRT (JetPack on Jetson; `pip install .[gpu]` elsewhere)") from exc
    config.validate()
    gpu = current_gpu()
    key = engine_cache_key(onnx_sha256, trt.__version__, gpu, config)
    cache_dir.mkdir(parents=True, exist_ok=True)
    engine_path = cache_dir / engine_file_name(artifact_name, key)
    if engine_path.is_file():
        log.info("%s: engine cache hit %s", artifact_name, engine_path.name)
        return engine_path

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse the graph: {errors}")
    bc = builder.create_builder_config()
    bc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    if config.precision in ("fp16", "int8"):
        bc.set_flag(trt.BuilderFlag.FP16)
    if config.precision == "int8":
        bc.set_flag(trt.BuilderFlag.INT8)  # scales come from the graph's QDQ nodes
    if config.profiles:
        profile = builder.create_optimization_profile()
        for name, p in config.profiles.items():
            profile.set_shape(name, p.min, p.opt, p.max)
        bc.add_optimization_profile(profile)
    timing_path = cache_dir / f"timing.{trt.__version__}.{gpu.compute_capability}.cache"
    timing = bc.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    bc.set_timing_cache(timing, ignore_mismatch=False)

    log.info("%s: building a %s TensorRT engine (minutes on Jetson)", artifact_name, config.precision)
    serialized = builder.build_serialized_network(network, bc)
    if serialized is None:
        raise RuntimeError(f"{artifact_name}: TensorRT failed to build the engine (see the log above)")
    atomic_write(engine_path, lambda f: f.write(bytes(serialized)))
    atomic_write(timing_path, lambda f: f.write(bytes(bc.get_timing_cache().serialize())))
    return engine_path


