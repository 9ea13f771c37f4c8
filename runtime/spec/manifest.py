"""The bundle: a folder with ``manifest.json`` and the artifacts it lists. It is the only thing that crosses
from build time to run time, so its schema lives here (torch-free) and both worlds use it.

A manifest names its format and version, carries the model config the runtime needs (``ModelConfig``: typed,
validated on read), says where it came from, and lists every artifact with its files, their sizes and sha256,
precision, measured error and the TensorRT profile shapes of its inputs. Opening and verifying a bundle folder is
``kimia_edge.runtime.bundle``'s job.

Version 2: the ``model`` section holds each config in its own ``to_dict`` spelling and the special token ids.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from ..audio_encoder_config import VQEncoderConfig, WhisperEncoderConfig
from ..dit_config import DitConfig
from ..llm_config import KimiaConfig
from ..special_tokens import SpecialTokens
from ..vocoder_config import VocoderConfig
from .streaming import StreamingConfig

FORMAT = "kimia-edge-bundle"
VERSION = 2
SUPPORTED_VERSIONS = (2,)
MANIFEST_NAME = "manifest.json"
_HASH_CHUNK_BYTES = 1 << 22


class BundleError(ValueError):
    """A bundle is missing, unreadable, of an unknown version, or does not match its manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _special_tokens(data: Mapping[str, Any]) -> SpecialTokens:
    fields = {f.name for f in dataclasses.fields(SpecialTokens)}
    if set(data) != fields:
        raise ValueError(f"expected the ids {sorted(fields)}, got {sorted(data)}")
    tokens = SpecialTokens(**{k: int(v) for k, v in data.items()})
    tokens.validate()
    return tokens


# section -> (reader of its dict form, writer); each config class keeps its own validated spelling
_SECTIONS: Dict[str, Tuple[Callable[[Mapping[str, Any]], Any], Callable[[Any], Dict[str, Any]]]] = {
    "llm": (lambda d: KimiaConfig.from_dict(d, source="manifest model.llm"), lambda c: c.to_dict()),
    "special_tokens": (_special_tokens, dataclasses.asdict),
    "whisper_encoder": (WhisperEncoderConfig.from_dict, lambda c: c.to_dict()),
    "vq_encoder": (lambda d: VQEncoderConfig.from_dict(d, d.get("features")), dataclasses.asdict),
    "dit": (DitConfig.from_dict, lambda c: c.to_dict()),
    "streaming": (StreamingConfig.from_dict, lambda c: c.to_dict()),
    "vocoder": (VocoderConfig.from_dict, lambda c: c.to_dict()),
}


