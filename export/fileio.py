"""Build-time file helpers: staging folders for bundles and snapshots, and the files of an ONNX graph.
``atomic_write`` (a reader never sees half a file) is the runtime's own, re-exported here."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List

from kimia_edge.runtime.fileio import atomic_write

__all__ = ["atomic_write", "staging_dir", "external_data_file", "graph_files"]



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


def external_data_file(graph: Path) -> Path:
    """Where the weights of ``graph`` live when they are external (the exporters' and ORT's naming)."""
    return graph.with_name(graph.name + ".data")


def graph_files(graph: Path) -> List[Path]:
    """The graph and, if it has one, its external-data file."""
    data = external_data_file(graph)
    return [graph] + ([data] if data.exists() else [])
