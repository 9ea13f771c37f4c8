"""Token sampler for one stream (text or audio), numpy port of the official ``KimiASampler`` (reference §2.7).

Order of operations, per step:
1. repetition penalty, only if ``repetition_penalty > 1`` and ``len(recent) > repetition_window`` (strictly greater):
   the last ``window`` recent ids get ``s * p`` if ``s < 0`` else ``s / p`` (each distinct id once; ``recent``
   includes forced blanks). NB: window 0 selects ``recent[-0:]`` = all of ``recent``, as the official slicing does.
   The penalty is applied in the logits' own dtype, as torch does on the official tensors: float32 and float64
   logits are scaled in their dtype; narrower floats (float16, bfloat16) are computed in float32 and rounded back
   to their dtype (torch's CPU "opmath" for them), so a float16 logit penalised here equals torch's bit for bit.
2. ``logprobs = log_softmax(float32 logits)`` (``dtype=torch.float``: the penalised logits are cast afterwards).
3. ``temperature > 1e-6``: ``logprobs / T``; top-k (``k > 0``): the k most probable ids, sampled with
   probabilities ``exp(logprobs/T)`` renormalised over the k (torch.multinomial renormalises); ``k == 0``: sample the
   full distribution. Otherwise greedy ``argmax`` (first maximum). The k ids, ties at the k-th place included,
   and their order are those of ``torch.topk`` on the CPU (``runtime/topk.py``): which of several equal
   probabilities is kept is not "lowest id first".

Random draws come from a caller-owned ``numpy.random.Generator`` (one uniform per sampled token), so runs are
reproducible by seed. They cannot reproduce torch's multinomial stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .topk import torch_cpu_topk

__all__ = ["SamplerParams", "sample_token", "GREEDY_TEMPERATURE", "log_softmax"]

# kimia_infer/utils/sampler.py: temperatures at or below this are greedy.
GREEDY_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class SamplerParams:
    """Per-stream sampling settings (official ``generate()`` defaults: greedy, k 5, no penalty)."""

    temperature: float = 0.0
    top_k: int = 5
    repetition_penalty: float = 1.0
    repetition_window: int = 16

    def validate(self) -> None:
        """Raises ValueError naming the bad field."""
        if not self.temperature >= 0:
            raise ValueError(f"SamplerParams.temperature={self.temperature}: expected >= 0")
        if self.top_k < 0:
            raise ValueError(f"SamplerParams.top_k={self.top_k}: expected >= 0 (0 = no top-k)")
        if not self.repetition_penalty > 0:
            raise ValueError(f"SamplerParams.repetition_penalty={self.repetition_penalty}: expected > 0")
        if self.repetition_window < 0:
            raise ValueError(f"SamplerParams.repetition_window={self.repetition_window}: expected >= 0")


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float32 log-softmax of a [V] vector (max-shifted; the normaliser is summed in float64)."""
    x = np.asarray(x, dtype=np.float32)
    shifted = x - x.max()
    lse = np.log(np.exp(shifted.astype(np.float64)).sum())
    return (shifted - np.float32(lse)).astype(np.float32)


def _apply_repetition_penalty(logits: np.ndarray, recent: Optional[np.ndarray], params: SamplerParams) -> np.ndarray:
    if params.repetition_penalty <= 1.0 or recent is None or len(recent) <= params.repetition_window:
        return logits
    window = np.asarray(recent, dtype=np.int64)[-params.repetition_window:]
    out = logits.copy()
    scores = logits[window]
    # torch: a float tensor times a Python float stays in the tensor's dtype; float16/bfloat16 compute in float32
    compute = np.float32 if logits.dtype.itemsize < 4 else logits.dtype.type
    s = scores.astype(compute)
    p = compute(params.repetition_penalty)
    out[window] = np.where(s < 0, s * p, s / p).astype(logits.dtype)
    return out


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn with probability proportional to ``probs`` (inverse CDF, one uniform)."""
    cdf = np.cumsum(probs, dtype=np.float64)
    total = cdf[-1]
    if not total > 0:
        raise ValueError("cannot sample: all probabilities are zero")
    u = rng.random() * total
    idx = int(np.searchsorted(cdf, u, side="right"))
    nonzero = np.flatnonzero(probs > 0)
    return min(idx, int(nonzero[-1]))


def sample_token(logits: np.ndarray, params: SamplerParams, rng: np.random.Generator,
                 recent: Optional[np.ndarray] = None) -> int:
    """Samples one id from ``logits`` [V] (any float dtype); ``recent`` = this stream's previous ids ([i], or None at
    the first step). Does not modify ``logits``."""
    logits = np.asarray(logits)
    if logits.ndim != 1:
        raise ValueError(f"logits: expected [V], got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating) and logits.dtype.kind != "V":  # "V": e.g. ml_dtypes' bfloat16
        logits = logits.astype(np.float32)
    logits = _apply_repetition_penalty(logits, recent, params)
    logprobs = log_softmax(logits)
    if params.temperature > GREEDY_TEMPERATURE:
        logprobs = logprobs / np.float32(params.temperature)
        probs = np.exp(logprobs)
        if params.top_k > 0:
            if params.top_k > probs.shape[0]:
                raise ValueError(f"top_k={params.top_k} exceeds the vocabulary size {probs.shape[0]}")
            top = torch_cpu_topk(probs, params.top_k)  # ties at the k-th place as torch.topk keeps them
            return int(top[_draw(probs[top], rng)])
        return _draw(probs, rng)
    return int(np.argmax(logprobs))
