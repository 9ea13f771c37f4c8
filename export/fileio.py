"""Build-time file helpers: staging folders for bundles and snapshots, and the files of an ONNX graph.
``atomic_write`` (a reader never sees half a file) is the runtime's own, re-exported here."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import List

from kimia_edge.runtime.fileio import atomic_write

__all__ = ["atomic_write", "staging_dir", "finish_staging", "remove_stale_staging", "STAGING_MARKER",
           "external_data_file", "graph_files"]

log = logging.getLogger(__name__)

# Inside every staging folder until it is published: who made it (host and pid). A folder is ours and stale only if
# its name has our pattern AND it holds this marker naming a process of this host that no longer runs.
STAGING_MARKER = ".kimia-edge-staging.json"


def staging_dir(out: Path) -> Path:
    """A new empty folder beside ``out`` (``.<name>.partial-*``) to build ``out`` in, with a folder's usual
    permissions (mkdtemp makes it 0700, which a published bundle or snapshot must not keep) and the marker that
    lets a later run recognise it. Staging folders of ``out`` left by a killed run are removed first."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    (tmp / STAGING_MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return tmp


def finish_staging(tmp: Path) -> None:
    """Removes the marker from a complete staging folder, just before it is renamed into place."""
    (Path(tmp) / STAGING_MARKER).unlink(missing_ok=True)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def remove_stale_staging(out: Path) -> List[Path]:
    """Removes the ``.<name>.partial-*`` folders beside ``out`` that a killed run of ours left: each must hold
    STAGING_MARKER naming this host and a process that is gone (a running export's folder, a folder of another
    machine on a shared disk, or anything without our marker is kept). Returns what was removed."""
    out = Path(out).resolve()
    removed = []
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            owner = json.loads((p / STAGING_MARKER).read_text(encoding="utf-8"))
            ours = (p.is_dir() and not p.is_symlink() and owner["host"] == socket.gethostname()
                    and isinstance(owner["pid"], int) and _process_gone(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            ours = False
        if ours:
            shutil.rmtree(p, ignore_errors=True)
            log.warning("removed %s, left by an interrupted run (pid %d)", p, owner["pid"])
            removed.append(p)
    return removed


def external_data_file(graph: Path) -> Path:
    """Where the weights of ``graph`` live when they are external (the exporters' and ORT's naming)."""
    return graph.with_name(graph.name + ".data")


def graph_files(graph: Path) -> List[Path]:
    """The graph and, if it has one, its external-data file."""
    data = external_data_file(graph)
    return [graph] + ([data] if data.exists() else [])
