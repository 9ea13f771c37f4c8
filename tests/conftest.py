"""Shared test configuration: the --slow switch and the location of ../shared (tests may read it;
the package may not)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow")


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
