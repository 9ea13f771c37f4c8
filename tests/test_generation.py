"""Sampler semantics (reference §2.7) and the generation loop (§2.6) driven by the PyTorch reference backend."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kimia_edge.export.reference.loaders import load_llm
from kimia_edge.export.reference.llm_backend import TorchLLMBackend
from kimia_edge.export.snapshot.llm import write_llm
from kimia_edge.runtime.generation import (AUDIO_DELAY_TOKENS, GenerationConfig, IncrementalTextDecoder, generate,
                                           generate_steps)
from kimia_edge.runtime.llm_backend import LLMBackend
from kimia_edge.runtime.prompt import AudioEncoding, Message, build_prompt
from kimia_edge.runtime.sampler import SamplerParams, sample_token
from kimia_edge.runtime.special_tokens import SpecialTokens

T = SpecialTokens()
GREEDY = SamplerParams(0.0, 5, 1.0, 16)


def rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------ sampler
def test_greedy_takes_first_maximum():
    assert sample_token(np.array([1.0, 3.0, 3.0, -2.0]), GREEDY, rng()) == 1


def test_repetition_window_is_strictly_greater():
    logits = np.array([2.0, 1.5, 0.0, -5.0], dtype=np.float32)
    p = SamplerParams(0.0, 5, 2.0, 1)
    assert sample_token(logits, p, rng(), recent=np.array([0])) == 0          # len 1 == window: no penalty
    assert sample_token(logits, p, rng(), recent=np.array([3, 0])) == 1       # len 2 > 1: id 0 -> 2.0/2
    assert sample_token(logits, p, rng(), recent=np.array([0, 3])) == 0       # only the last `window` ids
    assert sample_token(logits, SamplerParams(0.0, 5, 2.0, 0), rng(), recent=np.array([0])) == 1  # window 0 = all
    # negative scores are multiplied, positive divided; duplicates penalised once
    neg = np.array([-1.0, -1.5], dtype=np.float32)
    assert sample_token(neg, SamplerParams(0.0, 5, 2.0, 2), rng(), recent=np.array([1, 0, 0])) == 1
    # window [0, 0]: 4.0 / 1.5 = 2.67 > 2.5 (penalised once, not twice)
    assert sample_token(np.array([4.0, 2.5]), SamplerParams(0.0, 5, 1.5, 2), rng(), recent=np.array([1, 0, 0])) == 0
    assert logits[0] == 2.0  # caller's logits untouched
    assert sample_token(logits, SamplerParams(0.0, 5, 1.0, 1), rng(), recent=np.array([3, 0])) == 0  # penalty 1: off


def _freq(logits, params, n=20000, seed=1):
    g = rng(seed)
    draws = np.array([sample_token(logits, params, g) for _ in range(n)])
    return np.bincount(draws, minlength=len(logits)) / n


def test_top_k_renormalises_over_the_k_best():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    f = _freq(logits, SamplerParams(1.0, 2, 1.0, 16))
    assert f[2] == 0
    np.testing.assert_allclose(f[:2], [0.625, 0.375], atol=0.015)


def test_temperature_without_top_k_samples_full_distribution():
    logits = np.array([1.0, 0.0, -1.0], dtype=np.float32)
    f = _freq(logits, SamplerParams(2.0, 0, 1.0, 16))
    expect = np.exp(logits / 2) / np.exp(logits / 2).sum()
    np.testing.assert_allclose(f, expect, atol=0.015)
    assert sample_token(logits, SamplerParams(1e-7, 0, 1.0, 16), rng()) == 0  # below 1e-6: greedy


def test_sampler_is_deterministic_by_seed_and_validates():
    logits = np.random.default_rng(9).standard_normal(1000).astype(np.float32)
    p = SamplerParams(1.0, 50, 1.0, 16)
    a = [sample_token(logits, p, g) for g in [rng(4)] for _ in range(20)]
    g = rng(4)
    assert a == [sample_token(logits, p, g) for _ in range(20)]
    with pytest.raises(ValueError, match="top_k"):
        sample_token(logits[:3], p, rng())


def test_incremental_text_decoder_holds_split_characters():
    data = "aü€".encode()
    dec = IncrementalTextDecoder(lambda ids: bytes(ids))
    pieces = [dec.push(b) for b in data]
    assert "".join(pieces) + dec.flush() == "aü€" and pieces[1] == "" and pieces[2] == "ü"


# ------------------------------------------------------------------------------------------------ loop
@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llm_gen")
    write_llm(folder, "tiny", seed=11)
    return folder


def _model(snap, force_text=None, force_audio=None):
    """fp32 reference; optionally edits the weights so that a head always picks one id (a large positive residual
    component 0 from the embeddings, read by a large weight in that id's head row)."""
    model = load_llm(snap, dtype=torch.float32)
    with torch.no_grad():
        if force_text is not None or force_audio is not None:
            model.model.embed_tokens.weight[:, 0] += 1000.0
        if force_text is not None:
            model.lm_head.weight[force_text, 0] = 1000.0
        if force_audio is not None:
            model.mimo_output.weight[force_audio, 0] = 1000.0
    return model


def _prompt(cfg, output_type):
    sem = np.arange(20, 28)
    feats = np.random.default_rng(0).standard_normal((8, cfg.kimia_adaptor_input_dim)).astype(np.float32)
    return build_prompt([Message("user", "text", "hi"), Message("user", "audio", "x")], output_type, T,
                        cfg.kimia_token_offset, lambda s: [ord(c) for c in s], lambda c: AudioEncoding(sem, feats))


def test_backend_satisfies_protocol(snap):
    assert isinstance(TorchLLMBackend(_model(snap)), LLMBackend)


def test_text_mode_stops_on_text_eos(snap):
    model = _model(snap, force_text=T.text_eos)
    res = generate(TorchLLMBackend(model), _prompt(model.config, "text"), T, model.config.kimia_token_offset,
                   GenerationConfig(output_type="text"))
    assert (res.steps, res.stop, res.text_ids, res.audio_tokens.size) == (1, "text_eos", [], 0)


def test_both_mode_delay_blank_fill_and_audio_stop(snap):
    model = _model(snap, force_text=T.text_eos, force_audio=T.msg_end)
    steps = list(generate_steps(TorchLLMBackend(model), _prompt(model.config, "both"), T,
                                model.config.kimia_token_offset, GenerationConfig(output_type="both")))
    assert len(steps) == AUDIO_DELAY_TOKENS + 1 and steps[-1].stop == "audio_eos"
    assert [s.text_id for s in steps] == [T.text_eos] + [T.text_blank] * AUDIO_DELAY_TOKENS
    assert [s.audio_id for s in steps] == [T.text_blank] * AUDIO_DELAY_TOKENS + [T.msg_end]
    assert all(s.text_token is None and s.audio_token is None for s in steps)


def test_loop_feeds_both_tokens_back_consistently(snap):
    """Greedy picks of the loop equal the argmax of one full forward over prompt + fed-back ids."""
    model = _model(snap)
    cfg = model.config
    prompt = _prompt(cfg, "both")
    n = 9
    gcfg = GenerationConfig(output_type="both", max_total_tokens_both=len(prompt) + n)
    steps = list(generate_steps(TorchLLMBackend(model), prompt, T, cfg.kimia_token_offset, gcfg))
    assert len(steps) == n and steps[-1].stop in ("max_tokens", "audio_eos")
    assert all(s.audio_id == T.text_blank for s in steps[:AUDIO_DELAY_TOKENS])
    fed_a = np.concatenate([prompt.audio_ids, [s.audio_id for s in steps[:-1]]])
    fed_t = np.concatenate([prompt.text_ids, [s.text_id for s in steps[:-1]]])
    mask = np.concatenate([prompt.continuous_mask, np.zeros(len(steps) - 1, bool)])
    out = model(torch.from_numpy(fed_a)[None], torch.from_numpy(fed_t)[None],
                features=torch.from_numpy(prompt.stacked_features()), continuous_mask=torch.from_numpy(mask)[None])
    L = len(prompt)
    text_done = False
    for i, s in enumerate(steps):
        t_pick = int(out.text_logits[0, L - 1 + i].argmax())
        a_pick = int(out.audio_logits[0, L - 1 + i].argmax())
        if not text_done:
            assert s.text_id == t_pick
            text_done = t_pick == T.text_eos
        if i >= AUDIO_DELAY_TOKENS:
            assert s.audio_id == a_pick
            assert s.audio_token == (a_pick - cfg.kimia_token_offset if a_pick >= cfg.kimia_token_offset else None)
    res = generate(TorchLLMBackend(model), prompt, T, cfg.kimia_token_offset, gcfg)
    assert res.audio_tokens.tolist() == [s.audio_token for s in steps if s.audio_token is not None]


def test_text_budget_and_seeded_sampling(snap):
    model = _model(snap)
    cfg = model.config
    prompt = _prompt(cfg, "text")
    sampled = SamplerParams(1.0, 10, 1.1, 2)
    gcfg = GenerationConfig(output_type="text", text=sampled, audio=sampled, max_new_tokens=6, seed=5)
    backend = TorchLLMBackend(model)
    a = list(generate_steps(backend, prompt, T, cfg.kimia_token_offset, gcfg))
    b = list(generate_steps(backend, prompt, T, cfg.kimia_token_offset, gcfg))
    c = list(generate_steps(backend, prompt, T, cfg.kimia_token_offset,
                            GenerationConfig(output_type="text", text=sampled, audio=sampled, max_new_tokens=6, seed=6)))
    assert a == b and a != c
    assert len(a) == 6 or a[-1].stop == "text_eos"
    assert all(s.audio_id == T.text_blank for s in a)  # text mode: audio stream always blank
    assert list(generate_steps(backend, prompt, T, cfg.kimia_token_offset,
                               GenerationConfig(output_type="text", max_new_tokens=0))) == []


def test_runtime_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import kimia_edge.runtime.generation, kimia_edge.runtime.prompt, kimia_edge.runtime.sampler, "
            "kimia_edge.runtime.text_tokenizer, kimia_edge.runtime.llm_config, kimia_edge.runtime.special_tokens, "
            "kimia_edge.runtime.llm_backend; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_step_limit_caps_both_official_budgets() -> None:
    from kimia_edge.runtime.generation import GenerationConfig

    assert GenerationConfig(output_type="both").max_steps(100) == 1400
    assert GenerationConfig(output_type="both", step_limit=30).max_steps(100) == 30
    assert GenerationConfig(output_type="text", step_limit=30).max_steps(100) == 30
    assert GenerationConfig(output_type="text", max_new_tokens=10, step_limit=30).max_steps(100) == 10
    with pytest.raises(ValueError, match="step_limit"):
        GenerationConfig(step_limit=-1).validate()


def test_savings_keep_the_seeded_random_stream(snap):
    """Skipping forced streams consumes the sampler's draw, so sampled runs are identical with and without the
    savings (text mode: audio forced every step; both mode: audio forced during the delay)."""
    model = _model(snap)
    cfg = model.config
    sampled = SamplerParams(1.0, 10, 1.0, 16)
    backend = TorchLLMBackend(model)
    for output_type in ("text", "both"):
        prompt = _prompt(cfg, output_type)
        runs = [list(generate_steps(backend, prompt, T, cfg.kimia_token_offset,
                                    GenerationConfig(output_type=output_type, text=sampled, audio=sampled, seed=3,
                                                     step_limit=AUDIO_DELAY_TOKENS + 4, skip_unused_heads=skip)))
                for skip in (False, True)]
        assert runs[0] == runs[1], output_type
        assert len(runs[0]) == AUDIO_DELAY_TOKENS + 4 or runs[0][-1].stop is not None