@dataclass(frozen=True)
class ModelConfig:
    """The model config the runtime needs, read from the snapshot at export time: LLM dims and token offset, the
    special ids, both audio encoders, the DiT, the official streaming schedule and the vocoder."""

    llm: KimiaConfig
    special_tokens: SpecialTokens
    whisper_encoder: WhisperEncoderConfig
    vq_encoder: VQEncoderConfig
    dit: DitConfig
    streaming: StreamingConfig
    vocoder: VocoderConfig

    def to_dict(self) -> Dict[str, Any]:
        return {name: write(getattr(self, name)) for name, (_, write) in _SECTIONS.items()}

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> "ModelConfig":
        """Reads and validates every section; BundleError names the section and what is wrong."""
        if not isinstance(data, Mapping):
            raise BundleError(f"{where}: model must be an object, got {type(data).__name__}")
        missing, unknown = sorted(set(_SECTIONS) - set(data)), sorted(set(data) - set(_SECTIONS))
        if missing or unknown:
            raise BundleError(f"{where}: model sections missing {missing}, unknown {unknown}")
        sections = {}
        for name, (read, _) in _SECTIONS.items():
            if not isinstance(data[name], Mapping):
                raise BundleError(f"{where}: model.{name} must be an object, got {type(data[name]).__name__}")
            try:
                sections[name] = read(data[name])
            except (ValueError, TypeError, KeyError) as e:
                raise BundleError(f"{where}: model.{name}: {e}") from e
        return cls(**sections)

    @property
    def token_offset(self) -> int:
        """First id of the audio vocabulary in the LLM's id space (config.json kimia_token_offset)."""
        return self.llm.kimia_token_offset

    @property
    def output_sample_rate_hz(self) -> int:
        return int(self.vocoder.sampling_rate)


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact, relative to the bundle folder."""

    path: str
    bytes: int
    sha256: str

    @classmethod
    def of(cls, root: Path, relative: str) -> "FileEntry":
        p = root / relative
        return cls(path=relative, bytes=p.stat().st_size, sha256=sha256_file(p))


@dataclass(frozen=True)
class ShapeProfile:
    """min / opt / max shape of one input, for TensorRT optimization profiles."""

    min: Tuple[int, ...]
    opt: Tuple[int, ...]
    max: Tuple[int, ...]

    def validate(self, name: str) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise BundleError(f"profile of {name}: min/opt/max ranks differ: {self.min} {self.opt} {self.max}")
        if any(not (a <= b <= c) for a, b, c in zip(self.min, self.opt, self.max)):
            raise BundleError(f"profile of {name}: need min <= opt <= max per axis, got {self.min} {self.opt} {self.max}")


@dataclass(frozen=True)
class Artifact:
    """One deployable model file set (an ONNX graph with its external data, a GGUF, an engine)."""

    name: str  # e.g. "dit_step", "vocoder", "llm_trunk"
    component: str  # "whisper_encoder" | "vq_encoder" | "adaptor" | "dit" | "vocoder" | "llm"
    format: str  # "onnx" | "gguf" | "npy" | "tiktoken"
    precision: str  # a name of the precision registry (spec/precisions.py) or a GGUF type (F16, Q4_K_M, ...)
    files: Tuple[FileEntry, ...]
    error: Dict[str, float] = field(default_factory=dict)  # measured against the reference at export time
    profiles: Dict[str, ShapeProfile] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """The main file (the first listed)."""
        return self.files[0].path

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


@dataclass(frozen=True)
class Manifest:
    model: ModelConfig
    source: Dict[str, Any]  # the snapshot it came from: path, revision, config fingerprints
    artifacts: Tuple[Artifact, ...]
    created_by: str = ""
    format: str = FORMAT
    version: int = VERSION

    def artifact(self, name: str, precision: Optional[str] = None) -> Artifact:
        """The artifact called ``name`` (at ``precision`` if given); a BundleError lists what there is."""
        for a in self.artifacts:
            if a.name == name and (precision is None or a.precision == precision):
                return a
        have = ", ".join(f"{a.name}/{a.precision}" for a in self.artifacts) or "nothing"
        want = f"{name}/{precision}" if precision else name
        raise BundleError(f"bundle has no artifact {want}; it has {have}")

    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        raw["model"] = self.model.to_dict()
        return json.dumps(raw, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise BundleError(f"{where}: not valid JSON ({type(e).__name__}: {e})") from e
        if not isinstance(raw, dict):
            raise BundleError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("format") != FORMAT:
            raise BundleError(f"{where}: format is {raw.get('format')!r}, expected {FORMAT!r}")
        if raw.get("version") not in SUPPORTED_VERSIONS:
            raise BundleError(
                f"{where}: bundle version {raw.get('version')!r} is not supported by this kimia-edge "
                f"(supported: {SUPPORTED_VERSIONS}); re-export it or upgrade kimia-edge"
            )
        try:
            artifacts = tuple(
                Artifact(
                    name=a["name"], component=a["component"], format=a["format"], precision=a["precision"],
                    files=tuple(FileEntry(**f) for f in a["files"]),
                    error=dict(a.get("error", {})),
                    profiles={k: ShapeProfile(tuple(p["min"]), tuple(p["opt"]), tuple(p["max"])) for k, p in a.get("profiles", {}).items()},
                    extra=dict(a.get("extra", {})),
                )
                for a in raw["artifacts"]
            )
            return cls(model=ModelConfig.from_dict(raw["model"], where), source=raw["source"], artifacts=artifacts,
                       created_by=raw.get("created_by", ""), format=raw["format"], version=raw["version"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e
