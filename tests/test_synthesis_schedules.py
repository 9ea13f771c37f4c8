"""[H] #14 items 3-4: the named chunk schedules (sizes, profile fit, options), the player stall model of
bench/synthesis_schedules.py, and the pipelined synthesis giving the serial path's samples bit for bit on the tiny
bundle."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from kimia_edge.runtime.frontend import load_audio, to_16k_mono
from kimia_edge.runtime.pipeline import Pipeline, PipelineOptions
from kimia_edge.runtime.spec.streaming import (GRAPH_MAX_FRAMES, SCHEDULES, StreamingConfig, check_schedule_fits,
                                               dit_frames_max, schedule_overrides, vocoder_frames_max)
from kimia_edge.runtime.synthesis_pipeline import SynthesisPipeline
from kimia_edge.runtime.tasks import generation_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_synthesis_schedules",
                                                  REPO / "bench" / "synthesis_schedules.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _config(name: str) -> StreamingConfig:
    return PipelineOptions(schedule=name).streaming_config(StreamingConfig())


# ---- schedules -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, sizes", [("official", [30, 30, 30, 30, 30]), ("first10", [10, 30, 30, 30, 30]),
                                         ("growing", [10, 20, 30, 30, 30])])
def test_named_schedules_drive_the_chunk_sizes(name: str, sizes: list) -> None:
    cfg = _config(name)
    assert [cfg.chunk_tokens_at(i) for i in range(5)] == sizes
    check_schedule_fits(cfg, GRAPH_MAX_FRAMES, GRAPH_MAX_FRAMES)  # the exported graphs' max frames
    assert dit_frames_max(cfg) == 168 and vocoder_frames_max(cfg) == 252  # never more than the official chunk


def test_streaming_overrides_apply_after_the_schedule_and_bad_names_are_named() -> None:
    cfg = PipelineOptions(schedule="growing", streaming={"first_chunk_tokens": 6}).streaming_config(StreamingConfig())
    assert [cfg.chunk_tokens_at(i) for i in range(4)] == [6, 20, 30, 30]
    with pytest.raises(ValueError, match=r"schedule: expected one of \['first10', 'growing', 'official'\], got 'fast'"):
        PipelineOptions(schedule="fast").validate()
    assert sorted(SCHEDULES) == ["first10", "growing", "official"] and schedule_overrides("official") == {}


def test_a_schedule_larger_than_the_profile_is_refused() -> None:
    cfg = StreamingConfig(chunk_tokens=20, chunk_growth_tokens=50, max_chunk_tokens=200)
    with pytest.raises(ValueError, match="needs 848 frames per dit_step call"):
        check_schedule_fits(cfg, GRAPH_MAX_FRAMES, GRAPH_MAX_FRAMES)


# ---- the player model ----------------------------------------------------------------------------------------------
def test_playback_counts_each_dry_moment_and_its_silence(bench) -> None:
    # chunks of 2 s ready at 1, 2.5, 6, 7 s: chunk 1 in time (3.0), chunk 2 late by 1 s (5 -> 6), chunk 3 in time (8)
    p = bench.simulate_playback([1.0, 2.5, 6.0, 7.0], [2.0, 2.0, 2.0, 2.0])
    assert (p.first_audio_s, p.stalls, p.stall_s) == (1.0, 1, pytest.approx(1.0))
    assert bench.simulate_playback([1.0, 3.0, 5.0], [2.0, 2.0, 2.0]).stalls == 0  # exactly on time: no stall
    p = bench.simulate_playback([0.5, 2.0, 4.0], [0.2, 0.5, 3.0])  # a short first chunk: two stalls
    assert p.stalls == 2 and p.stall_s == pytest.approx((2.0 - 0.7) + (4.0 - 2.5))
    with pytest.raises(ValueError, match="same non-zero length"):
        bench.simulate_playback([1.0], [])


def test_modelled_times_give_the_reference_its_rtf_and_charge_small_chunks_their_look_ahead(bench) -> None:
    official, growing = _config("official"), _config("growing")
    ref = bench.dit_frames(official, 100)
    assert ref == [120, 168, 168, 88]                    # 30, 30+12, 30+12, final 10+12 tokens, x4 frames
    assert bench.dit_frames(growing, 100) == [40, 100, 168, 168, 88]   # 10; 20+5 carried; 30+12; ...
    ready = bench.modelled_ready_times(ref, 0.8, ref, 8.0)
    assert ready[-1] == pytest.approx(0.8 * 8.0) and np.all(np.diff(ready) > 0)
    grown = bench.modelled_ready_times(bench.dit_frames(growing, 100), 0.8, ref, 8.0)
    assert grown[-1] > ready[-1] and grown[0] == pytest.approx(ready[0] / 3)


# ---- the tiny bundle -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip(shared_audio: Path) -> np.ndarray:
    return to_16k_mono(*load_audio(shared_audio / "qa_example.wav"))


@pytest.fixture(scope="module")
def serial(tiny_bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(tiny_bundle, PipelineOptions(threads=2))


def test_a_pipelined_turn_gives_the_serial_samples(tiny_bundle: Path, clip: np.ndarray) -> None:
    """The same sessions (pipelined: half the threads each) run serially and pipelined: identical samples."""
    piped = Pipeline.from_bundle(tiny_bundle, PipelineOptions(threads=2, pipelined_synthesis=True))
    serial = Pipeline(dataclasses.replace(piped.c, pipelined_synthesis=False))
    config = generation_config("chat", seed=3, step_limit=140)
    a = serial.run(clip, 16_000, "chat", config=config, seed=3)
    b = piped.run(clip, 16_000, "chat", config=config, seed=3)
    assert a.text == b.text and a.wav.size == (140 - 6) * 1920
    np.testing.assert_array_equal(a.wav, b.wav)


def test_pipelined_sessions_share_the_threads() -> None:
    assert PipelineOptions(threads=4).session_threads("vocoder") == 4
    piped = PipelineOptions(threads=4, pipelined_synthesis=True)
    assert [piped.session_threads(g) for g in ("dit_step", "vocoder", "whisper_encoder")] == [2, 2, 4]
    assert PipelineOptions(threads=1, pipelined_synthesis=True).session_threads("dit_step") == 1


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_pipelined_detokenizer_equals_serial_chunk_for_chunk(serial: Pipeline, bench, schedule: str) -> None:
    """Uneven pushes, as the token ring hands them over; the DiT sees the frames bench.dit_frames counts."""
    def detokenizer():
        det = serial.c.make_detokenizer(np.random.default_rng(7))
        det.config = dataclasses.replace(det.config, **schedule_overrides(schedule))
        return det

    det, frames = detokenizer(), []
    step = det.dit_step
    det.dit_step = lambda x, t, *a: (frames.append(x.shape[1]) if t[0] == 0 else None) or step(x, t, *a)
    tokens = np.random.default_rng(8).integers(0, det.dit.semantic_vocab_size, 100)
    batches = np.split(tokens, np.cumsum(np.random.default_rng(9).integers(1, 20, 8)))
    ref = [c for b in batches for c in det.push(b)] + list(det.finish())
    assert frames == bench.dit_frames(det.config, tokens.size)
    got = []
    with SynthesisPipeline(detokenizer(), got.append) as pipe:
        for b in batches:
            pipe.push(b)
        pipe.finish()
    assert [c.index for c in got] == list(range(len(ref)))
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a.wav, b.wav)
        assert a.start_position == b.start_position
