"""Turns from several threads on one pipeline, many times (tiny bundle, small step limits): no crash, every call
completes or gets a clear error; a turn abandoned by closing or dropping its generator frees the next turn, and no
thread outlives the turns."""
from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import List

import numpy as np
import pytest

from kimia_edge.runtime.frontend import load_audio
from kimia_edge.runtime.pipeline import Pipeline, PipelineOptions
from kimia_edge.runtime.streaming import AudioEvent
from kimia_edge.runtime.tasks import generation_config

THREADS, TURNS = 4, 6


@pytest.fixture(scope="module")
def pipe(tiny_bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(tiny_bundle, PipelineOptions(threads=1, streaming={"first_chunk_tokens": 10}))


def test_turns_from_many_threads_complete_and_abandoned_turns_free_the_next(pipe: Pipeline, shared_audio: Path) -> None:
    samples, rate = load_audio(shared_audio / "qa_example.wav")
    baseline = threading.active_count()
    outcomes: List[str] = []
    failures: List[BaseException] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        conversation = pipe.conversation(keep_history=w % 2 == 0)
        for i in range(TURNS):
            task = ("chat", "qa", "asr")[(w + i) % 3]
            config = generation_config(task, i, step_limit=16 if task == "chat" else 6)
            how = ("whole", "close", "drop")[(w * TURNS + i) % 3]
            try:
                events = conversation.turn(samples, rate, task, config=config, seed=i)
                if how == "whole":
                    n = sum(1 for _ in events)
                    assert conversation.last is not None and conversation.last.metrics.llm_steps > 0
                    outcome = f"done:{n}"
                else:
                    next(events)  # the turn runs and holds the pipeline
                    if how == "close":
                        events.close()
                    else:
                        del events  # dropped: the generator's finaliser cancels the turn
                        gc.collect()
                    outcome = how
            except (ValueError, RuntimeError) as e:  # a clear error is allowed; a crash or a hang is not
                outcome = f"error:{type(e).__name__}:{e}"
            except BaseException as e:  # noqa: BLE001
                with lock:
                    failures.append(e)
                return
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker, args=(w,), name=f"turns-{w}") for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a turn hung: an abandoned turn did not free the pipeline"
    assert failures == []
    assert len(outcomes) == THREADS * TURNS
    errors = [o for o in outcomes if o.startswith("error:")]
    assert errors == [], errors  # the pipeline serialises turns: none should need to be refused
    # every abandoned turn's threads were joined: nothing is left running besides what ran before
    assert threading.active_count() == baseline, [t.name for t in threading.enumerate()]
    # and the pipeline still answers
    result = pipe.run(samples, rate, "chat", config=generation_config("chat", 0, step_limit=16), seed=0)
    assert result.metrics.llm_steps == 16 and result.wav.size > 0
