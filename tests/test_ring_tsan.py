"""Builds the C++ ring stress test with ThreadSanitizer (ctest) and runs it: data races or ordering bugs in
spsc_ring.hpp that Python-level tests cannot see make this fail."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("g++") is None, reason="needs cmake and g++")
def test_ring_stress_under_thread_sanitizer(tmp_path: Path) -> None:
    build = tmp_path / "tsan"
    configure = [
        "cmake", "-S", str(REPO), "-B", str(build), "-DKIMIA_EDGE_PYTHON=OFF", "-DKIMIA_EDGE_TESTS=ON",
        "-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DCMAKE_CXX_FLAGS=-fsanitize=thread",
    ]
    subprocess.run(configure, check=True, capture_output=True, text=True)
    built = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr  # -Wall -Wextra -Werror on the ring header
    ran = subprocess.run(["ctest", "--output-on-failure"], cwd=build, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "ThreadSanitizer" not in ran.stdout + ran.stderr
