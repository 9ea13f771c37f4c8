"""The sampler's float32 fast paths against its full-vocabulary reference steps (``sample_token(..., fast=False)``).

Greedy: the same id on every vector, near ties at the top included. Top-k: where the fast path is taken, the kept ids
are the reference's (as a set) and each id's renormalised probability is within PROB_ATOL of the reference's; where
the k-th place is (nearly) tied the fast path declines and the reference runs. Draws from one seed are then the same
id except within ~1e-6 of a CDF boundary (none in these draws)."""
from __future__ import annotations

import numpy as np
import pytest

from kimia_edge.runtime import sampler
from kimia_edge.runtime.sampler import SamplerParams, log_softmax, sample_token
from kimia_edge.runtime.topk import torch_cpu_topk

V = 168448  # the Kimi-Audio vocabulary
PROB_ATOL = 2e-6  # renormalised top-k probabilities, fast (float64 over k ids) vs reference (float32 over V)


def _vectors(rng: np.random.Generator, n: int):
    for i in range(n):
        x = (rng.standard_normal(V) * rng.uniform(0.5, 8)).astype(np.float32)
        top = int(np.argmax(x))
        if i % 4 == 1:  # an exact tie at the top
            x[rng.integers(V)] = x[top]
        elif i % 4 == 2:  # a value one float32 step below the top
            x[rng.integers(V)] = np.nextafter(x[top], np.float32(-np.inf))
        elif i % 4 == 3:  # a few values within 1e-6 of the top
            x[rng.integers(V, size=3)] = x[top] - np.float32(rng.uniform(0, 1e-6))
        yield x


def test_greedy_fast_path_gives_the_reference_id() -> None:
    rng = np.random.default_rng(0)
    params = SamplerParams(temperature=0.0)
    for x in _vectors(rng, 40):
        assert sample_token(x, params, rng) == sample_token(x, params, rng, fast=False) == int(np.argmax(log_softmax(x)))
    # logits all equal, -inf and NaN: the reference path decides
    specials = (np.zeros(V, np.float32), np.full(V, -np.inf, np.float32),
                np.r_[np.float32(np.nan), np.zeros(9, np.float32)])
    with np.errstate(invalid="ignore"):
        for x in specials:
            assert sample_token(x, params, rng) == sample_token(x, params, rng, fast=False)


@pytest.mark.parametrize("k, temperature", [(5, 1.0), (5, 0.7), (20, 1.3), (1, 0.5)])
def test_top_k_fast_path_keeps_the_reference_ids_and_probabilities(k: int, temperature: float) -> None:
    rng = np.random.default_rng(k)
    taken = 0
    for x in _vectors(rng, 12):
        found = sampler._top_k_fast(x, k, temperature)
        probs = np.exp(log_softmax(x) / np.float32(temperature))
        ref_top = torch_cpu_topk(probs, k)
        if found is None:  # declined: a (near) tie at the k-th place
            continue
        taken += 1
        top, p = found
        assert set(top.tolist()) == set(ref_top.tolist())
        ref = dict(zip(ref_top.tolist(), (probs[ref_top] / probs[ref_top].sum(dtype=np.float64)).tolist()))
        got = dict(zip(top.tolist(), (p / p.sum()).tolist()))
        assert max(abs(got[i] - ref[i]) for i in ref) <= PROB_ATOL
    assert taken >= 3  # at least the vectors without a planted near tie (every k) take the fast path


def test_top_k_draws_match_the_reference_per_seed() -> None:
    x = (np.random.default_rng(7).standard_normal(V) * 3).astype(np.float32)
    x[:6] = x.max() + np.float32([2.0, 1.7, 1.5, 1.2, 1.0, 0.3])  # a peaked head, like a trained model's logits
    params = SamplerParams(temperature=0.8, top_k=5)
    fast = [sample_token(x, params, g) for g in (np.random.default_rng(s) for s in range(400))]
    ref = [sample_token(x, params, g, fast=False) for g in (np.random.default_rng(s) for s in range(400))]
    assert fast == ref and set(fast) <= set(range(5))


def test_top_k_declines_a_tie_at_the_kth_place() -> None:
    x = np.log(np.array([1, 2, 2, 2, 2, 0.5, 2, 2], dtype=np.float32))
    assert sampler._top_k_fast(x, 3, 1.0) is None
    x = np.array([5.0, 4.0, 3.0, 3.0 - 1e-7, 0.0], dtype=np.float32)
    assert sampler._top_k_fast(x, 3, 1.0) is None
    assert sampler._top_k_fast(np.array([5.0, 4.0, 3.0, 2.0], np.float32), 3, 1.0) is not None
