"""Voice activity detection on a live 16 kHz stream (torch-free): Silero VAD's ONNX graph through ONNX Runtime when
the bundle ships it, an energy detector otherwise.

    vad = open_vad(bundle_dir, VadConfig())
    for event in vad.push(block):            # any block length, float32 mono 16 kHz
        if event.kind == "speech_stopped":
            clip = vad.utterance()           # from (start - pre_roll) to the stop

Both detectors share one state machine (``FrameVad``): a subclass only turns fixed-size frames into speech
probabilities in [0, 1]. A frame at or above ``threshold`` is speech; a frame below ``threshold - 0.15`` is silence
(Silero's own hysteresis, ``VADIterator``); frames in between keep the current state.

- onset: a run of speech that lasts ``min_speech_s`` (measured from its first speech frame, no silence frame in it)
  emits ``speech_started`` with ``sample`` = the first sample of that first speech frame, i.e. the event arrives
  ``min_speech_s`` after the onset it reports;
- offset: while speaking, ``min_silence_s`` counted from the first silence frame (a speech frame in between starts
  the count again) emits ``speech_stopped`` with ``sample`` = the first sample of that silence frame.

``sample`` counts 16 kHz samples pushed since construction or ``reset()``. ``pre_roll_s`` only widens
``utterance()``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Union

import numpy as np

__all__ = ["VadConfig", "VadEvent", "VoiceActivityDetector", "FrameVad", "EnergyVad", "SileroVad", "open_vad",
           "frame_level_db", "VAD_SAMPLE_RATE_HZ", "SPEECH_STARTED", "SPEECH_STOPPED"]

log = logging.getLogger(__name__)

VAD_SAMPLE_RATE_HZ = 16_000
SPEECH_STARTED, SPEECH_STOPPED = "speech_started", "speech_stopped"
_HYSTERESIS = 0.15  # silero-vad VADIterator: speech ends below threshold - 0.15


@dataclass
class VadConfig:
    """threshold: speech probability in (0, 1); durations in seconds (see the module docstring)."""

    threshold: float = 0.5
    pre_roll_s: float = 0.3
    min_speech_s: float = 0.25
    min_silence_s: float = 0.6

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold: expected 0 < threshold < 1, got {self.threshold}")
        for name in ("pre_roll_s", "min_speech_s", "min_silence_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 60.0):
                raise ValueError(f"{name}: expected seconds in [0, 60], got {value!r}")


@dataclass
class VadEvent:
    """kind: "speech_started" | "speech_stopped"; sample: index in the 16 kHz stream pushed so far."""

    kind: str
    sample: int


def frame_level_db(frames: np.ndarray) -> np.ndarray:
    """Level in dBFS of each row of ``frames`` [n, frame] (mean power; a full-scale sine is -3 dBFS)."""
    return 10.0 * np.log10(np.mean(frames * frames, axis=1) + 1e-12)


class VoiceActivityDetector:
    """What every detector offers: ``push`` (events), ``reset``, ``speaking``, ``utterance``."""

    config: VadConfig

    def push(self, samples_16k: np.ndarray) -> List[VadEvent]:
        """Feeds a block [n] float32 mono at 16 kHz (any n); returns the events it completed, in order."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forgets the stream: sample indices start at 0 again, no utterance."""
        raise NotImplementedError

    @property
    def speaking(self) -> bool:
        """True between a speech_started and the next speech_stopped."""
        raise NotImplementedError

    def utterance(self) -> np.ndarray:
        """The last or current utterance [n] float32 16 kHz, from (start - pre_roll) to its stop (to now while still
        speaking); empty if there was none."""
        raise NotImplementedError


