"""The bundle: a folder with ``manifest.json`` and the artifacts it lists. It is the only thing that crosses
from build time to run time, so its schema lives here (torch-free) and both worlds use it.

A manifest names its format and version, carries the model config the runtime needs, says where it came
from, and lists every artifact with its files, their sizes and sha256, precision, measured error and the
TensorRT profile shapes of its inputs. ``load_bundle`` refuses a bundle whose version is unknown or whose
files do not match.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

FORMAT = "kimia-edge-bundle"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
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
    format: str  # "onnx" | "gguf" | "tensorrt"
    precision: str  # "fp32" | "fp16" | "int8_dynamic" | "int8_qdq" | "F32" | "Q4_K_M" ...
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
    model: Dict[str, Any]  # the model config the runtime needs (dims, rates, special ids, streaming constants)
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
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise BundleError(f"{where}: not valid JSON ({e})") from e
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
            return cls(model=raw["model"], source=raw["source"], artifacts=artifacts,
                       created_by=raw.get("created_by", ""), format=raw["format"], version=raw["version"])
        except (KeyError, TypeError) as e:
            raise BundleError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e


def verify_bundle(root: Path) -> List[str]:
    """Checks every listed file against its size and sha256. Returns the problems found (empty if none)."""
    manifest = read_manifest(root)
    problems = []
    names = set()
    for a in manifest.artifacts:
        key = (a.name, a.precision)
        if key in names:
            problems.append(f"artifact {a.name}/{a.precision} is listed twice")
        names.add(key)
        for prof_name, prof in a.profiles.items():
            try:
                prof.validate(f"{a.name}.{prof_name}")
            except BundleError as e:
                problems.append(str(e))
        for f in a.files:
            p = root / f.path
            if not p.is_file():
                problems.append(f"{a.name}/{a.precision}: file {f.path} is missing")
            elif p.stat().st_size != f.bytes:
                problems.append(f"{a.name}/{a.precision}: {f.path} has {p.stat().st_size} bytes, manifest says {f.bytes}")
            elif sha256_file(p) != f.sha256:
                problems.append(f"{a.name}/{a.precision}: {f.path} sha256 differs from the manifest (altered or corrupt)")
    return problems


def read_manifest(root: Path) -> Manifest:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{root} is not a kimia-edge bundle: {MANIFEST_NAME} is missing")
    return Manifest.from_json(path.read_text(), where=str(path))


def load_bundle(root: Path, verify: bool = True) -> Manifest:
    """Reads and (by default) verifies a bundle; raises BundleError naming every problem."""
    root = Path(root)
    manifest = read_manifest(root)
    if verify:
        problems = verify_bundle(root)
        if problems:
            raise BundleError(f"bundle {root} failed verification:\n  " + "\n  ".join(problems))
    return manifest
