"""Build-time file helpers: staging folders for bundles and snapshots, and the files of an ONNX graph.
``atomic_write`` (a reader never sees half a file) is the runtime's own, re-exported here."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional

from kimia_edge.runtime.fileio import atomic_write

__all__ = ["atomic_write", "staging_dir", "mark_staging", "finish_staging", "remove_stale_staging", "STAGING_MARKER",
           "external_data_file", "graph_files", "unshared_graph"]

log = logging.getLogger(__name__)

# Inside every staging folder until it is published: who made it (host and pid). A folder is ours and stale only if
# its name has our pattern AND it holds this marker naming a process of this host that no longer runs.
STAGING_MARKER = ".kimia-edge-staging.json"


def staging_dir(out: Path) -> Path:
    """A new empty folder beside ``out`` (``.<name>.partial-*``) to build ``out`` in, with a folder's usual
    permissions (mkdtemp makes it 0700, which a published bundle or snapshot must not keep) and the marker that
    lets a later run recognise it. What a killed run left beside ``out`` is cleaned up first
    (``remove_stale_staging``)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    mark_staging(tmp)
    return tmp


def mark_staging(folder: Path) -> None:
    """Writes the marker naming this host and process into ``folder`` (ours until we publish or delete it)."""
    (Path(folder) / STAGING_MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def finish_staging(published: Path) -> None:
    """Removes the marker from a folder that is now in place (renamed to its destination): it is the user's now."""
    (Path(published) / STAGING_MARKER).unlink(missing_ok=True)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def _dead_owner(folder: Path) -> Optional[int]:
    """The pid in ``folder``'s marker if the marker is ours (this host) and that process is gone, else None."""
    try:
        owner = json.loads((folder / STAGING_MARKER).read_text(encoding="utf-8"))
        if (folder.is_dir() and not folder.is_symlink() and owner["host"] == socket.gethostname()
                and isinstance(owner["pid"], int) and _process_gone(owner["pid"])):
            return owner["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def remove_stale_staging(out: Path) -> List[Path]:
    """Cleans up what a killed run of ours left beside ``out``: ``.<name>.partial-*`` staging folders are removed;
    a ``.<name>.replaced-*`` folder (the earlier bundle, moved aside while a new one took its place) is removed if
    ``out`` exists, else moved back to ``out`` (the kill fell between the two renames: the earlier bundle is
    restored). Only folders holding STAGING_MARKER with this host and a process that is gone are touched (a running
    export's, another machine's on a shared disk, or anything without our marker is kept). Returns what was
    removed or restored."""
    out = Path(out).resolve()
    handled = []
    for p in sorted(out.parent.glob(f".{out.name}.replaced-*")) + sorted(out.parent.glob(f".{out.name}.partial-*")):
        pid = _dead_owner(p)
        if pid is None:
            continue
        if ".replaced-" in p.name and not out.exists():
            p.rename(out)
            finish_staging(out)
            log.warning("restored %s from %s, moved aside by an interrupted run (pid %d)", out, p.name, pid)
        else:
            shutil.rmtree(p, ignore_errors=True)
            log.warning("removed %s, left by an interrupted run (pid %d)", p, pid)
        handled.append(p)
    return handled


def external_data_file(graph: Path) -> Path:
    """Where the weights of ``graph`` live when they are external (the exporters' and ORT's naming)."""
    return graph.with_name(graph.name + ".data")


def graph_files(graph: Path) -> List[Path]:
    """The graph and, if it has one, its external-data file."""
    data = external_data_file(graph)
    return [graph] + ([data] if data.exists() else [])


@contextlib.contextmanager
def unshared_graph(graph: Path) -> Iterator[Path]:
    """``graph`` itself or, when one of its files has other hard links, a private copy of its files (in a temporary
    folder beside it, removed on exit). onnx (>= 1.19) refuses to read external data through a hard-linked file
    (a guard against hard-link attacks), and the study hard-links its cached graphs into the bundles it runs."""
    files = graph_files(graph)
    if all(f.stat().st_nlink == 1 for f in files):
        yield graph
        return
    with tempfile.TemporaryDirectory(dir=graph.parent, prefix=".unshared-") as tmp:
        for f in files:
            shutil.copyfile(f, Path(tmp) / f.name)
        yield Path(tmp) / graph.name
