"""The threaded streaming turn (generation thread -> token ring -> synthesis thread -> audio ring) gives exactly
what the sequential golden pipeline gives, with speech arriving before the turn ends, and forwards errors."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kimia_edge.export.reference.pipeline import GoldenPipeline
from kimia_edge.export.snapshot.make import make_snapshot
from kimia_edge.runtime.frontend import load_audio, to_16k_mono
from kimia_edge.runtime.prompt import build_prompt
from kimia_edge.runtime.streaming import AudioEvent, StreamingTurn, TextEvent
from kimia_edge.runtime.tasks import generation_config, task_messages


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> GoldenPipeline:
    return GoldenPipeline(make_snapshot(tmp_path_factory.mktemp("turn") / "tiny", "tiny", seed=21))


@pytest.fixture(scope="module")
def clip(shared_audio: Path) -> np.ndarray:
    return to_16k_mono(*load_audio(shared_audio / "qa_example.wav"))


def _turn(pipe: GoldenPipeline, clip: np.ndarray, task: str, config, detokenizer, pipelined: bool = False
          ) -> StreamingTurn:
    prompt = build_prompt(task_messages(task, clip), config.output_type, pipe.tokens, pipe.token_offset,
                          pipe.text_tokenizer.encode, lambda c: pipe.encode_audio(np.asarray(c)))
    return StreamingTurn(pipe.backend, prompt, pipe.tokens, pipe.token_offset, config,
                         pipe.text_tokenizer.decode_bytes, detokenizer, pipelined=pipelined)


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
def test_streaming_turn_equals_the_golden_pipeline(pipe: GoldenPipeline, clip: np.ndarray, pipelined: bool) -> None:
    config = generation_config("chat", seed=4, step_limit=90)
    golden = pipe.run("chat", clip, seed=4, config=config)
    turn = _turn(pipe, clip, "chat", config, pipe.detokenizer(np.random.default_rng(5)), pipelined)  # run(): seed + 1
    events = list(turn)
    text = "".join(e.text for e in events if isinstance(e, TextEvent))
    audio = [e.samples for e in events if isinstance(e, AudioEvent)]
    assert text == golden.text
    np.testing.assert_array_equal(np.concatenate(audio), golden.wav)
    s = turn.stats
    assert s.llm_steps == 90 and s.audio_samples == golden.wav.size
    assert s.first_audio_s is not None and s.first_audio_s < s.prefill_s + s.llm_seconds + s.synth_seconds
    assert s.rings["tokens"]["total_read"] == len(golden.audio_tokens) and s.rings["audio"]["dropped"] == 0
    assert s.rings["audio"]["underruns"] == 0  # the consumer only reads what is there


def test_text_task_runs_no_synthesis(pipe: GoldenPipeline, clip: np.ndarray) -> None:
    turn = _turn(pipe, clip, "qa", generation_config("qa", step_limit=8), pipe.detokenizer())
    events = list(turn)
    assert not any(isinstance(e, AudioEvent) for e in events)
    assert turn.stats.llm_steps == 8


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
def test_a_failure_in_the_synthesis_thread_reaches_the_caller(pipe: GoldenPipeline, clip: np.ndarray,
                                                               pipelined: bool) -> None:
    det = pipe.detokenizer(np.random.default_rng(0))
    det.vocoder = lambda mel: (_ for _ in ()).throw(RuntimeError("vocoder exploded"))
    turn = _turn(pipe, clip, "chat", generation_config("chat", seed=1, step_limit=60), det, pipelined)
    with pytest.raises(RuntimeError, match="vocoder exploded"):
        list(turn)


def _wait_for(predicate, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
def test_cancel_from_another_thread_stops_both_threads_between_calls(pipe: GoldenPipeline, clip: np.ndarray,
                                                                     pipelined: bool) -> None:
    det = pipe.detokenizer(np.random.default_rng(0))
    calls = []
    step = det.dit_step
    det.dit_step = lambda *a: calls.append(1) or step(*a)  # count the DiT's network calls
    turn = _turn(pipe, clip, "chat", generation_config("chat", seed=1, step_limit=400), det, pipelined)
    events = iter(turn)
    first_audio = next(e for e in events if isinstance(e, AudioEvent))  # synthesis is running
    assert first_audio.samples.size > 0
    threading.Timer(0.05, turn.cancel).start()
    rest = list(events)  # ends without an error once cancelled
    assert turn.stats.stop == "cancelled" and turn.threads_alive == 0
    assert turn.stats.llm_steps < 400 and turn.token_ring.closed and turn.audio_ring.closed
    made = len(calls)
    time.sleep(0.3)
    assert len(calls) == made  # nothing keeps running after the iteration ended
    assert all(isinstance(e, (TextEvent, AudioEvent)) for e in rest)


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
def test_closing_the_iterator_cancels_the_turn(pipe: GoldenPipeline, clip: np.ndarray, pipelined: bool) -> None:
    turn = _turn(pipe, clip, "chat", generation_config("chat", seed=2, step_limit=400), pipe.detokenizer(), pipelined)
    events = iter(turn)
    next(events)
    events.close()
    assert turn.cancelled and turn.threads_alive == 0 and turn.stats.stop == "cancelled"
    assert turn.stats.llm_steps < 400
    with pytest.raises(RuntimeError, match="runs once"):
        next(iter(turn))


def test_each_audio_token_records_the_text_generated_by_its_step(pipe: GoldenPipeline, clip: np.ndarray) -> None:
    from kimia_edge.runtime.generation import generate

    config = generation_config("chat", seed=4, step_limit=90)
    turn = _turn(pipe, clip, "chat", config, pipe.detokenizer(np.random.default_rng(5)))
    audio = np.concatenate([e.samples for e in turn if isinstance(e, AudioEvent)])
    expected, text_so_far = [], [0]

    def on_step(step) -> None:
        text_so_far[0] += step.text_token is not None
        if step.audio_token is not None:
            expected.append(text_so_far[0])

    generate(pipe.backend, turn.prompt, pipe.tokens, pipe.token_offset, config, on_step=on_step)
    assert turn.audio_text_counts == expected and len(expected) > 0
    assert audio.size == len(expected) * 1920  # one continuous timeline: 1920 samples (24 kHz) per 12.5 Hz token
