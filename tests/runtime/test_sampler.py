"""The sampler's corner cases, torch-free: the repetition penalty in the logits' own dtype and the ids top-k keeps
when several probabilities tie at the k-th place (the expected ids are what torch 2.13's ``torch.topk`` returned on
the CPU for these inputs; tests/test_sampler_torch.py checks the rule against torch itself)."""
from __future__ import annotations

import numpy as np
import pytest

from kimia_edge.runtime.sampler import SamplerParams, sample_token
from kimia_edge.runtime.topk import torch_cpu_topk


@pytest.mark.parametrize("values, k, expected", [
    (np.zeros(1000), 5, [3, 4, 1, 0, 2]),                      # k * 64 <= V: std::partial_sort
    (np.zeros(200), 5, [135, 132, 133, 134, 131]),              # k * 64 > V: std::nth_element + std::sort
    (np.zeros(10), 3, [8, 6, 7]),
    (np.array([1, 2, 2, 2, 2, 0.5, 2, 2]), 3, [4, 7, 6]),
    (np.r_[np.zeros(3), 1.0, np.zeros(996)], 3, [3, 1, 0]),
])
def test_top_k_ties_are_kept_as_torch_topk_keeps_them(values: np.ndarray, k: int, expected: list) -> None:
    assert torch_cpu_topk(values.astype(np.float32), k).tolist() == expected


def test_sampling_draws_only_from_the_ids_torch_keeps() -> None:
    logits = np.log(np.array([1, 2, 2, 2, 2, 0.5, 2, 2], dtype=np.float32))
    params = SamplerParams(temperature=1.0, top_k=3)
    g = np.random.default_rng(0)
    assert {sample_token(logits, params, g) for _ in range(200)} == {4, 6, 7}  # lowest-id ties would give 1, 2, 3


def test_distinct_values_are_in_descending_order() -> None:
    x = np.random.default_rng(3).random(5000).astype(np.float32)
    assert torch_cpu_topk(x, 7).tolist() == np.argsort(-x)[:7].tolist()
    with pytest.raises(ValueError):
        torch_cpu_topk(x, 0)


def test_penalty_is_applied_in_the_logits_dtype() -> None:
    # float16 2.0 / 1.3 = 1.538... rounds to the float16 1.5380859 (computed in float32, rounded back to float16,
    # as torch does for a Half tensor): a tie with id 0, which greedy argmax picks; penalised in float32 instead,
    # id 1 would stay ahead.
    logits = np.array([1.5380859, 2.0, -1.0], dtype=np.float16)
    params = SamplerParams(temperature=0.0, repetition_penalty=1.3, repetition_window=1)
    assert sample_token(logits, params, np.random.default_rng(0), recent=np.array([2, 1])) == 0
    assert sample_token(logits.astype(np.float32), params, np.random.default_rng(0), recent=np.array([2, 1])) == 1
    assert logits.dtype == np.float16 and logits[1] == 2.0  # the caller's logits are not modified