class FrameVad(VoiceActivityDetector):
    """The shared state machine over fixed frames of ``frame_samples``; subclasses implement ``_probabilities``."""

    def __init__(self, config: VadConfig, frame_samples: int, sample_rate_hz: int = VAD_SAMPLE_RATE_HZ) -> None:
        self.config = config
        self.frame = int(frame_samples)
        self.rate = int(sample_rate_hz)
        self._min_speech = config.min_speech_s * self.rate
        self._min_silence = config.min_silence_s * self.rate
        self._pre_roll = int(round(config.pre_roll_s * self.rate))
        self.reset()

    def _probabilities(self, frames: np.ndarray) -> np.ndarray:
        """Speech probability [n] of each row of ``frames`` [n, frame] (consecutive, in stream order)."""
        raise NotImplementedError

    def _reset_model(self) -> None:
        """Clears the subclass's recurrent state, if any."""

    def reset(self) -> None:
        self._reset_model()
        self._pending = np.zeros(0, np.float32)
        self._pushed = 0              # samples pushed (the stream's "now")
        self._framed = 0              # samples consumed as whole frames
        self._speaking = False
        self._candidate: Optional[int] = None   # first sample of a speech run not yet long enough
        self._silence_from: Optional[int] = None  # first sample of the current silence while speaking
        self._start: Optional[int] = None        # onset of the current / last utterance
        self._stop: Optional[int] = None
        self._buf = np.zeros(0, np.float32)       # recent samples; _buf[0] is stream sample _buf_start
        self._buf_start = 0
        self._last = np.zeros(0, np.float32)

    @property
    def speaking(self) -> bool:
        return self._speaking

    def push(self, samples_16k: np.ndarray) -> List[VadEvent]:
        x = np.asarray(samples_16k, dtype=np.float32).reshape(-1)
        self._buf = np.concatenate([self._buf, x])
        self._pushed += len(x)
        self._pending = np.concatenate([self._pending, x])
        n = len(self._pending) // self.frame
        events: List[VadEvent] = []
        if n:
            frames = self._pending[: n * self.frame].reshape(n, self.frame)
            self._pending = self._pending[n * self.frame:]
            for p in self._probabilities(frames):
                events += self._step(float(p))
        self._trim()
        return events

    def _step(self, p: float) -> List[VadEvent]:
        start, end = self._framed, self._framed + self.frame
        self._framed = end
        speech, silence = p >= self.config.threshold, p < self.config.threshold - _HYSTERESIS
        if not self._speaking:
            if silence:
                self._candidate = None
            elif speech and self._candidate is None:
                self._candidate = start
            if self._candidate is not None and end - self._candidate >= max(self._min_speech, 1):
                self._speaking, self._start, self._stop = True, self._candidate, None
                self._candidate, self._silence_from = None, None
                return [VadEvent(SPEECH_STARTED, self._start)]
            return []
        if speech:
            self._silence_from = None
        elif silence and self._silence_from is None:
            self._silence_from = start
        if self._silence_from is not None and end - self._silence_from >= self._min_silence:
            self._speaking, self._stop, self._silence_from = False, self._silence_from, None
            self._last = self._slice(self._utterance_from(), self._stop)
            return [VadEvent(SPEECH_STOPPED, self._stop)]
        return []

    def _utterance_from(self) -> int:
        assert self._start is not None
        return max(0, self._start - self._pre_roll)

    def _slice(self, a: int, b: int) -> np.ndarray:
        lo = max(a, self._buf_start) - self._buf_start
        return self._buf[lo: max(lo, b - self._buf_start)].copy()

    def _trim(self) -> None:
        """Keeps only what a future ``utterance()`` can need: from the running utterance's or candidate's pre-roll
        (or the last ``pre_roll`` samples and the unframed tail when idle)."""
        if self._speaking:
            keep = self._utterance_from()
        else:
            anchor = self._candidate if self._candidate is not None else self._framed
            keep = max(0, anchor - self._pre_roll)
        if keep > self._buf_start:
            self._buf = self._buf[keep - self._buf_start:]
            self._buf_start = keep

    def utterance(self) -> np.ndarray:
        if self._speaking:
            return self._slice(self._utterance_from(), self._pushed)
        return self._last.copy()


