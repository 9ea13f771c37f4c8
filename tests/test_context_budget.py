"""The conversation stays inside the LLM's context: before a prompt would leave the answer too little room, the
oldest user audio and then the oldest turns are dropped and the turn says so first; a clip that cannot fit alone is
refused before any work. Tiny bundle, llama.cpp with a small context."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kimia_edge.runtime.frontend import load_audio, to_16k_mono
from kimia_edge.runtime.generation import ContextFullError
from kimia_edge.runtime.history import ANSWER_RESERVE_STEPS
from kimia_edge.runtime.pipeline import Pipeline, PipelineOptions
from kimia_edge.runtime.streaming import HistoryTrimmedEvent, TextEvent
from kimia_edge.runtime.tasks import generation_config

N_CTX = 300  # positions: a few 2 s turns (about 40 positions each with their answers) fill it


@pytest.fixture(scope="module")
def pipeline(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return Pipeline.from_bundle(tiny_bundle, PipelineOptions(cache_dir=tmp_path_factory.mktemp("cache"),
                                                             prepack=False, text_only=True, n_ctx=N_CTX))


@pytest.fixture(scope="module")
def clip(shared_audio: Path) -> np.ndarray:
    return to_16k_mono(*load_audio(shared_audio / "qa_example.wav"))[:32_000]  # 2 s: 25 positions of audio


def test_old_audio_then_old_turns_are_dropped_and_reported_first(pipeline: Pipeline, clip: np.ndarray) -> None:
    assert pipeline.c.backend.n_ctx == N_CTX
    config = generation_config("qa", step_limit=20)  # the answer keeps min(20, 250) = 20 steps
    chat = pipeline.conversation()
    trims = []
    for _ in range(12):
        events = list(chat.turn(clip, 16_000, "qa", config=config))
        assert not any(isinstance(e, HistoryTrimmedEvent) for e in events[1:])  # only ever the first event
        if isinstance(events[0], HistoryTrimmedEvent):
            trims.append(events[0])
        assert pipeline.c.backend.position <= N_CTX  # never past the context inside llama.cpp
    assert trims, "12 turns of 2 s never filled a 300-position context"
    first = trims[0]
    assert first.dropped_audio >= 1 and first.dropped_turns == 0 and "300 positions" in first.reason
    assert any(t.dropped_turns for t in trims)  # once every old clip is gone, whole turns go
    users = [m for m in chat.history if m["role"] == "user"]
    assert users[-1]["message_type"] == "audio" and users[0]["message_type"] == "text" and users[0]["content"] == ""
    assert ANSWER_RESERVE_STEPS >= 20


def test_a_clip_that_cannot_fit_alone_is_refused_before_any_work(pipeline: Pipeline, shared_audio: Path) -> None:
    long = to_16k_mono(*load_audio(shared_audio / "asr_example_zh.wav"))
    long = np.tile(long, 3)  # 31 s = 390 positions > 300
    chat = pipeline.conversation()
    turn = chat.turn(long, 16_000, "qa", config=generation_config("qa", step_limit=5))
    with pytest.raises(ContextFullError, match="300"):
        next(turn)
    assert chat.history == [] and chat.last is None
    events = list(chat.turn(long[:16_000], 16_000, "qa", config=generation_config("qa", step_limit=5)))
    assert all(isinstance(e, TextEvent) for e in events)  # the conversation goes on
