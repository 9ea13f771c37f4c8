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

Fast paths (float32 and a partial sort instead of the float64 log-softmax over the whole vocabulary, ~2 ms per head
at V = 168448), taken only where they give the same ids as the steps above; otherwise those steps run as written:
- greedy: the argmax of the float32 log-probabilities is the first maximum logit unless another logit lies within
  a rounding step of it (the subtraction of the log-normaliser could then make them equal); only then is the
  full log-softmax computed. Same id always.
- top-k (k > 0): the k largest logits (one threshold pass, a sort of the few ids above it) and their probabilities
  ``exp((s - s_max) / T)`` in float64 over the k ids only; the normaliser cancels in the renormalisation. Taken when
  the k-th and (k+1)-th logits are apart by more than the rounding of the reference's float32 probabilities (else
  torch's tie order decides which ids are kept: the reference path). The kept ids are then the reference's; their
  probabilities agree to float32 rounding (relative ~1e-6), so the draw from one uniform is the same id except
  within ~1e-6 of a CDF boundary, and the order of exactly equal logits inside the k may differ from torch's
  (same distribution). ``k == 0`` (full distribution) keeps the reference path.
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


_LOG_V_SLACK = 1.0  # the log-normaliser is at most log(V) (every shifted logit <= 0): a bound on its magnitude
_CANDIDATE_WINDOWS = (2.0, 8.0, 32.0)  # logit distances below the maximum tried for the top-k candidates
_MAX_CANDIDATES = 4096


def _rounding_step(n: int) -> np.float32:
    """A safe bound on the logit distance that float32 rounding can merge in ``s - lse`` near the top: a few float32
    spacings of the largest log-normaliser, log(n) + 1 (greedy: the argmax of ``s - lse``)."""
    return np.float32(8) * np.spacing(np.float32(np.log(n) + _LOG_V_SLACK))


def _greedy(x: np.ndarray) -> int:
    """argmax(log_softmax(x)) without the log-softmax, unless a near tie at the top needs it (same id)."""
    i = int(np.argmax(x))
    m = x[i]
    if not np.isfinite(m):
        return int(np.argmax(log_softmax(x)))
    near = np.flatnonzero(x - m >= -_rounding_step(x.size))
    if near.size == 1:
        return i
    return int(near[np.argmax(log_softmax(x)[near])])


def _top_k_fast(x: np.ndarray, k: int, temperature: float) -> Optional[tuple]:
    """(ids, probabilities) of the k largest logits in descending order when they are the reference's ids, else
    None (a near tie at the k-th place, non-finite logits, probabilities that underflow)."""
    v = x.size
    if k >= v:
        return None
    m = x.max()
    if not np.isfinite(m):
        return None
    s = x - m  # float32, as the reference shifts
    cand = None
    for w in _CANDIDATE_WINDOWS:
        c = np.flatnonzero(s >= -w)
        if c.size > k:
            cand = c
            break
    if cand is None or cand.size > _MAX_CANDIDATES:
        cand = np.argpartition(s, v - k - 1)[v - k - 1:]
    order = cand[np.argsort(-s[cand], kind="stable")]
    top, sk, sk1 = order[:k], float(s[order[k - 1]]), float(s[order[k]])
    t = float(temperature)
    # the reference computes exp(fl32(fl32(s - lse) / T)) in float32: values closer than a few roundings of the
    # subtraction, the division and exp (relative ~5e-7 of the log-probability) may become equal there
    lse_max = float(np.log(v)) + _LOG_V_SLACK
    tol = 8 * float(np.spacing(np.float32(abs(sk) + lse_max))) + 2e-6 * t * (1 + (abs(sk) + lse_max) / t)
    if not sk - sk1 > tol or not np.isfinite(sk1) or (sk - lse_max) / t < -80:
        return None
    p = np.exp(s[top].astype(np.float64) / t)
    return top, p


def sample_token(logits: np.ndarray, params: SamplerParams, rng: np.random.Generator,
                 recent: Optional[np.ndarray] = None, *, fast: bool = True) -> int:
    """Samples one id from ``logits`` [V] (any float dtype); ``recent`` = this stream's previous ids ([i], or None at
    the first step). Does not modify ``logits``. fast=False: always the full-vocabulary reference steps."""
    logits = np.asarray(logits)
    if logits.ndim != 1:
        raise ValueError(f"logits: expected [V], got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating) and logits.dtype.kind != "V":  # "V": e.g. ml_dtypes' bfloat16
        logits = logits.astype(np.float32)
    logits = _apply_repetition_penalty(logits, recent, params)
    if not fast:
        return _sample_reference(logits, params, rng)
    x = np.asarray(logits, dtype=np.float32)
    if params.temperature <= GREEDY_TEMPERATURE:
        return _greedy(x)
    if 0 < params.top_k <= x.shape[0]:
        found = _top_k_fast(x, params.top_k, params.temperature)
        if found is not None:
            top, p = found
            return int(top[_draw(p, rng)])
    return _sample_reference(logits, params, rng)


def _sample_reference(logits: np.ndarray, params: SamplerParams, rng: np.random.Generator) -> int:
    """Steps 2-3 as written (full-vocabulary log-softmax), on the penalised logits."""
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
