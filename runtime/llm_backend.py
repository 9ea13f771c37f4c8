"""The interface between the generation loop and an LLM implementation (llama.cpp at run time, the PyTorch
reference in parity tests). The backend owns the input-embedding rule (audio + text embeddings, continuous
features through the adaptor, x sqrt(2) at continuous positions, text embedding skipped when the text ids sum to 0)
and its KV cache / position counter.

Exact savings (issue [C] item 6): ``step`` takes ``need_text`` / ``need_audio``. A head that is not needed may be
skipped by the backend, which then returns None in its place; a backend may also compute it anyway (the PyTorch
reference does). Skipping never changes the KV caches the next steps see: a skipped text head still runs the whole
trunk (its layers feed the audio branch and the next positions); a skipped audio head may defer the audio branch's
layers until audio logits are next asked for (llama.cpp backend: the captured layer-``fork`` states wait and are
decoded in one batch then), so a text-only turn never runs the audio branch at all.

Backends written before the flags (a two-argument ``step``) still satisfy the loop: :func:`step_heads` calls
them without the flags and passes their logits through.
"""
from __future__ import annotations

import inspect
from typing import Optional, Protocol, Tuple, runtime_checkable

import numpy as np

__all__ = ["LLMBackend", "Logits", "StepLogits", "accepts_head_flags", "step_heads"]

Logits = Tuple[np.ndarray, np.ndarray]
"""(text_logits [V] float32, audio_logits [V] float32) for the last position; V = config vocab_size."""

StepLogits = Tuple[Optional[np.ndarray], Optional[np.ndarray]]
"""Like :data:`Logits`, with None for a head the backend skipped."""


@runtime_checkable
class LLMBackend(Protocol):
    """Dual-head LLM with a KV cache. Positions are counted by the backend: prefill uses 0..L-1, each step the next.

    Optional extensions (not part of the runtime check, detected by the callers): ``step`` and ``prefill``
    keyword flags ``need_text`` / ``need_audio`` (see the module docstring) and ``append(audio_ids, text_ids, features,
    continuous_mask) -> Logits`` (multi-turn: run more prompt positions after the cached ones, no reset)."""

    def reset(self) -> None:
        """Forgets the KV cache and the position counter."""

    def prefill(self, audio_ids: np.ndarray, text_ids: np.ndarray, features: Optional[np.ndarray],
                continuous_mask: np.ndarray) -> Logits:
        """Runs the prompt. audio_ids / text_ids: [L] int64; continuous_mask: [L] bool; features: [n, D] float32
        with n = continuous_mask.sum() (row r -> r-th masked position), or None. Returns last-position logits."""

    def step(self, audio_id: int, text_id: int) -> Logits:
        """Feeds one (audio, text) pair at the next position; returns its logits. Backends with the savings accept
        ``need_text=True, need_audio=True`` keywords and return None for a head they skipped."""


def accepts_head_flags(backend: object) -> bool:
    """True if ``backend.step`` and ``backend.prefill`` both take the ``need_text`` / ``need_audio`` keywords."""
    for method in ("step", "prefill"):
        try:
            params = inspect.signature(getattr(backend, method)).parameters
        except (AttributeError, TypeError, ValueError):
            return False
        if "need_text" not in params or "need_audio" not in params:
            return False
    return True


def step_heads(backend: LLMBackend, audio_id: int, text_id: int, need_text: bool, need_audio: bool,
               flags: Optional[bool] = None) -> StepLogits:
    """One step asking only for the needed heads; ``flags``: the cached :func:`accepts_head_flags` (None = look).
    A backend without the flags computes both; the result is then passed through unchanged."""
    if flags is None:
        flags = accepts_head_flags(backend)
    if flags:
        return backend.step(audio_id, text_id, need_text=need_text, need_audio=need_audio)  # type: ignore[call-arg]
    return backend.step(audio_id, text_id)
