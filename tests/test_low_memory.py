"""Low-memory mode (``PipelineOptions(low_memory=True)``, ``--low-memory``): the audio encoders are opened for each
turn's encoding and freed after it, the DiT and vocoder are opened only for a spoken answer and freed after the
turn, each release handing the freed heap back (glibc ``malloc_trim``) — and every turn's text and speech equal the
default mode's."""
from __future__ import annotations

import argparse
import gc
import weakref
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

from kimia_edge.runtime import heap, sessions
from kimia_edge.runtime.frontend import load_audio
from kimia_edge.runtime.pipeline import Pipeline, PipelineOptions
from kimia_edge.runtime.spec.graphs import RUNTIME_GRAPHS
from kimia_edge.runtime.tasks import generation_config

STEPS = 50  # LLM steps per turn: speech output in two detokenizer chunks on the tiny bundle


def _two_turns(pipe: Pipeline, clip: Path) -> List[Tuple[str, np.ndarray]]:
    """Two chat turns of one conversation (the second re-encodes the first clip from the history)."""
    samples, sr = load_audio(clip)
    chat = pipe.conversation()
    out = []
    for seed in (3, 4):
        r = chat.run(samples, sr, "chat", config=generation_config("chat", seed, step_limit=STEPS), seed=seed)
        out.append((r.text, r.wav))
    return out


@pytest.fixture(scope="module")
def default_pipe(tiny_bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(tiny_bundle, PipelineOptions(threads=1))


@pytest.fixture(scope="module")
def low_pipe(tiny_bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(tiny_bundle, PipelineOptions(threads=1, low_memory=True))


def test_low_memory_answers_exactly_as_the_default_mode(default_pipe: Pipeline, low_pipe: Pipeline,
                                                        shared_audio: Path) -> None:
    want = _two_turns(default_pipe, shared_audio / "qa_example.wav")
    got = _two_turns(low_pipe, shared_audio / "qa_example.wav")
    for (t_want, w_want), (t_got, w_got) in zip(want, got):
        assert w_want.size > 0
        assert t_got == t_want
        np.testing.assert_array_equal(w_got, w_want)
    # default: opened once at load and kept; low memory: reopened by each turn (two turns)
    assert {k: p.opened for k, p in default_pipe.c.parts.items()} == {"encoders": 1, "speech": 1}
    assert {k: p.opened for k, p in low_pipe.c.parts.items()} == {"encoders": 2, "speech": 2}


def test_low_memory_frees_the_sessions_after_the_turn(low_pipe: Pipeline, shared_audio: Path) -> None:
    parts = low_pipe.c.parts
    assert not parts["encoders"].is_open and not parts["speech"].is_open  # nothing opened before a turn needs it
    tokenizer = parts["encoders"].get()
    dit_step, vocoder = parts["speech"].get()
    sessions = [weakref.ref(s.impl) for s in (tokenizer.whisper, tokenizer.vq, dit_step.session, vocoder.session)]
    del tokenizer, dit_step, vocoder
    samples, sr = load_audio(shared_audio / "qa_example.wav")
    result = low_pipe.run(samples, sr, "chat", config=generation_config("chat", 3, step_limit=STEPS), seed=3)
    assert result.wav.size > 0
    assert not parts["encoders"].is_open and not parts["speech"].is_open
    gc.collect()
    assert [r() for r in sessions] == [None] * 4, "an ONNX Runtime session outlived the turn"
    assert low_pipe.c.providers["dit_step"].startswith("CPUExecutionProvider")  # still reported


def test_each_release_frees_its_sessions_then_trims_the_heap(tiny_bundle: Path, shared_audio: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With the garbage collector off: the sessions must be gone by reference counting when the heap is trimmed
    (the audio tokenizer once held its own bound methods, a cycle that kept the encoders beside the DiT until a
    collection), and there is one trim per release: the encoders after encoding, the DiT and vocoder after the turn."""
    opened: Dict[str, weakref.ref] = {}
    open_session = sessions.open_session

    def recording(*args: Any, **kwargs: Any) -> sessions.Session:
        session = open_session(*args, **kwargs)
        opened[session.name] = weakref.ref(session.impl)
        return session

    alive_at_trim: List[List[str]] = []

    def trim() -> bool:
        alive_at_trim.append(sorted(name for name, ref in opened.items() if ref() is not None))
        return True

    monkeypatch.setattr(sessions, "open_session", recording)
    monkeypatch.setattr(heap, "trim_heap", trim)
    pipe = Pipeline.from_bundle(tiny_bundle, PipelineOptions(threads=1, low_memory=True, prepack=False))
    samples, sr = load_audio(shared_audio / "qa_example.wav")
    gc.collect()
    gc.disable()
    try:
        result = pipe.run(samples, sr, "chat", config=generation_config("chat", 3, step_limit=STEPS), seed=3)
    finally:
        gc.enable()
    assert result.wav.size > 0 and sorted(opened) == sorted(RUNTIME_GRAPHS)
    assert alive_at_trim == [[], []], "a released session was still alive when the heap was trimmed"


def test_the_default_mode_never_trims(default_pipe: Pipeline, shared_audio: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: List[int] = []
    monkeypatch.setattr(heap, "trim_heap", lambda: bool(calls.append(1)))
    samples, sr = load_audio(shared_audio / "qa_example.wav")
    default_pipe.run(samples, sr, "chat", config=generation_config("chat", 3, step_limit=10), seed=3)
    assert calls == []


def test_low_memory_text_task_never_opens_the_dit(tiny_bundle: Path, shared_audio: Path) -> None:
    pipe = Pipeline.from_bundle(tiny_bundle, PipelineOptions(threads=1, low_memory=True, prepack=False))
    samples, sr = load_audio(shared_audio / "asr_example_zh.wav")
    pipe.run(samples, sr, "asr", config=generation_config("asr", 0, step_limit=10))
    assert pipe.c.parts["speech"].opened == 0 and pipe.c.parts["encoders"].opened == 1
    assert not pipe.c.parts["encoders"].is_open


def test_low_memory_flag_reaches_the_options(tiny_bundle: Path) -> None:
    from kimia_edge.runtime.cli import options_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    base = ["chat", "--bundle", str(tiny_bundle), "--input", "x.wav", "--output", "y.wav"]
    assert options_from_args(parser.parse_args(base + ["--low-memory"])).low_memory
    assert not options_from_args(parser.parse_args(base)).low_memory
    serve = parser.parse_args(["serve", "--bundle", str(tiny_bundle), "--low-memory"])
    assert options_from_args(serve).low_memory
