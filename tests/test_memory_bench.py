"""bench/memory.py's mechanics (not its figures): clips of the asked length from ../shared/audio, and one row in a
fresh process that opens the tiny bundle as ``chat`` does, reports the manifest bytes of what it opened and
consistent RSS figures, without importing torch."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from kimia_edge.runtime.bundle import read_manifest
from kimia_edge.runtime.frontend import load_audio
from kimia_edge.runtime.pipeline import PipelineOptions, choose_artifacts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_clip_has_the_asked_length(bench, shared_audio: Path, tmp_path: Path) -> None:
    samples, rate = load_audio(bench.make_clip(shared_audio, 12.5, tmp_path / "clip.wav"))
    assert rate == 16_000 and samples.shape == (200_000,) and abs(samples).max() > 0.01


def test_text_only_row_counts_what_it_opened(bench, tiny_bundle: Path, shared_audio: Path, tmp_path: Path) -> None:
    clip = bench.make_clip(shared_audio, 5, tmp_path / "clip.wav")
    row = bench.run_row(tiny_bundle, "text-only", clip, 3, ["--threads", "1", "--fast-start"], tmp_path / "cache")
    opened = choose_artifacts(read_manifest(tiny_bundle), PipelineOptions(text_only=True))
    assert "dit_step" not in opened and row["opened_bytes"] == sum(a.bytes for a in opened.values())
    assert row["mode"] == "text-only" and round(row["clip_s"]) == 5 and row["llm_steps"] <= 3
    assert 0 < row["base_rss"] <= row["open_rss"] <= row["peak_hwm"] and row["peak_anon"] > 0
    assert row["torch_imported"] is False  # the runtime path stays torch-free


def test_malloc_trim_off_makes_the_runtime_trim_a_no_op_in_the_row(bench, tiny_bundle: Path, shared_audio: Path,
                                                                   tmp_path: Path) -> None:
    """The A/B's "off" side: low-memory mode still calls the trim after each release (encoders, then DiT and
    vocoder), and nothing is trimmed; the table says which side a row is."""
    clip = bench.make_clip(shared_audio, 5, tmp_path / "clip.wav")
    row = bench.run_row(tiny_bundle, "low-memory", clip, 10, ["--threads", "1", "--fast-start"], tmp_path / "cache",
                        malloc_trim=False)
    assert row["malloc_trim"] is False and row["trim_calls"] == 2 and row["trim_released"] == 0
    assert 0 < row["end_anon"] <= row["end_rss"] <= row["peak_hwm"]
    assert "| low-memory, no malloc_trim |" in bench.table([row])
