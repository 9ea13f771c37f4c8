"""The streaming detokenizer state machine: 12.5 Hz semantic tokens in, 24 kHz waveform chunks out (numpy only).

This is the host logic of the official ``PrefixStreamingFlowMatchingDetokenizer.detokenize_streaming`` +
``StreamingSemanticFMWrapper.infer_chunk`` + torchdyn's fixed-step Euler loop + kimia.py's chunking
(reference doc §3.2–3.3), written once; the networks are injected:

- ``dit_step(x_t, t_int, tokens, positions, prefix_k, prefix_v) -> (velocity, k, v)`` — one DiT evaluation on numpy
  arrays: x_t [1, T, 80] float32 normalised mel, t_int [1] int64, tokens / positions [1, T] int64, prefix_k / prefix_v
  [depth, 1, heads, P, head_dim] float32 (P >= 0, post-RoPE keys of earlier frames); returns velocity [1, T, 80] and
  this chunk's k, v [depth, 1, heads, T, head_dim]. The torch reference plugs in as
  ``kimia_edge.export.reference.dit.TorchDitStep``; the runtime plugs in an ONNX session.
- ``vocoder(mel [T, 80]) -> wav [T * frame_size]`` float32, de-normalised (natural-log) mel in, 24 kHz samples out.

Per chunk (official order): repeat tokens x4 to 50 Hz, prepend the withheld look-ahead ids of the previous chunk,
draw noise [T, 80], integrate 29 Euler steps (t_int = floor(t·1000), t and dt in float32 exactly as torchdyn walks
``linspace(0, 1, 30)``) against [cached K/V ‖ chunk], withhold the last 48 frames (look-ahead), re-run the network once
at t_int 999 on the clean emitted part to get the K/V that is cached ("priming"), keep the last 900 cached frames
with absolute positions, reset positions and cache near 4096, de-normalise, vocode and stitch with a periodic
Hamming cross-fade (first chunk: emit half; final chunk: emit everything, no cross-fade).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Tuple, Union

import numpy as np

from kimia_edge.runtime.dit_config import TIMESTEP_SCALE, DitConfig
from kimia_edge.runtime.spec.streaming import StreamingConfig

__all__ = ["StreamingDetokenizer", "WaveChunk", "MelChunk", "Interrupted", "DitStep", "Vocoder", "NoiseSource",
           "euler_time_grid", "hamming_window_periodic", "PRIMING_T"]

DitStep = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                   Tuple[np.ndarray, np.ndarray, np.ndarray]]
Vocoder = Callable[[np.ndarray], np.ndarray]
NoiseSource = Union[Callable[[int], np.ndarray], np.random.Generator, None]

# The priming pass evaluates the network at t = 0.999 (infer_chunk: ode_wrapper(torch.Tensor([0.999]), x)), which the
# wrapper turns into t_int = long(0.999 * 1000) = 999 in float32.
PRIMING_T = 0.999
# torch.hamming_window defaults: periodic=True, alpha=0.54, beta=0.46. The two overlapping halves of a periodic window
# sum to 2·alpha = 1.08 (the cross-fade gain, reference doc §3.3).
_HAMMING_ALPHA = 0.54
_HAMMING_BETA = 0.46


def _t_int(t: np.float32) -> int:
    """long(t * 1000) with float32 arithmetic (ode_wrapper.py forward); truncation = floor for t >= 0."""
    return int(np.float32(t) * np.float32(TIMESTEP_SCALE))


def _linspace_f32(points: int) -> np.ndarray:
    """``torch.linspace(0, 1, points)`` in float32 as the scalar CPU kernel computes it: step = 1/(points-1) in float32,
    first half start + step·i, second half end − step·(points−1−i). (Torch's vectorised lanes can differ by 1 ulp at
    a few entries, e.g. index 24 of 30: |Δt| = 6e-8, far below any tolerance.)"""
    step = np.float32(1.0) / np.float32(points - 1)
    idx = np.arange(points)
    half = points // 2
    lo = np.float32(0.0) + step * idx.astype(np.float32)
    hi = np.float32(1.0) - step * (points - 1 - idx).astype(np.float32)
    return np.where(idx < half, lo, hi).astype(np.float32)


def euler_time_grid(time_points: int) -> Tuple[np.ndarray, np.ndarray]:
    """The (t, dt) pairs of torchdyn's fixed-step Euler over ``linspace(0, 1, time_points)`` (float32): t starts at
    t_span[0], after each step t ← t + dt and dt ← t_span[k+1] − t. Returns (t [n], dt [n]) with n = time_points − 1."""
    if time_points < 2:
        raise ValueError(f"time_points: expected >= 2, got {time_points}")
    span = _linspace_f32(time_points)
    ts, dts = [], []
    t = span[0]
    dt = np.float32(span[1] - span[0])
    for step in range(1, time_points):
        ts.append(t)
        dts.append(dt)
        t = np.float32(t + dt)
        if step < time_points - 1:
            dt = np.float32(span[step + 1] - t)
    return np.asarray(ts, dtype=np.float32), np.asarray(dts, dtype=np.float32)


def hamming_window_periodic(length: int) -> np.ndarray:
    """``torch.hamming_window(length)`` (periodic): 0.54 − 0.46·cos(2πn/length), float32 [length]."""
    if length == 1:
        return np.ones(1, dtype=np.float32)
    n = np.arange(length, dtype=np.float64)
    return (_HAMMING_ALPHA - _HAMMING_BETA * np.cos(2.0 * np.pi * n / length)).astype(np.float32)


class Interrupted(Exception):
    """Raised inside ``push`` / ``finish`` when ``StreamingDetokenizer.interrupt`` was set (a cancelled turn)."""


@dataclass(frozen=True)
class MelChunk:
    """One chunk after the DiT, before the vocoder: ``mel`` [frames, 80] de-normalised; the other fields as in
    ``WaveChunk``."""

    index: int
    mel: np.ndarray
    start_position: int
    prefix_frames: int
    is_final: bool
    positions_reset: bool


@dataclass(frozen=True)
class WaveChunk:
    """One emitted piece of audio.

    ``wav`` [n] float32 at 24 kHz (append them in order); ``mel`` [frames, 80] the de-normalised mel this chunk
    generated; ``vocoder_in_mel`` [frames', 80] what the vocoder was given (held-back mel ‖ ``mel``);
    ``start_position`` the absolute frame position of the chunk's first frame; ``prefix_frames`` the cached K/V
    frames it attended to; ``positions_reset`` True if the position/KV reset fired after this chunk.
    """

    index: int
    wav: np.ndarray
    mel: np.ndarray
    vocoder_in_mel: np.ndarray
    start_position: int
    prefix_frames: int
    is_final: bool
    positions_reset: bool


class StreamingDetokenizer:
    """Streaming semantic-token → waveform detokenizer (one utterance at a time).

    ``push(tokens)`` buffers 12.5 Hz ids and yields every chunk that is known not to be the last one (a chunk is run
    once at least one token beyond it has arrived); ``finish()`` runs the remaining tokens as the final chunk and
    returns to the initial state; ``reset()`` drops everything. With the default config and the same noise the output
    equals kimia.py ``detokenize_audio`` (first chunk 30 tokens, then 30, look-ahead 12, 29 Euler steps).
    """

    def __init__(self, dit_step: DitStep, vocoder: Vocoder, config: StreamingConfig, dit: DitConfig,
                 noise: NoiseSource = None) -> None:
        config.validate()
        dit.validate()
        if config.max_positions > dit.max_positions:
            raise ValueError(f"max_positions: the DiT supports positions < {dit.max_positions}, "
                             f"got a streaming limit of {config.max_positions}")
        self.dit_step = dit_step
        self.vocoder = vocoder
        self.config = config
        self.dit = dit
        if noise is None:
            noise = np.random.default_rng()
        self._noise = noise
        self._t, self._dt = euler_time_grid(config.ode_time_points)
        self._t_ints = np.asarray([_t_int(t) for t in self._t], dtype=np.int64)
        self._priming_t_int = _t_int(np.float32(PRIMING_T))
        self._windows: dict = {}
        # Set from another thread to stop between two network calls: the next call raises Interrupted.
        self.interrupt: Optional[threading.Event] = None
        self.reset()

    # ---- public API ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the initial state: no buffered tokens, no cache, positions at 0 (official ``clear_states``)."""
        self._pending = np.zeros(0, dtype=np.int64)
        self._chunk_index = 0
        self._carry: Optional[np.ndarray] = None          # withheld 50 Hz look-ahead ids
        self._clear_dit_state()
        self._pre_mel: Optional[np.ndarray] = None
        self._pre_wav: Optional[np.ndarray] = None
        self.resets = 0                                   # position resets so far in this utterance

    def push(self, tokens: Iterable[int]) -> Iterator[WaveChunk]:
        """Buffers semantic ids (12.5 Hz, values in [0, semantic_vocab_size)) and yields the chunks that can run."""
        for chunk in self.runnable(tokens):
            yield self._run_chunk(chunk, is_final=False)

    def finish(self) -> Iterator[WaveChunk]:
        """Runs the buffered tail as the final chunk (no look-ahead withheld, no cross-fade) and resets."""
        try:
            tail = self.take_tail()
            if tail.size:
                yield self._run_chunk(tail, is_final=True)
        finally:
            self.reset()

    def runnable(self, tokens: Iterable[int]) -> Iterator[np.ndarray]:
        """Buffers ``tokens`` and yields the token ids of each chunk that can run now (one is known not to be the
        last: at least one token beyond it has arrived). Run each with ``dit_chunk`` before taking the next."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.dit.semantic_vocab_size):
            raise ValueError(f"tokens: expected ids in [0, {self.dit.semantic_vocab_size}), "
                             f"got range [{ids.min()}, {ids.max()}]")
        self._pending = np.concatenate([self._pending, ids])
        while self._pending.size > self.config.chunk_tokens_at(self._chunk_index):
            n = self.config.chunk_tokens_at(self._chunk_index)
            chunk, self._pending = self._pending[:n], self._pending[n:]
            yield chunk

    def take_tail(self) -> np.ndarray:
        """The buffered ids not yet run (the final chunk's), removed from the buffer."""
        tail, self._pending = self._pending, np.zeros(0, dtype=np.int64)
        return tail

    @property
    def start_position(self) -> int:
        """Absolute frame position of the next chunk's first frame."""
        return self._start_position

    @property
    def kv_frames(self) -> int:
        """Cached K/V frames (<= max_kv_cache_frames)."""
        return int(self._prefix_k.shape[3])

    # ---- one chunk ----------------------------------------------------------------------------------------------
    def _clear_dit_state(self) -> None:
        """Official ``semantic_fm.clear_all_states``: positions to 0, empty K/V cache."""
        d = self.dit
        self._start_position = 0
        empty = np.zeros((d.depth, 1, d.num_heads, 0, d.head_dim), dtype=np.float32)
        self._prefix_k = empty
        self._prefix_v = empty.copy()

    def _draw_noise(self, frames: int) -> np.ndarray:
        shape = (frames, self.dit.input_size)
        if isinstance(self._noise, np.random.Generator):
            x = self._noise.standard_normal(shape, dtype=np.float32)
        else:
            x = np.asarray(self._noise(frames), dtype=np.float32)
        if x.shape != shape:
            raise ValueError(f"noise: expected {list(shape)}, got {list(x.shape)}")
        return x

    def _withheld_frames(self, frames_in: int) -> int:
        """Look-ahead frames withheld from a non-final chunk: the configured look-ahead, but never more than half of
        the chunk's tokens (only matters for chunks smaller than 2x the look-ahead, e.g. a 10-token first chunk;
        with the official sizes it is always the full 48 frames)."""
        up = self.config.upsample_factor
        tokens_in = frames_in // up
        return min(self.config.look_ahead_tokens, tokens_in // 2) * up

    def _check_interrupt(self) -> None:
        if self.interrupt is not None and self.interrupt.is_set():
            raise Interrupted("the streaming detokenizer was interrupted")

    def _net(self, x: np.ndarray, t_int: int, ids: np.ndarray, positions: np.ndarray
             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._check_interrupt()
        frames = x.shape[0]
        vel, k, v = self.dit_step(x[None], np.asarray([t_int], dtype=np.int64), ids[None], positions[None],
                                  self._prefix_k, self._prefix_v)
        d = self.dit
        kv_shape = (d.depth, 1, d.num_heads, frames, d.head_dim)
        if vel.shape != (1, frames, d.input_size) or k.shape != kv_shape or v.shape != kv_shape:
            raise ValueError(f"dit_step: expected velocity {[1, frames, d.input_size]} and k/v {list(kv_shape)}, got "
                             f"{list(vel.shape)}, {list(k.shape)}, {list(v.shape)}")
        return vel[0].astype(np.float32, copy=False), k, v

    def _run_chunk(self, tokens: np.ndarray, is_final: bool) -> WaveChunk:
        return self.vocode_chunk(self.dit_chunk(tokens, is_final))

    def dit_chunk(self, tokens: np.ndarray, is_final: bool) -> "MelChunk":
        """The DiT half of one chunk: Euler integration, priming, K/V cache and position update, de-normalised mel.
        Touches only the DiT state, so ``vocode_chunk`` of this chunk may run on another thread while the next
        chunk's ``dit_chunk`` runs (runtime/synthesis_pipeline.py); ``vocode_chunk`` calls must stay in order."""
        cfg, d = self.config, self.dit
        ids = np.repeat(tokens, cfg.upsample_factor)
        if self._carry is not None:
            ids = np.concatenate([self._carry, ids])
        frames_in = ids.shape[0]
        start = self._start_position
        prefix_frames = self.kv_frames
        positions = np.arange(start, start + frames_in, dtype=np.int64)
        if positions[-1] >= d.max_positions:
            raise ValueError(f"positions: chunk reaches position {positions[-1]}, the DiT supports < "
                             f"{d.max_positions}")

        # Euler integration from noise (t = 0) to data (t = 1); K/V = [cache ‖ current x_t] at every evaluation.
        x = self._draw_noise(frames_in)
        k = v = None
        for t_int, dt in zip(self._t_ints, self._dt):
            vel, k, v = self._net(x, int(t_int), ids, positions)
            x = x + dt * vel

        withheld = 0 if is_final else self._withheld_frames(frames_in)
        if withheld:
            self._carry = ids[frames_in - withheld:]
            out = x[: frames_in - withheld]
            # Priming: K/V of the clean emitted part, which later chunks attend to.
            _, k, v = self._net(out, self._priming_t_int, ids[: frames_in - withheld],
                                positions[: frames_in - withheld])
        else:
            out = x          # final chunk, or look-ahead 0: the cache keeps the last Euler evaluation's K/V
        emitted = out.shape[0]

        # Cache update: append this chunk's K/V, keep the most recent max_kv_cache_frames (positions stay absolute).
        window = cfg.max_kv_cache_frames
        self._prefix_k = np.concatenate([self._prefix_k, k], axis=3)[:, :, :, -window:]
        self._prefix_v = np.concatenate([self._prefix_v, v], axis=3)[:, :, :, -window:]
        self._start_position = start + emitted

        mel = out * np.float32(d.mel_std) + np.float32(d.mel_mean) if d.normalize_mel else out
        mel = np.ascontiguousarray(mel, dtype=np.float32)

        positions_reset = False
        if not is_final and self._needs_reset(emitted):
            self._clear_dit_state()      # look-ahead ids and the held-back mel / wav are kept (official)
            self.resets += 1
            positions_reset = True
        chunk = MelChunk(index=self._chunk_index, mel=mel, start_position=start, prefix_frames=prefix_frames,
                         is_final=is_final, positions_reset=positions_reset)
        self._chunk_index += 1
        return chunk

    def vocode_chunk(self, chunk: "MelChunk") -> WaveChunk:
        """The vocoder half of one chunk: vocode (held-back mel ‖ mel) and cross-fade; updates the held-back mel/wav.
        Call it once per ``dit_chunk`` result, in chunk order."""
        wav, vocoder_in = self._stitch(chunk.mel, chunk.is_final)
        return WaveChunk(index=chunk.index, wav=wav, mel=chunk.mel, vocoder_in_mel=vocoder_in,
                         start_position=chunk.start_position, prefix_frames=chunk.prefix_frames,
                         is_final=chunk.is_final, positions_reset=chunk.positions_reset)

    def _needs_reset(self, emitted: int) -> bool:
        """Official rule: start + 2·emitted > max_positions. Added guard for non-official schedules (growing chunks):
        also reset if the next chunk at its largest would run past the limit."""
        cfg = self.config
        start = self._start_position
        if start + 2 * emitted > cfg.max_positions:
            return True
        carried = 0 if self._carry is None else self._carry.shape[0]
        next_frames = carried + cfg.chunk_tokens_at(self._chunk_index + 1) * cfg.upsample_factor
        return start + next_frames > cfg.max_positions

    # ---- vocoder and cross-fade ---------------------------------------------------------------------------------
    def _vocode(self, mel: np.ndarray) -> np.ndarray:
        self._check_interrupt()
        wav = np.asarray(self.vocoder(mel), dtype=np.float32).reshape(-1)
        expected = mel.shape[0] * self.config.frame_size_samples
        if wav.shape[0] != expected:
            raise ValueError(f"vocoder: expected {expected} samples for {mel.shape[0]} frames, got {wav.shape[0]}")
        return wav

    def _window(self, length: int) -> np.ndarray:
        if length not in self._windows:
            self._windows[length] = hamming_window_periodic(length)
        return self._windows[length]

    def _stitch(self, mel: np.ndarray, is_final: bool) -> Tuple[np.ndarray, np.ndarray]:
        """Returns (samples to emit, vocoder input mel); updates the held-back mel / wav (detokenize_streaming)."""
        frame = self.config.frame_size_samples
        if self._pre_mel is None:
            vocoder_in = mel
            wav = self._vocode(vocoder_in)
            if is_final:
                return wav, vocoder_in
            frames = mel.shape[0]
            half = frame * frames // 2                  # emit the first half, hold back the second
            self._pre_wav = wav[wav.shape[0] - half:]
            self._pre_mel = mel[(-frames) // 2:]        # official "speech_mel[-chunk_size // 2:]": ceil(frames/2)
            return wav[:half], vocoder_in

        vocoder_in = np.concatenate([self._pre_mel, mel], axis=0)
        wav = self._vocode(vocoder_in)
        if is_final:
            return wav, vocoder_in                      # whole tail, no cross-fade
        prev = self._pre_wav.shape[0]
        total = wav.shape[0]
        gen = 2 * prev if total > 2 * prev else total // 2   # exact official rule (not a min)
        half = gen // 2
        window = self._window(gen)
        out = wav[:gen].copy()
        out[:half] = self._pre_wav[:half] * window[gen - half:] + wav[:half] * window[:half]
        rest = total - gen
        rest_frames = rest // frame
        self._pre_wav = wav[total - rest:]
        # Python's mel[-0:] is the whole array; the official slice inherits that when rest < one frame.
        self._pre_mel = mel[mel.shape[0] - rest_frames:] if rest_frames else mel
        return out, vocoder_in
