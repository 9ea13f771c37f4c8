"""The run-time world never needs torch nor the build-time packages: every module under kimia_edge.runtime
imports in a fresh interpreter where torch, kimia_edge.export and kimia_edge.quantization cannot load."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def test_every_runtime_module_imports_without_torch() -> None:
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys

        class Forbid:
            BLOCKED = ("torch", "torchaudio", "kimia_edge.export", "kimia_edge.quantization")
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in self.BLOCKED):
                    raise ImportError(f"run time must not import {name}")
                return None

        sys.meta_path.insert(0, Forbid())
        import kimia_edge.runtime as rt
        names = [m.name for m in pkgutil.walk_packages(rt.__path__, "kimia_edge.runtime.")]
        for name in names:
            importlib.import_module(name)
        print(len(names))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) >= 2  # the check really walked the package
