"""Trimming a conversation's history to the LLM's context: user audio first, oldest first, then whole turns."""
from __future__ import annotations

import numpy as np

from kimia_edge.runtime.history import split_turns, trim_history


def _history(turns: int) -> list:
    out = []
    for i in range(turns):
        out += [{"role": "user", "message_type": "audio", "content": np.zeros(16_000 * (i + 1), np.float32)},
                {"role": "assistant", "message_type": "text", "content": f"answer {i}"}]
    return out


def _cost(messages: list) -> int:
    """Positions a message list takes: 12.5 per second of audio, one per character of text, one per role run."""
    return sum(len(m["content"]) * 12.5 / 16_000 if m["message_type"] == "audio" else len(m["content"]) + 1
               for m in messages)


def test_a_history_that_fits_is_kept_whole() -> None:
    h = _history(3)
    result = trim_history(h, lambda kept: True)
    assert result.history == h and not result.trimmed


def test_oldest_user_audio_goes_first_and_turns_keep_alternating() -> None:
    h = _history(3)  # audio of 1, 2, 3 s = 12.5 + 25 + 37.5 positions, answers 9 + 1 each
    result = trim_history(h, lambda kept: _cost(kept) <= 70)
    assert result.dropped_audio == 2 and result.dropped_turns == 0
    assert [m["message_type"] for m in result.history] == ["text", "text", "text", "text", "audio", "text"]
    assert result.history[0] == {"role": "user", "message_type": "text", "content": ""}
    assert [m["role"] for m in result.history] == ["user", "assistant"] * 3
    assert result.history[4] is h[4] and h[0]["message_type"] == "audio"  # the caller's list is not changed


def test_then_whole_turns_oldest_first_and_nothing_if_nothing_fits() -> None:
    h = _history(3)
    result = trim_history(h, lambda kept: _cost(kept) <= 22)
    assert result.dropped_audio == 3 and result.dropped_turns == 1
    assert [m["content"] for m in result.history if m["role"] == "assistant"] == ["answer 1", "answer 2"]
    nothing = trim_history(h, lambda kept: False)
    assert nothing.history == [] and nothing.dropped_turns == 3


def test_turns_begin_at_a_user_message_after_an_answer() -> None:
    instruction = {"role": "user", "message_type": "text", "content": "transcribe"}
    h = [instruction] + _history(2)
    assert [len(t) for t in split_turns(h)] == [3, 2]
