"""Full-duplex decisions without a sound card: real speech from ../shared/audio fed as microphone blocks, with and
without an answer playing, through the energy VAD and (when the bundle ships it) Silero."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kimia_edge.runtime.duplex import BargeIn, DuplexController, UtteranceReady
from kimia_edge.runtime.frontend import load_audio, to_16k_mono
from kimia_edge.runtime.vad import EnergyVad, VadConfig, open_vad

RATE, BLOCK = 16_000, 320  # 20 ms microphone blocks
OUT_PER_BLOCK = 480  # 24 kHz samples the speaker consumes per 20 ms


@pytest.fixture(scope="module")
def speech(shared_audio: Path) -> np.ndarray:
    return to_16k_mono(*load_audio(shared_audio / "qa_example.wav"))


def _drive(controller: DuplexController, mic: np.ndarray, playing_from: int, playing_until: int) -> list:
    """Feeds ``mic`` block by block; an answer plays during blocks [playing_from, playing_until) (block indices),
    and stops at the first barge-in, as the CLI does. Returns (block index, action) pairs."""
    out, played, stopped = [], 0, False
    for b, i in enumerate(range(0, len(mic), BLOCK)):
        playing = playing_from <= b < playing_until and not stopped
        if playing:
            played += OUT_PER_BLOCK
        for action in controller.push(mic[i:i + BLOCK], played if playing else None):
            out.append((b, action))
            stopped |= isinstance(action, BargeIn)
    return out


def test_an_utterance_in_silence_becomes_the_next_turn(speech: np.ndarray) -> None:
    mic = np.concatenate([np.zeros(RATE, np.float32), speech, np.zeros(RATE, np.float32)])
    actions = _drive(DuplexController(EnergyVad(VadConfig())), mic, 0, 0)
    assert [type(a) for _, a in actions] == [UtteranceReady]
    utt = actions[0][1]
    assert not utt.barged_in and 0.8 * len(speech) / 2 < utt.samples.size < len(speech) + RATE


def test_speech_during_playback_barges_in_once_then_gives_the_utterance(speech: np.ndarray) -> None:
    mic = np.concatenate([np.zeros(2 * RATE, np.float32), speech, np.zeros(RATE, np.float32)])
    actions = _drive(DuplexController(EnergyVad(VadConfig())), mic, 10, 10_000)  # an answer plays from 0.2 s
    assert [type(a) for _, a in actions] == [BargeIn, UtteranceReady]
    (b_block, barge), (_, utt) = actions
    assert barge.played_samples == (b_block - 10 + 1) * OUT_PER_BLOCK  # the position when the onset completed
    onset_s = barge.onset_sample / RATE
    assert 2.0 < onset_s < 2.0 + len(speech) / RATE and b_block * BLOCK / RATE - onset_s < 0.35
    assert utt.barged_in and utt.samples.size > 0


def test_silence_or_a_finished_answer_gives_nothing(speech: np.ndarray) -> None:
    assert _drive(DuplexController(EnergyVad()), np.zeros(3 * RATE, np.float32), 0, 10_000) == []


def test_silero_from_the_bundle_ignores_noise_during_playback(tiny_bundle: Path, speech: np.ndarray,
                                                              tmp_path: Path) -> None:
    vad = open_vad(tiny_bundle, cache_dir=tmp_path)
    if isinstance(vad, EnergyVad):
        pytest.skip("this bundle was exported without silero-vad installed: it has no VAD artifact")
    rng = np.random.default_rng(1)
    noise = (0.03 * rng.standard_normal(2 * RATE)).astype(np.float32)  # a fan: loud for energy, not speech
    mic = np.concatenate([noise, noise[:RATE] + np.concatenate([speech, np.zeros(RATE, np.float32)])[:RATE],
                          speech[RATE:], np.zeros(RATE, np.float32)])
    actions = _drive(DuplexController(vad), mic, 0, 10_000)
    assert [type(a) for _, a in actions] == [BargeIn, UtteranceReady]
    assert actions[0][1].onset_sample >= 2 * RATE  # not in the noise before the speech
