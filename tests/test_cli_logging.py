"""Quiet by default: a ``kimia-edge`` command shows its progress and results; library logs (torch's included)
appear with -v. Run as a fresh process, since torch reads its log settings when first imported."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

pytest.importorskip("torch")

from kimia_edge.export.snapshot.make import make_snapshot  # noqa: E402

TORCH_LOG_LINE = re.compile(r"^[WIE]\d{4} ", re.MULTILINE)  # torch's own format: W1202 00:33:51.172000 <pid> ...


def _export_adaptor(snapshot: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    cmd: List[str] = [sys.executable, "-m", "kimia_edge.cli", *flags, "export", "--snapshot", str(snapshot),
                      "--out", str(out), "--graphs", "adaptor", "--precision", "fp32", "--no-llm"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                    reason="the exporter's warning to hide is that torchvision is missing")
def test_torch_warnings_only_with_verbose(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path / "snap", "tiny", seed=4)
    quiet = _export_adaptor(snap, tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert "torchvision" not in quiet.stderr and not TORCH_LOG_LINE.search(quiet.stderr)
    assert "adaptor" in quiet.stdout  # the results are still printed
    loud = _export_adaptor(snap, tmp_path / "loud", "-v")
    assert loud.returncode == 0, loud.stderr
    assert "torchvision is not installed" in loud.stderr
    assert "INFO kimia_edge.export" in loud.stderr
