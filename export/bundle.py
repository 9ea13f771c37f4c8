"""Writing bundles atomically: everything goes into a temporary folder beside the target, the manifest is
written last, and the folder is renamed into place only when complete. An interrupted export leaves no
half bundle (at most a ``.<name>.partial-*`` folder, removed on the way out)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Dict, List, Optional, Sequence, Type

from kimia_edge import __version__
from kimia_edge.runtime.spec.manifest import (MANIFEST_NAME, Artifact, BundleError, FileEntry, Manifest, ModelConfig,
                                              ShapeProfile)


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
        if self.out.exists() and not self.overwrite:
            raise FileExistsError(f"{self.out} already exists (pass overwrite=True / --overwrite to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
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
            if self.out.exists():
                shutil.rmtree(self.out)
            tmp.rename(self.out)
            self._tmp = None
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
