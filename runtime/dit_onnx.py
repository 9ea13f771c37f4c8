"""The detokenizer's networks on ONNX Runtime sessions, as the callables runtime/detokenizer.py takes.

``OnnxDitStep`` is the hot path (29 Euler evaluations + 1 priming per chunk, all against the same prefix). What it
does per call is bounded: the x_t / tokens / positions arrays are passed through untouched when they already have
the graph's dtype and layout (the state machine's always do); the prefix K/V is made graph-ready once per chunk —
the state machine hands the same two arrays to every call of a chunk — by copying it into a buffer kept from the
previous chunk (no copy at all when it is already contiguous float32); t_int and prefix_len live in two reused
1-element arrays. The outputs are ONNX Runtime's own arrays, which the caller keeps.
The graph reads one token id per aligned group of GRAPH_TOKEN_FRAMES frames (the adaLN condition per token); each
new ``tokens`` array (one per chunk) is checked to be grouped so, as the detokenizer's x4-repeated ids always are.
An empty prefix (first chunk) becomes the MIN_PREFIX_SLOTS masked slots the graph expects (export/graphs/dit_step.py).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from kimia_edge.runtime.sessions import Session
from kimia_edge.runtime.spec.graphs import GRAPHS
from kimia_edge.runtime.spec.streaming import GRAPH_TOKEN_FRAMES, MIN_PREFIX_SLOTS

_DIT_INPUTS = GRAPHS["dit_step"].inputs
_VOCODER_INPUT = GRAPHS["vocoder"].inputs[0]


def check_grouped_tokens(tokens: np.ndarray, group: int = GRAPH_TOKEN_FRAMES) -> None:
    """Raises unless every aligned group of ``group`` frames of ``tokens`` [1, T] holds one id (the last group may be
    partial): the DiT-step graph reads only the first id of each group."""
    ids = np.asarray(tokens).reshape(-1)
    changes = np.flatnonzero(ids[1:] != ids[:-1]) + 1  # frames where a new id starts
    if changes.size and np.any(changes % group):
        frame = int(changes[changes % group != 0][0])
        raise ValueError(f"tokens: the DiT step takes one id per aligned group of {group} frames (12.5 Hz ids "
                         f"repeated x{group}); the id changes at frame {frame}")


def pad_prefix(prefix_k: np.ndarray, prefix_v: np.ndarray, depth: int, heads: int, head_dim: int
               ) -> Tuple[np.ndarray, np.ndarray, int]:
    """(k, v, valid length) as the graph takes them, allocating as needed (calibration, tests): contiguous float32
    [depth, 1, heads, P, head_dim]; a prefix shorter than MIN_PREFIX_SLOTS is zero-padded to MIN_PREFIX_SLOTS slots."""
    n = prefix_k.shape[3] if prefix_k.ndim == 5 else 0
    if n >= MIN_PREFIX_SLOTS:
        return np.ascontiguousarray(prefix_k, np.float32), np.ascontiguousarray(prefix_v, np.float32), n
    shape = (depth, 1, heads, MIN_PREFIX_SLOTS, head_dim)
    k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    if n:
        k[:, :, :, :n], v[:, :, :, :n] = prefix_k, prefix_v
    return k, v, n


class OnnxDitStep:
    """``dit_step(x_t, t_int, tokens, positions, prefix_k, prefix_v) -> (velocity, k, v)`` over a DiT-step session.

    Contract (kept by runtime/detokenizer.py): a prefix array passed in is not modified in place afterwards — the
    state machine replaces its cache with new arrays, so "same object as the last call" means "same prefix".
    """

    def __init__(self, session: Session, depth: int, heads: int, head_dim: int) -> None:
        self.session = session
        self.depth, self.heads, self.head_dim = depth, heads, head_dim
        self._t_int = np.zeros(1, np.int64)
        self._prefix_len = np.zeros(1, np.int64)
        # the caller's prefix arrays seen last, and their graph-ready forms
        self._src: Tuple[Optional[np.ndarray], Optional[np.ndarray]] = (None, None)
        self._checked_tokens: Optional[np.ndarray] = None
        self._kv: Tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.float32), np.zeros(0, np.float32))
        # copy targets by prefix length (steady state: one entry, the full window)
        self._buffers: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        self.prefix_copies = 0  # prefixes copied so far (observability: one per chunk at most once the window is full)

    def _buffer(self, n: int) -> Tuple[np.ndarray, np.ndarray]:
        if n not in self._buffers:
            shape = (self.depth, 1, self.heads, n, self.head_dim)
            if len(self._buffers) > 2:  # lengths change only while the window fills; keep the memory bounded
                self._buffers.clear()
            self._buffers[n] = (np.zeros(shape, np.float32), np.zeros(shape, np.float32))
        return self._buffers[n]

    def _graph_prefix(self, prefix_k: np.ndarray, prefix_v: np.ndarray) -> None:
        expected = (self.depth, 1, self.heads)
        if prefix_k.ndim != 5 or prefix_k.shape[:3] != expected or prefix_k.shape[4] != self.head_dim \
                or prefix_v.shape != prefix_k.shape:
            raise ValueError(f"prefix_k / prefix_v: expected [{self.depth}, 1, {self.heads}, P, {self.head_dim}], "
                             f"got {list(prefix_k.shape)} / {list(prefix_v.shape)}")
        n = prefix_k.shape[3]
        self._prefix_len[0] = n
        contiguous = all(a.dtype == np.float32 and a.flags.c_contiguous for a in (prefix_k, prefix_v))
        if n >= MIN_PREFIX_SLOTS and contiguous:
            self._kv = (prefix_k, prefix_v)
            return
        k, v = self._buffer(max(n, MIN_PREFIX_SLOTS))
        if n < MIN_PREFIX_SLOTS:
            k.fill(0.0)
            v.fill(0.0)
        np.copyto(k[:, :, :, :n], prefix_k)
        np.copyto(v[:, :, :, :n], prefix_v)
        self.prefix_copies += 1
        self._kv = (k, v)

    def __call__(self, x_t: np.ndarray, t_int: np.ndarray, tokens: np.ndarray, positions: np.ndarray,
                 prefix_k: np.ndarray, prefix_v: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        if prefix_k is not self._src[0] or prefix_v is not self._src[1]:
            self._graph_prefix(prefix_k, prefix_v)
            self._src = (prefix_k, prefix_v)
        if tokens is not self._checked_tokens:  # one array per chunk: checked once, not at every Euler step
            check_grouped_tokens(tokens)
            self._checked_tokens = tokens
        self._t_int[0] = np.asarray(t_int).reshape(-1)[0]
        velocity, k, v = self.session.run(dict(zip(_DIT_INPUTS, (
            np.ascontiguousarray(x_t, np.float32), self._t_int, np.ascontiguousarray(tokens, np.int64),
            np.ascontiguousarray(positions, np.int64), self._kv[0], self._kv[1], self._prefix_len))))
        return velocity, k, v

    def reset(self) -> None:
        """Drops the references to the last prefix (frees its memory between utterances)."""
        self._src, self._checked_tokens = (None, None), None
        self._kv = (np.zeros(0, np.float32), np.zeros(0, np.float32))
        self._buffers.clear()


class OnnxVocoder:
    """``vocoder(mel [T, 80]) -> wav [T * hop]`` over the vocoder session (graph I/O: mel [1, 80, T] -> wav [1, 1, S])."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def __call__(self, mel: np.ndarray) -> np.ndarray:
        if mel.ndim != 2:
            raise ValueError(f"mel: expected [T, n_mels], got {list(mel.shape)}")
        (wav,) = self.session.run({_VOCODER_INPUT: np.ascontiguousarray(mel.T[None], np.float32)})
        return wav[0, 0]
