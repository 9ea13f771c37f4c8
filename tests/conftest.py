"""Shared test configuration: the --slow switch, the location of ../shared (tests may read it; the package may
not), and the session's tiny snapshot and bundle (made once: exporting is most of the suite's time).

tests/runtime/ holds the torch-free subset: it runs in a venv with only the runtime installed, on the bundle named
by ``KIMIA_EDGE_TEST_BUNDLE`` (CI exports it in the full venv first)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TEST_BUNDLE_ENV = "KIMIA_EDGE_TEST_BUNDLE"
TINY_SEED = 51


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--slow"):  # long fuzz runs (tests/fuzzing.py reads it when the fuzz targets are collected)
        os.environ.setdefault("KIMIA_EDGE_FUZZ_EXAMPLES", "1000")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow case: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not present (tests read ../shared beside the checkout)")
    return path


@pytest.fixture(scope="session")
def official_fixtures() -> Path:
    """../shared/official-fixtures: tiny official-format checkpoints with the official classes' outputs."""
    return _shared_path("official-fixtures")


@pytest.fixture(scope="session")
def shared_audio() -> Path:
    """../shared/audio: real 16 kHz speech clips."""
    return _shared_path("audio")


@pytest.fixture(scope="session")
def reference_data() -> Path:
    """../shared/reference-data (e.g. Whisper's mel filter bank)."""
    return _shared_path("reference-data")


@pytest.fixture
def torch_one_thread():
    """Runs a test with torch on one thread (deterministic kernel choice; restores the previous count)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def sounddevice_module():
    """The sounddevice module, or a skip saying PortAudio is missing (only live audio needs it: --mic, --speaker).
    A fixture, not an import: tests/server has a conftest.py too, and ``from conftest import`` finds either."""
    try:
        import sounddevice
    except OSError as e:
        pytest.skip(f"PortAudio is not installed ({e}); Debian/Ubuntu: apt-get install libportaudio2")
    return sounddevice


@pytest.fixture(scope="session")
def bench_module() -> Callable[[str], Any]:
    """Loads ``bench/<name>.py`` as a module (bench/ is not a package): ``bench_module("vad")``."""
    def load(name: str) -> Any:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load


def has_build_extra() -> bool:
    return importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight snapshot in the official layout, made once per session. Tests must not modify it."""
    if not has_build_extra():
        pytest.skip("making a snapshot needs the build extra (torch)")
    from kimia_edge.export.snapshot.make import make_snapshot

    return make_snapshot(tmp_path_factory.mktemp("session") / "snap-tiny", "tiny", seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_model_config(tiny_snapshot: Path):
    """The manifest model section of the tiny snapshot."""
    from kimia_edge.export.exporter import model_config

    return model_config(tiny_snapshot)


def export_tiny_bundle(snapshot: Path, out: Path) -> Path:
    """What the session bundle holds: every graph at fp32, the LLM at F16 and Q8_0."""
    from kimia_edge.export.exporter import export_bundle

    return export_bundle(snapshot, out, precisions=("fp32",), llm_precision="f16", llm_quants=("Q8_0",))


@pytest.fixture(scope="session")
def tiny_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's bundle: ``$KIMIA_EDGE_TEST_BUNDLE`` if set (the runtime-only venv), else exported once from
    ``tiny_snapshot``. Tests must not modify it (copy it first)."""
    if os.environ.get(TEST_BUNDLE_ENV):
        return Path(os.environ[TEST_BUNDLE_ENV])
    if not has_build_extra():
        pytest.skip(f"no bundle: set {TEST_BUNDLE_ENV} or install the build extra to export one")
    return export_tiny_bundle(request.getfixturevalue("tiny_snapshot"), tmp_path_factory.mktemp("session") / "bundle")
