"""Writing files so that a reader never sees half of one: write to a temporary file beside the target, then
rename over it (atomic on POSIX). An interrupted write leaves the old file, or none. Used by both worlds (bundle
stamps and TensorRT engines at run time, snapshot files at build time)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

FILE_MODE = 0o644  # mkstemp creates 0600; published files are world-readable like any other


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
