"""Writing bundles atomically: everything goes into a temporary folder beside the target, the manifest is
written last, and the folder is renamed into place only when complete. An interrupted export leaves no
half bundle (at most a ``.<name>.partial-*`` folder, removed on the way out, or by the next export to the same
place if the process was killed). Overwriting replaces only an earlier
bundle or an empty folder, never a folder that holds anything else."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, Dict, List, Optional, Sequence, Type

from kimia_edge import __version__
from kimia_edge.export.fileio import finish_staging, mark_staging, staging_dir
from kimia_edge.runtime.spec.manifest import (FORMAT, MANIFEST_NAME, Artifact, BundleError, FileEntry, Manifest,
                                              ModelConfig, ShapeProfile)


def check_replaceable(out: Path) -> None:
    """Raises unless ``out`` may be replaced by a new bundle: it is a kimia-edge bundle (its manifest names our
    format, any version) or an empty folder. A folder holding anything else is never deleted."""
    out = Path(out)
    if not out.is_dir() or out.is_symlink():
        raise FileExistsError(f"{out} exists and is not a folder: not replacing it")
    if not any(out.iterdir()):
        return
    try:
        is_bundle = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        is_bundle = False
    if not is_bundle:
        raise FileExistsError(f"{out} is not a kimia-edge bundle (no {MANIFEST_NAME} of format {FORMAT!r}): "
                              "--overwrite replaces only a bundle or an empty folder; choose another --out")


class BundleWriter:
    """Context manager that builds a bundle at ``out``.

    >>> with BundleWriter(out, model=cfg, source=src) as w:
    ...     path = w.path("dit_step.fp32.onnx")      # write the file there
    ...     w.add("dit_step", "dit", "onnx", "fp32", ["dit_step.fp32.onnx"], error={"max_abs": 1e-5})
    """

    def __init__(self, out: Path, model: ModelConfig, source: Dict[str, Any], overwrite: bool = False) -> None:
        self.out = Path(out)
        self.model = model
        self.source = source
        self.overwrite = overwrite
        self._artifacts: List[Artifact] = []
        self._tmp: Optional[Path] = None

    def __enter__(self) -> "BundleWriter":
        if self.out.exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.out} already exists (pass overwrite=True / --overwrite to replace it)")
            check_replaceable(self.out)
        self._tmp = staging_dir(self.out)
        return self

    @property
    def root(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("BundleWriter is used outside its with-block")
        return self._tmp

    def path(self, relative: str) -> Path:
        """Where to write a file of the bundle (inside the temporary folder)."""
        p = self.root / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add(
        self,
        name: str,
        component: str,
        format: str,
        precision: str,
        files: Sequence[str],
        error: Optional[Dict[str, float]] = None,
        profiles: Optional[Dict[str, ShapeProfile]] = None,
        extra: Optional[Dict[str, Any]] = None,
    ) -> Artifact:
        """Lists an artifact whose files were written under ``path(...)``; hashes them now."""
        if any(a.name == name and a.precision == precision for a in self._artifacts):
            raise BundleError(f"artifact {name}/{precision} added twice")
        for prof_name, prof in (profiles or {}).items():
            prof.validate(f"{name}.{prof_name}")
        artifact = Artifact(
            name=name, component=component, format=format, precision=precision,
            files=tuple(FileEntry.of(self.root, f) for f in files),
            error=dict(error or {}), profiles=dict(profiles or {}), extra=dict(extra or {}),
        )
        self._artifacts.append(artifact)
        return artifact

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        tmp = self.root
        try:
            if exc_type is not None:
                return
            manifest = Manifest(model=self.model, source=self.source, artifacts=tuple(self._artifacts),
                                created_by=f"kimia-edge {__version__}")
            (tmp / MANIFEST_NAME).write_text(manifest.to_json())
            # a kill at any point below leaves what the next export to this place cleans up (fileio.py)
            if self.out.exists():
                check_replaceable(self.out)  # again: it may have changed during a long export
                old = tmp.with_name(tmp.name.replace(".partial-", ".replaced-"))
                self.out.rename(old)
                mark_staging(old)
                tmp.rename(self.out)
                self._tmp = None
                shutil.rmtree(old)
            else:
                tmp.rename(self.out)
                self._tmp = None
            finish_staging(self.out)
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
