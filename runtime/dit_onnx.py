"""The detokenizer's networks on ONNX Runtime sessions, as the callables runtime/detokenizer.py takes.

``OnnxDitStep`` is the hot path (29 Euler evaluations + 1 priming per chunk): it passes the caller's arrays
through without conversion when they already have the graph's dtype and layout, and pads an empty prefix with
the two masked slots the graph expects (export/graphs/dit_step.py)."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from kimia_edge.runtime.sessions import Session

MIN_PREFIX = 2  # must match export/graphs/dit_step.py: an empty prefix is MIN_PREFIX masked slots


def pad_prefix(prefix_k: np.ndarray, prefix_v: np.ndarray, depth: int, heads: int, head_dim: int
               ) -> Tuple[np.ndarray, np.ndarray, int]:
    """(k, v, valid length) as the graph takes them: an empty prefix becomes MIN_PREFIX zero slots, valid 0."""
    n = prefix_k.shape[3] if prefix_k.ndim == 5 else 0
    if n >= MIN_PREFIX:
        return np.ascontiguousarray(prefix_k, np.float32), np.ascontiguousarray(prefix_v, np.float32), n
    shape = (depth, 1, heads, MIN_PREFIX, head_dim)
    k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    if n:
        k[:, :, :, :n], v[:, :, :, :n] = prefix_k, prefix_v
    return k, v, n


class OnnxDitStep:
    """``dit_step(x_t, t_int, tokens, positions, prefix_k, prefix_v) -> (velocity, k, v)`` over a DiT-step session."""

    def __init__(self, session: Session, depth: int, heads: int, head_dim: int) -> None:
        self.session = session
        self.depth, self.heads, self.head_dim = depth, heads, head_dim

    def __call__(self, x_t: np.ndarray, t_int: np.ndarray, tokens: np.ndarray, positions: np.ndarray,
                 prefix_k: np.ndarray, prefix_v: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        k, v, n = pad_prefix(prefix_k, prefix_v, self.depth, self.heads, self.head_dim)
        velocity, ck, cv = self.session.run({
            "x_t": np.ascontiguousarray(x_t, np.float32),
            "t_int": np.asarray(t_int, np.int64).reshape(1),
            "tokens": np.ascontiguousarray(tokens, np.int64),
            "positions": np.ascontiguousarray(positions, np.int64),
            "prefix_k": k, "prefix_v": v,
            "prefix_len": np.array([n], np.int64),
        })
        return velocity, ck, cv


class OnnxVocoder:
    """``vocoder(mel [T, 80]) -> wav [T * hop]`` over the vocoder session (graph I/O: mel [1, 80, T] -> wav [1, 1, S])."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def __call__(self, mel: np.ndarray) -> np.ndarray:
        (wav,) = self.session.run({"mel": np.ascontiguousarray(mel.T[None], np.float32)})
        return wav[0, 0]
