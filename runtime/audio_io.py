"""Live audio with sounddevice: microphone capture that ends an utterance on silence (or on a key: push-to-talk),
and speaker playback whose output callback only reads the audio ring — it never blocks, takes no lock and
allocates no sample buffer (one small view object per call); an underrun plays silence and is counted by the ring.

The callbacks are plain methods, so tests drive them without a sound card.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

import numpy as np

from kimia_edge.runtime.rings import AudioRing
from kimia_edge.runtime.vad import SPEECH_STOPPED, EnergyVad, VadConfig

MIC_RATE_HZ = 16_000  # what the encoders take; PortAudio resamples if the device cannot


class AudioDeviceError(RuntimeError):
    """A microphone or speaker could not be opened; the message says which and why."""


@dataclass
class EndpointConfig:
    """Energy-based end of utterance. Levels in dBFS of 30 ms frames; durations in seconds."""

    frame_s: float = 0.03
    speech_db: float = -40.0  # a frame louder than this is speech
    silence_s: float = 0.8  # this much silence after speech ends the utterance
    min_speech_s: float = 0.3  # shorter bursts (clicks) do not count as speech
    max_utterance_s: float = 30.0


class EndpointDetector:
    """Feed it blocks of samples; ``done`` turns True once speech was followed by ``silence_s`` of silence (or the
    utterance reached its maximum). Pure numpy, no device: the energy state machine of ``runtime/vad.EnergyVad``
    (one onset / offset rule for the endpoint and for the VAD) plus the length cap."""

    def __init__(self, sample_rate_hz: int, config: EndpointConfig = EndpointConfig()) -> None:
        self.cfg = config
        self.vad = EnergyVad(VadConfig(min_speech_s=config.min_speech_s, min_silence_s=config.silence_s,
                                       pre_roll_s=0.0),
                             speech_db=config.speech_db, frame_s=config.frame_s, sample_rate_hz=sample_rate_hz)
        self.rate = sample_rate_hz
        self.samples = 0
        self.done = False

    def push(self, samples: np.ndarray) -> bool:
        samples = np.asarray(samples, np.float32).reshape(-1)
        self.samples += len(samples)
        if any(e.kind == SPEECH_STOPPED for e in self.vad.push(samples)) \
                or self.samples >= self.cfg.max_utterance_s * self.rate:
            self.done = True
        return self.done


def _sounddevice() -> Any:
    """The sounddevice module; its import raises OSError where the PortAudio library is missing."""
    try:
        import sounddevice
    except OSError as exc:
        raise OSError(f"{exc} (Debian/Ubuntu: apt-get install libportaudio2)") from exc
    return sounddevice


class Microphone:
    """Captures one utterance: ``record()`` returns float32 mono samples at ``MIC_RATE_HZ`` once the endpoint
    detector fires (or ``stop()`` is called: push-to-talk)."""

    def __init__(self, device: Optional[Any] = None, endpoint: EndpointConfig = EndpointConfig(),
                 block_s: float = 0.02) -> None:
        self.device = device
        self.endpoint = endpoint
        self.block = int(block_s * MIC_RATE_HZ)
        self._blocks: List[np.ndarray] = []
        self._done = threading.Event()
        self._detector: Optional[EndpointDetector] = None
        self.overflows = 0

    def callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """sounddevice input callback: copies the block (the device reuses its buffer) and runs the detector."""
        if status and getattr(status, "input_overflow", False):
            self.overflows += 1
        block = indata[:, 0].copy() if indata.ndim == 2 else indata.copy()
        self._blocks.append(block)
        if self._detector is not None and self._detector.push(block):
            self._done.set()

    @contextlib.contextmanager
    def listen(self) -> Iterator["queue.Queue[np.ndarray]"]:
        """Captures without end (full duplex): yields a queue that receives every block [block] float32 at
        ``MIC_RATE_HZ`` as the device delivers it; the device closes when the with-block ends."""
        blocks: "queue.Queue[np.ndarray]" = queue.Queue()

        def callback(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
            if status and getattr(status, "input_overflow", False):
                self.overflows += 1
            blocks.put(indata[:, 0].copy() if indata.ndim == 2 else indata.copy())

        stream = self._open(callback)
        with stream:
            yield blocks

    def _open(self, callback: Any) -> Any:
        try:
            sd = _sounddevice()
            return sd.InputStream(samplerate=MIC_RATE_HZ, channels=1, dtype="float32", blocksize=self.block,
                                  device=self.device, callback=callback)
        except Exception as exc:  # PortAudioError, ValueError for an unknown device
            raise AudioDeviceError(f"cannot open the microphone {self.device or '(default)'}: {exc}") from exc

    def stop(self) -> None:
        """Ends the current utterance now (push-to-talk release)."""
        self._done.set()

    def record(self, push_to_talk: bool = False, timeout_s: Optional[float] = None) -> np.ndarray:
        self._blocks, self._done = [], threading.Event()
        self._detector = None if push_to_talk else EndpointDetector(MIC_RATE_HZ, self.endpoint)
        stream = self._open(self.callback)
        with stream:
            self._done.wait(timeout_s)
        return np.concatenate(self._blocks) if self._blocks else np.zeros(0, np.float32)


class Speaker:
    """Plays what arrives in ``ring`` (float32 mono at ``sample_rate_hz``). The output callback only calls
    ``ring.read_into_nowait(..., pad_silence=True)`` into the device's own buffer: no lock, no sample buffer,
    silence + a counted underrun when the synthesis falls behind."""

    def __init__(self, ring: AudioRing, sample_rate_hz: int, device: Optional[Any] = None, block: int = 480) -> None:
        self.ring, self.rate, self.device, self.block = ring, sample_rate_hz, device, block
        self._stream: Any = None
        self._flush = threading.Event()
        # Samples of the ring handed to the device (not the silence of underruns or flushes) since start: what the
        # user heard, give or take the device's own output latency. Written by the callback only.
        self.played_samples = 0

    def flush(self, wait_s: float = 0.0) -> None:
        """Drops what is queued and not yet played (barge-in), from any thread: the callback, the ring's only reader,
        clears the ring at its next block and plays silence for that block. Until then (one block) ``played_samples``
        may still grow; ``wait_s`` > 0 waits up to that long for the callback to have done it (device running)."""
        self._flush.set()
        deadline = time.monotonic() + wait_s
        while self._stream is not None and self._flush.is_set() and time.monotonic() < deadline:
            time.sleep(self.block / self.rate / 4)

    def callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if self._flush.is_set():
            self.ring.clear()
            self._flush.clear()
        self.played_samples += self.ring.read_into_nowait(outdata.reshape(-1), pad_silence=True)

    def start(self) -> None:
        try:
            sd = _sounddevice()
            self._stream = sd.OutputStream(samplerate=self.rate, channels=1, dtype="float32", blocksize=self.block,
                                           device=self.device, callback=self.callback)
            self._stream.start()
        except Exception as exc:
            raise AudioDeviceError(f"cannot open the speaker {self.device or '(default)'}: {exc}") from exc

    def drain_and_stop(self) -> None:
        """Waits (from the caller's thread) until the ring is closed and the device has played it out."""
        while not (self.ring.closed and self.ring.available == 0):
            time.sleep(self.block / self.rate)
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
