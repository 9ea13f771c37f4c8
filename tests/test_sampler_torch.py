"""The numpy sampler against the official torch code paths it ports (build extra): ``torch.topk`` on the CPU with
many ties, and the repetition penalty applied to float16 / float32 / float64 logit tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kimia_edge.runtime.sampler import SamplerParams, _apply_repetition_penalty
from kimia_edge.runtime.topk import torch_cpu_topk


def test_topk_matches_torch_on_vectors_full_of_ties(torch_one_thread) -> None:
    rng = np.random.default_rng(0)
    for _ in range(400):
        n = int(rng.choice([3, 10, 40, 200, 319, 320, 1000, 5000]))  # both sides of torch's k * 64 <= n switch
        k = int(rng.integers(1, min(n, 20) + 1))
        x = rng.integers(0, int(rng.integers(1, 5)), n).astype(np.float32)
        if rng.random() < 0.1:
            x[rng.integers(0, n)] = np.nan
        expected = torch.topk(torch.from_numpy(x), k).indices.numpy()
        assert torch_cpu_topk(x, k).tolist() == expected.tolist(), (n, k)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_penalty_matches_the_official_code_in_each_dtype(dtype) -> None:
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(4000) * 8).astype(dtype)
    recent = rng.integers(0, 4000, 300)
    params = SamplerParams(repetition_penalty=1.3, repetition_window=256)
    # kimia_infer/utils/sampler.py: gather the window's scores, scale in the tensor's dtype, scatter them back
    t = torch.from_numpy(logits.copy())[None]
    window = torch.from_numpy(recent[-params.repetition_window:])[None]
    scores = torch.gather(t, 1, window)
    scores = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
    t.scatter_(1, window, scores)
    ours = _apply_repetition_penalty(logits, recent, params)
    assert ours.dtype == logits.dtype
    assert np.array_equal(ours, t[0].numpy())
