"""Opening a bundle folder: read its manifest, refuse what does not match it, and do so in proportion.

``verify_bundle`` (``kimia-edge bundle verify``) hashes every file. Opening a bundle to run it checks only the
artifacts that will be opened: every file must lie inside the bundle folder (no ``..``, absolute path or symlink
leading out) and have its listed size; its sha256 is computed only if the file changed (size or modification time)
since the last full hash recorded in a *stamp*. Stamps live in the user's cache folder, one per bundle path, so a
read-only bundle (e.g. on a device's system partition) still opens fast.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .fileio import atomic_write
from .spec.manifest import MANIFEST_NAME, Artifact, BundleError, Manifest, sha256_file

__all__ = ["read_manifest", "verify_bundle", "load_bundle", "ensure_usable", "check_artifacts", "stamp_path",
           "default_cache_dir", "ArtifactOpenError", "unopenable"]

log = logging.getLogger(__name__)

_MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few kB; anything this large is not one


class ArtifactOpenError(BundleError):
    """A file of a bundle that is as the manifest lists it (size and sha256) but cannot be opened: written corrupt
    and hashed afterwards, or made by an incompatible exporter. The message names the file."""


def unopenable(path: Path, opener: str, exc: BaseException) -> ArtifactOpenError:
    """The one-line error for ``path`` that ``opener`` (e.g. "ONNX Runtime") refused with ``exc``."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if len(reason) > 300:
        reason = reason[:300] + "…"
    return ArtifactOpenError(f"{path}: {opener} cannot open it ({type(exc).__name__}: {reason}); the file matches "
                             "the manifest, so the bundle was written corrupt: export it again")


def _npy_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a loadable .npy array (header and length), or None. Reads the header only."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                return "holds Python objects (pickles are never loaded)"
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            held = path.stat().st_size - f.tell()
    except (ValueError, OSError, SyntaxError, TypeError, OverflowError) as e:
        return f"not a .npy array ({type(e).__name__}: {e})"
    return None if held == expected else f"holds {held} bytes of data, its .npy header needs {expected}"


def default_cache_dir() -> Path:
    """``$KIMIA_EDGE_CACHE`` or ``~/.cache/kimia-edge``: demo files, verification stamps, TensorRT engines."""
    return Path(os.environ.get("KIMIA_EDGE_CACHE") or Path.home() / ".cache" / "kimia-edge")


def read_manifest(root: Path) -> Manifest:
    """The manifest of the bundle folder ``root``; BundleError says why it cannot be read."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{root} is not a kimia-edge bundle: {MANIFEST_NAME} is missing")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes is too large for a manifest")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(f"{path}: not UTF-8 text ({e})") from e
    return Manifest.from_json(text, where=str(path))


def _inside(root: Path, relative: str) -> Optional[Path]:
    """``root / relative`` resolved (symlinks followed) if it stays inside ``root``, else None."""
    if not relative or os.path.isabs(relative):
        return None
    resolved = (root / relative).resolve()
    return resolved if resolved.is_relative_to(root.resolve()) else None


def _structure_problems(manifest: Manifest) -> List[str]:
    problems, seen = [], set()
    for a in manifest.artifacts:
        key = (a.name, a.precision)
        if key in seen:
            problems.append(f"artifact {a.name}/{a.precision} is listed twice")
        seen.add(key)
        for prof_name, prof in a.profiles.items():
            try:
                prof.validate(f"{a.name}.{prof_name}")
            except BundleError as e:
                problems.append(str(e))
    return problems


def stamp_path(root: Path, cache_dir: Optional[Path] = None) -> Path:
    """Where the verification stamp of the bundle at ``root`` is kept (one file per resolved bundle path)."""
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:24]
    return Path(cache_dir or default_cache_dir()) / "verified" / f"{key}.json"


def _read_stamp(path: Path) -> Dict[str, List]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {k: v for k, v in data["files"].items() if isinstance(v, list) and len(v) == 3}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_stamp(path: Path, root: Path, files: Dict[str, List]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"bundle": str(Path(root).resolve()), "files": files})
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    except OSError as e:  # an unwritable cache only costs the next start a full hash
        log.info("verification stamp not written (%s): the next start hashes again", e)


def check_artifacts(root: Path, artifacts: Iterable[Artifact], *, full: bool = False,
                    cache_dir: Optional[Path] = None) -> List[str]:
    """Problems with the files of ``artifacts`` (empty if none). Every file must stay inside ``root`` and have its
    listed size; it is hashed if ``full`` or if its size / modification time differ from the stamp of its last
    hash. Files that hash right are recorded in the stamp."""
    root = Path(root)
    spath = stamp_path(root, cache_dir)
    stamp = _read_stamp(spath)
    changed = False
    problems: List[str] = []
    for a in artifacts:
        for f in a.files:
            where = f"{a.name}/{a.precision}: {f.path}"
            p = _inside(root, f.path)
            if p is None:
                problems.append(f"{where} lies outside the bundle folder (absolute, '..' or a symlink out)")
                continue
            if not p.is_file():
                problems.append(f"{where} is missing")
                continue
            st = p.stat()
            if st.st_size != f.bytes:
                problems.append(f"{where} has {st.st_size} bytes, manifest says {f.bytes}")
                continue
            if not full and stamp.get(f.path) == [st.st_size, st.st_mtime_ns, f.sha256]:
                continue
            if sha256_file(p) != f.sha256:
                problems.append(f"{where}: sha256 differs from the manifest (altered or corrupt)")
                stamp.pop(f.path, None)
            elif a.format == "npy" and _npy_problem(p):  # the pipeline np.loads it: check what np.load reads
                problems.append(f"{where}: {_npy_problem(p)}; the file matches the manifest, so the bundle was "
                                "written corrupt: export it again")
                stamp.pop(f.path, None)
            else:
                stamp[f.path] = [st.st_size, st.st_mtime_ns, f.sha256]
            changed = True
    if changed:
        _write_stamp(spath, root, stamp)
    return problems


def verify_bundle(root: Path, cache_dir: Optional[Path] = None) -> List[str]:
    """Full verification: the manifest's structure and every listed file hashed. Returns the problems found."""
    manifest = read_manifest(root)
    return _structure_problems(manifest) + check_artifacts(root, manifest.artifacts, full=True, cache_dir=cache_dir)


def ensure_usable(root: Path, manifest: Manifest, artifacts: Iterable[Artifact],
                  cache_dir: Optional[Path] = None) -> None:
    """Raises BundleError naming every problem of the manifest's structure and of ``artifacts``' files (checked as
    ``check_artifacts`` does: hashed only where the stamp says they changed)."""
    problems = _structure_problems(manifest) + check_artifacts(root, artifacts, cache_dir=cache_dir)
    if problems:
        raise BundleError(f"bundle {root} failed verification:\n  " + "\n  ".join(problems))


def load_bundle(root: Path, verify: bool = True, artifacts: Optional[Sequence[Tuple[str, Optional[str]]]] = None,
                cache_dir: Optional[Path] = None) -> Manifest:
    """Reads a bundle's manifest and checks it; BundleError names every problem.

    ``artifacts``: (name, precision or None) of the artifacts that will be opened; only their files are checked
    (default: all). Checks use the stamp (see ``check_artifacts``); ``verify=False`` reads the manifest only."""
    root = Path(root)
    manifest = read_manifest(root)
    if verify:
        chosen = manifest.artifacts if artifacts is None else [manifest.artifact(n, p) for n, p in artifacts]
        ensure_usable(root, manifest, chosen, cache_dir)
    return manifest
