"""Staging folders of bundles and snapshots (export/fileio.py): a killed run's ``.<name>.partial-*`` folder is
removed by the next run, and only if it is provably ours and dead (our name pattern + a marker naming a process of
this host that is gone); created folders follow the umask."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimia_edge.export.fileio import STAGING_MARKER, finish_staging, staging_dir

_KILLED_RUN = """
import os, signal, sys
from kimia_edge.export.fileio import staging_dir
tmp = staging_dir(sys.argv[1])
(tmp / "half.onnx").write_bytes(b"x" * 1000)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_next_run_removes_only_a_killed_runs_staging_folder(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(out)])
    assert killed.returncode == -9
    [stale] = list(tmp_path.glob(".bundle.partial-*"))
    users = tmp_path / ".bundle.partial-mine"           # our pattern, no marker: the user's
    users.mkdir()
    (users / "notes.txt").write_text("keep")
    other = tmp_path / ".other.partial-x"                # another destination's, same dead owner: not looked at
    other.mkdir()
    (other / STAGING_MARKER).write_text(stale.joinpath(STAGING_MARKER).read_text())

    running = staging_dir(out)                           # the next run
    assert not stale.exists()
    fresh = staging_dir(out)                             # a run beside a live one (this process): it stays
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [users.name, running.name, fresh.name, other.name])
    assert (users / "notes.txt").read_text() == "keep"
    finish_staging(fresh)
    assert list(fresh.iterdir()) == []  # the marker does not reach the published folder


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_staging_folders_follow_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        tmp = staging_dir(tmp_path / "deep" / "bundle")
    finally:
        os.umask(previous)
    assert tmp.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "deep").stat().st_mode & 0o777 == 0o777 & ~umask


_KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from kimia_edge.export.fileio import mark_staging
out = Path(sys.argv[1])
old = out.with_name(f".{out.name}.replaced-abc")
out.rename(old)          # the earlier bundle moved aside ...
mark_staging(old)
os.kill(os.getpid(), signal.SIGKILL)   # ... and the process killed before the new one took its place
"""


def test_a_bundle_moved_aside_by_a_killed_replacement_is_restored(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    assert subprocess.run([sys.executable, "-c", _KILLED_BETWEEN_RENAMES, str(out)]).returncode == -9
    assert not out.exists()
    tmp = staging_dir(out)  # the next export to this place
    assert (out / "manifest.json").read_text() == "{}" and not (out / STAGING_MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bundle", tmp.name])
