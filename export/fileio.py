"""Writing files so that a reader never sees half of one: write to a temporary file beside the target, then
rename over it (atomic on POSIX). An interrupted write leaves the old file, or none."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, List

FILE_MODE = 0o644  # mkstemp creates 0600; published files are world-readable like any other


def staging_dir(out: Path) -> Path:
    """A new empty folder beside ``out`` (``.<name>.partial-*``) to build ``out`` in, with a folder's usual
    permissions (mkdtemp makes it 0700, which a published bundle or snapshot must not keep)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Calls ``write(f)`` on a temporary file in ``path``'s folder and renames it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def external_data_file(graph: Path) -> Path:
    """Where the weights of ``graph`` live when they are external (the exporters' and ORT's naming)."""
    return graph.with_name(graph.name + ".data")


def graph_files(graph: Path) -> List[Path]:
    """The graph and, if it has one, its external-data file."""
    data = external_data_file(graph)
    return [graph] + ([data] if data.exists() else [])
