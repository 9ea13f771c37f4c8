"""The runtime Pipeline (torch-free orchestration) with the reference networks plugged in: same answer as the
golden pipeline, metrics filled, resampling, multi-turn history, and several conversations over one pipeline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly

from kimia_edge.export.reference.pipeline import GoldenPipeline
from kimia_edge.runtime.frontend import load_audio, to_16k_mono
from kimia_edge.runtime.pipeline import Pipeline
from kimia_edge.runtime.tasks import generation_config


@pytest.fixture(scope="module")
def golden(tiny_snapshot: Path) -> GoldenPipeline:
    return GoldenPipeline(tiny_snapshot)


@pytest.fixture(scope="module")
def pipeline(golden: GoldenPipeline) -> Pipeline:
    return Pipeline(golden.components())


@pytest.fixture(scope="module")
def clip(shared_audio: Path) -> np.ndarray:
    return to_16k_mono(*load_audio(shared_audio / "qa_example.wav"))


def test_same_answer_as_the_golden_pipeline(pipeline: Pipeline, golden: GoldenPipeline, clip: np.ndarray) -> None:
    config = generation_config("chat", seed=2, step_limit=70)
    ref = golden.run("chat", clip, seed=2, config=config)
    got = pipeline.run(clip, 16_000, "chat", seed=2, config=config)
    assert got.text == ref.text
    np.testing.assert_array_equal(got.wav, ref.wav)
    m = got.metrics
    assert m.llm_steps == 70 and m.output_audio_s == pytest.approx(ref.wav.size / 24_000)
    assert m.first_audio_s is not None and m.peak_rss_mib > 0 and "llm" in m.table()
    assert '"first_audio_s"' in m.to_json()


def test_input_at_another_rate_with_channels_is_resampled(pipeline: Pipeline, clip: np.ndarray) -> None:
    config = generation_config("qa", step_limit=5)
    base = pipeline.run(clip, 16_000, "qa", config=config).text
    stereo_441 = np.stack([resample_poly(clip, 441, 160)] * 2, axis=1).astype(np.float32)
    other = pipeline.run(stereo_441, 44_100, "qa", config=config)
    assert other.metrics.input_audio_s == pytest.approx(len(clip) / 16_000, abs=0.01)
    assert isinstance(other.text, str) and isinstance(base, str)


def test_history_grows_the_prompt(pipeline: Pipeline, clip: np.ndarray) -> None:
    chat = pipeline.conversation()
    config = generation_config("qa", step_limit=3)
    chat.run(clip, 16_000, "qa", config=config)
    assert len(chat.history) == 2 and chat.history[1]["role"] == "assistant"
    first_prefill_positions = pipeline.c.backend.position
    chat.run(clip[:8000], 16_000, "qa", config=config)
    assert pipeline.c.backend.position > first_prefill_positions  # the second prompt carries the first turn
    with pytest.raises(ValueError, match="task must be one of"):
        list(chat.turn(clip, 16_000, "translate"))


def test_conversations_over_one_pipeline_keep_their_own_history(pipeline: Pipeline, clip: np.ndarray) -> None:
    config = generation_config("qa", step_limit=6)
    alone = pipeline.conversation()
    expected = [alone.run(c, 16_000, "qa", config=config).text for c in (clip, clip[:8000])]
    a, b = pipeline.conversation(), pipeline.conversation()
    got_a1 = a.run(clip, 16_000, "qa", config=config).text
    b.run(clip[16000:40000], 16_000, "qa", config=config)  # b's turn in between must not leak into a
    got_a2 = a.run(clip[:8000], 16_000, "qa", config=config).text
    assert [got_a1, got_a2] == expected
    assert len(a.history) == 4 and len(b.history) == 2 and a.last.text == got_a2
    one_off = pipeline.run(clip[:8000], 16_000, "qa", config=config)
    assert one_off.metrics is not None and len(a.history) == 4  # a one-off turn keeps no history anywhere


def test_a_cancelled_or_abandoned_turn_leaves_the_pipeline_ready(pipeline: Pipeline, clip: np.ndarray) -> None:
    config = generation_config("qa", step_limit=6)
    expected = pipeline.run(clip, 16_000, "qa", config=config).text
    chat = pipeline.conversation()
    long = generation_config("chat", seed=3, step_limit=500)
    events = chat.turn(clip, 16_000, "chat", config=long)
    next(events)
    chat.cancel()
    list(events)
    assert chat.last.metrics.stop == "cancelled" and chat.last.metrics.llm_steps < 500
    assert len(chat.history) == 2  # the user's clip and the part of the answer generated before the cancel
    abandoned = pipeline.conversation().turn(clip, 16_000, "chat", config=long)
    next(abandoned)
    abandoned.close()  # closing the generator cancels and releases the pipeline
    assert pipeline.run(clip, 16_000, "qa", config=config).text == expected