class EnergyVad(FrameVad):
    """Frame energy in dBFS turned into a probability: 0.5 at ``speech_db``, a logistic of ``slope_db`` per e-fold
    (so ``threshold`` 0.5 means "louder than speech_db"; the hysteresis band is about 3 dB wide). No model: the
    fallback when the bundle has no VAD. Loud noise counts as speech."""

    def __init__(self, config: Optional[VadConfig] = None, speech_db: float = -40.0, frame_s: float = 0.03,
                 sample_rate_hz: int = VAD_SAMPLE_RATE_HZ, slope_db: float = 2.0) -> None:
        self.speech_db, self.slope_db = float(speech_db), float(slope_db)
        super().__init__(config or VadConfig(), max(1, int(frame_s * sample_rate_hz)), sample_rate_hz)

    def _probabilities(self, frames: np.ndarray) -> np.ndarray:
        z = np.clip((frame_level_db(frames) - self.speech_db) / self.slope_db, -60.0, 60.0)
        return 1.0 / (1.0 + np.exp(-z))


class SileroVad(FrameVad):
    """Silero VAD (v5/v6 ONNX graph) on 512-sample windows at 16 kHz. Each call gets the last 64 samples of the
    previous window prepended (``input`` [1, 576]), the recurrent ``state`` [2, 1, 128] and ``sr`` (int64 16000), and
    returns the speech probability ``output`` [1, 1] and the next state ``stateN`` — as silero-vad's own
    ``OnnxWrapper`` does. ``session_or_path``: an onnxruntime InferenceSession or the .onnx file (opened on the CPU,
    one thread: the graph is ~1 MB and runs in well under a millisecond per 32 ms window)."""

    WINDOW = 512
    CONTEXT = 64

    def __init__(self, session_or_path: Union[str, Path, Any], config: Optional[VadConfig] = None) -> None:
        if isinstance(session_or_path, (str, Path)):
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            session_or_path = ort.InferenceSession(str(session_or_path), sess_options=opts,
                                                   providers=["CPUExecutionProvider"])
        self.session = session_or_path
        names = [i.name for i in self.session.get_inputs()]
        outs = [o.name for o in self.session.get_outputs()]
        if set(names) != {"input", "state", "sr"} or len(outs) != 2:
            raise ValueError(f"not a Silero VAD v5/v6 graph: inputs {names} (expected input, state, sr), "
                             f"outputs {outs} (expected output, stateN)")
        self._out_names = outs
        state = next(i for i in self.session.get_inputs() if i.name == "state")
        self._state_shape = tuple(d if isinstance(d, int) else 1 for d in state.shape) or (2, 1, 128)
        self._sr = np.array(VAD_SAMPLE_RATE_HZ, dtype=np.int64)
        super().__init__(config or VadConfig(), self.WINDOW)

    def _reset_model(self) -> None:
        self._state = np.zeros(self._state_shape, np.float32)
        self._context = np.zeros(self.CONTEXT, np.float32)

    def _probabilities(self, frames: np.ndarray) -> np.ndarray:
        probs = np.empty(len(frames), np.float32)
        for i, frame in enumerate(frames):
            x = np.concatenate([self._context, frame])[None]
            out, self._state = self.session.run(self._out_names, {"input": x, "state": self._state, "sr": self._sr})
            probs[i] = float(np.asarray(out).reshape(-1)[0])
            self._context = frame[-self.CONTEXT:]
        return probs


def open_vad(bundle_dir: Optional[Path], config: Optional[VadConfig] = None,
             cache_dir: Optional[Path] = None) -> VoiceActivityDetector:
    """SileroVad from the bundle's ``vad`` artifact (checked like every artifact: size, and sha256 unless the
    verification stamp says it did not change) when the manifest lists one; EnergyVad otherwise (also for
    ``bundle_dir=None``). Logs at INFO which one it chose."""
    from kimia_edge.runtime.spec.graphs import VAD

    if bundle_dir is not None:
        from kimia_edge.runtime.bundle import ensure_usable, read_manifest

        bundle_dir = Path(bundle_dir)
        manifest = read_manifest(bundle_dir)
        artifact = next((a for a in manifest.artifacts if a.name == VAD), None)
        if artifact is not None:
            ensure_usable(bundle_dir, manifest, [artifact], cache_dir)
            log.info("VAD: Silero (%s, %s)", artifact.path, artifact.extra.get("package", "?"))
            return SileroVad(bundle_dir / artifact.path, config or VadConfig())
        log.info("VAD: energy (the bundle %s has no %s artifact)", bundle_dir, VAD)
    else:
        log.info("VAD: energy (no bundle given)")
    return EnergyVad(config or VadConfig())
