"""Fixtures of the quantization study's tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def one_clip_audio(shared_audio: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A speech folder holding one short clip (qa_example.wav, 7 s at 16 kHz): a study's ``--audio`` in tests."""
    folder = tmp_path_factory.mktemp("one_clip_audio")
    shutil.copyfile(shared_audio / "qa_example.wav", folder / "qa_example.wav")
    return folder
