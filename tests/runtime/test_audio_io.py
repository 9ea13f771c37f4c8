"""Live audio without a sound card: the same callbacks sounddevice would call, driven from the test."""
from __future__ import annotations

import numpy as np
import pytest

from kimia_edge.runtime.audio_io import AudioDeviceError, EndpointConfig, EndpointDetector, Microphone, Speaker
from kimia_edge.runtime.rings import AudioRing

RATE = 16_000


def _tone(seconds: float, db: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (10 ** (db / 20) * np.sqrt(2) * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_speech_then_silence_ends_the_utterance() -> None:
    det = EndpointDetector(RATE, EndpointConfig(silence_s=0.5))
    assert not det.push(_tone(1.0, -20))
    assert not det.push(np.zeros(int(0.3 * RATE), np.float32))
    assert det.push(np.zeros(int(0.3 * RATE), np.float32))


def test_a_click_or_silence_alone_does_not_end_it() -> None:
    det = EndpointDetector(RATE, EndpointConfig(silence_s=0.5, min_speech_s=0.3))
    det.push(_tone(0.06, -10))  # 60 ms click
    assert not det.push(np.zeros(RATE, np.float32))
    assert not EndpointDetector(RATE).push(_tone(2.0, -60))  # quiet room noise is not speech


def test_maximum_length_ends_it() -> None:
    det = EndpointDetector(RATE, EndpointConfig(max_utterance_s=1.0))
    assert det.push(_tone(1.05, -20))


def test_microphone_callback_collects_blocks_and_fires() -> None:
    mic = Microphone(endpoint=EndpointConfig(silence_s=0.2))
    mic._detector = EndpointDetector(RATE, mic.endpoint)
    signal = np.concatenate([_tone(0.6, -20), np.zeros(int(0.4 * RATE), np.float32)])
    for block in np.split(signal, len(signal) // 320):
        mic.callback(block[:, None], len(block), None, None)
    assert mic._done.is_set()
    np.testing.assert_array_equal(np.concatenate(mic._blocks), signal)


def test_speaker_callback_reads_the_ring_and_pads_underruns() -> None:
    ring = AudioRing(4800)
    spk = Speaker(ring, 24_000, block=480)
    ring.write(np.full(600, 0.25, np.float32))
    out = np.full((480, 1), 9.0, np.float32)
    spk.callback(out, 480, None, None)
    assert (out == 0.25).all()
    spk.callback(out, 480, None, None)  # only 120 left: the rest is silence, one underrun
    assert (out[:120] == 0.25).all() and (out[120:] == 0).all()
    assert ring.stats()["underruns"] == 1
    assert spk.played_samples == 600  # what the device got from the ring, not the padding


def test_unopenable_devices_raise_a_clear_error() -> None:
    with pytest.raises(AudioDeviceError, match="cannot open the microphone 12345"):
        Microphone(device=12345).record(timeout_s=0.1)
    with pytest.raises(AudioDeviceError, match="cannot open the speaker 12345"):
        Speaker(AudioRing(16), 24_000, device=12345).start()


def test_speaker_flush_drops_what_is_queued_and_plays_on_afterwards() -> None:
    ring = AudioRing(24_000, "block")
    spk = Speaker(ring, 24_000, block=480)
    ring.write(np.full(4800, 0.5, np.float32))
    out = np.empty((480, 1), np.float32)
    spk.callback(out, 480, None, None)
    assert np.all(out == 0.5)
    spk.flush()  # barge-in: 4320 queued samples must never be played
    spk.callback(out, 480, None, None)
    assert np.all(out == 0) and ring.available == 0
    ring.write(np.full(480, -0.25, np.float32))  # the next answer plays normally
    spk.callback(out, 480, None, None)
    assert np.all(out == -0.25)
    assert spk.played_samples == 960  # the flushed samples were never played
