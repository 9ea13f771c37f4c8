"""Full-duplex turn taking (``chat --mic --speaker``): the microphone keeps listening while the answer plays; speech
that starts while an answer is running or playing interrupts it (barge-in), and every utterance, interrupting or
not, becomes the next turn once it ends.

``DuplexController`` is the decision logic alone, no device and no thread: feed it microphone blocks and where the
playback is, act on what it returns. The CLI's device code does the acting:

    BargeIn        -> speaker.flush(); conversation.cancel(); conversation.truncate_last(played)
    UtteranceReady -> the next conversation.turn(samples, 16_000)

Without echo cancellation the microphone also hears the answer: use headphones, or the answer interrupts itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np

from kimia_edge.runtime.vad import SPEECH_STARTED, SPEECH_STOPPED, VoiceActivityDetector

__all__ = ["BargeIn", "UtteranceReady", "DuplexAction", "DuplexController"]


@dataclass
class BargeIn:
    """Stop the answer now. played_samples: the playback position given with the block that completed the onset
    (samples of the answer consumed by the speaker); onset_sample: where the user's speech began in the mic stream
    (16 kHz samples since the controller started)."""

    played_samples: int
    onset_sample: int


@dataclass
class UtteranceReady:
    """The user's utterance [n] float32 at 16 kHz (with the VAD's pre-roll) ended: run it as the next turn.
    barged_in: it had interrupted an answer."""

    samples: np.ndarray
    barged_in: bool


DuplexAction = Union[BargeIn, UtteranceReady]


class DuplexController:
    """Turns mic blocks + playback position into actions (see the module docstring)."""

    def __init__(self, vad: VoiceActivityDetector) -> None:
        self.vad = vad
        self._barged_in = False

    def push(self, mic_16k: np.ndarray, playback: Optional[int]) -> List[DuplexAction]:
        """``mic_16k``: the next microphone block [n] float32 mono 16 kHz. ``playback``: samples of the current
        answer played so far while an answer is being generated or played, None when the assistant is silent.
        Returns the actions, in order (at most one barge-in per utterance)."""
        actions: List[DuplexAction] = []
        for event in self.vad.push(mic_16k):
            if event.kind == SPEECH_STARTED and playback is not None:
                self._barged_in = True
                actions.append(BargeIn(int(playback), event.sample))
            elif event.kind == SPEECH_STOPPED:
                actions.append(UtteranceReady(self.vad.utterance(), self._barged_in))
                self._barged_in = False
        return actions

    @property
    def listening_to_speech(self) -> bool:
        """The user is speaking now (an utterance has started and not ended)."""
        return self.vad.speaking

    def reset(self) -> None:
        self.vad.reset()
        self._barged_in = False
