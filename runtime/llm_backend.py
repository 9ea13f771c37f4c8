"""The interface between the generation loop and an LLM implementation (llama.cpp at run time, the PyTorch
reference in parity tests). The backend owns the input-embedding rule (audio + text embeddings, continuous
features through the adaptor, x sqrt(2) at continuous positions, text embedding skipped when the text ids sum to 0)
and its KV cache / position counter."""
from __future__ import annotations

from typing import Optional, Protocol, Tuple, runtime_checkable

import numpy as np

__all__ = ["LLMBackend", "Logits"]

Logits = Tuple[np.ndarray, np.ndarray]
"""(text_logits [V] float32, audio_logits [V] float32) for the last position; V = config vocab_size."""


@runtime_checkable
class LLMBackend(Protocol):
    """Dual-head LLM with a KV cache. Positions are counted by the backend: prefill uses 0..L-1, each step the next."""

    def reset(self) -> None:
        """Forgets the KV cache and the position counter."""

    def prefill(self, audio_ids: np.ndarray, text_ids: np.ndarray, features: Optional[np.ndarray],
                continuous_mask: np.ndarray) -> Logits:
        """Runs the prompt. audio_ids / text_ids: [L] int64; continuous_mask: [L] bool; features: [n, D] float32
        with n = continuous_mask.sum() (row r -> r-th masked position), or None. Returns last-position logits."""

    def step(self, audio_id: int, text_id: int) -> Logits:
        """Feeds one (audio, text) pair at the next position; returns its logits."""
