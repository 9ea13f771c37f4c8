"""Keeping a conversation's history inside the LLM's context: what to drop, oldest first, when the next prompt would
not leave the answer room.

A history is the list of official-style messages (``{"role", "message_type", "content"}``) that
``runtime/tasks.task_messages`` puts before the new clip; a *turn* starts at a user message that follows an assistant
message (or at the first message). Trimming goes in two passes, each oldest first, and stops as soon as the prompt
fits:

1. the audio of user turns: an audio message (12.5 positions per second of speech, by far the largest part of a
   turn) becomes an empty user text message. We keep no transcript of the user's speech (that would be an extra ASR
   run per turn), so it is replaced by nothing; the empty message keeps the role marker, so turns still alternate
   (one position) instead of two assistant answers merging into one run;
2. whole turns (the user message and the answer that followed it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List

__all__ = ["TrimResult", "trim_history", "split_turns", "ANSWER_RESERVE_STEPS"]

Message = Dict[str, Any]

# Room the answer must keep when history is trimmed: the generation config's own budget, but at most 20 s of 12.5 Hz
# steps (the text-mode budget, 7500 positions, exceeds any context we run: asking for all of it would drop every
# turn). The loop itself never runs past the context: it stops with "context_full".
ANSWER_RESERVE_STEPS = 250


@dataclass
class TrimResult:
    """history: what is kept (a new list; messages not changed are the same objects); dropped_turns: whole turns
    removed; dropped_audio: user audio messages replaced by an empty text message."""

    history: List[Message]
    dropped_turns: int = 0
    dropped_audio: int = 0

    @property
    def trimmed(self) -> bool:
        return bool(self.dropped_turns or self.dropped_audio)


def split_turns(history: List[Message]) -> List[List[Message]]:
    """The history cut into turns: a new turn begins at a user message that follows a non-user message."""
    turns: List[List[Message]] = []
    for i, msg in enumerate(history):
        if not turns or (msg.get("role") == "user" and history[i - 1].get("role") != "user"):
            turns.append([])
        turns[-1].append(msg)
    return turns


def trim_history(history: List[Message], fits: Callable[[List[Message]], bool]) -> TrimResult:
    """The first reduction of ``history``, in the order of the module docstring, for which ``fits(history)`` is True
    (``history`` itself if it fits). If nothing fits, the empty history (the caller then checks the clip alone).
    ``dropped_audio`` also counts audio replaced in turns that were dropped whole afterwards."""
    result = TrimResult(list(history))
    if fits(result.history):
        return result
    turns = split_turns(result.history)
    for turn in turns:
        for j, msg in enumerate(turn):
            if msg.get("role") == "user" and msg.get("message_type") == "audio":
                turn[j] = {"role": "user", "message_type": "text", "content": ""}
                result.dropped_audio += 1
                result.history = [m for t in turns for m in t]
                if fits(result.history):
                    return result
    while turns:
        turns.pop(0)
        result.dropped_turns += 1
        result.history = [m for t in turns for m in t]
        if fits(result.history):
            return result
    return result
