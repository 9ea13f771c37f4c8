"""PyTorch LLM reference on a tiny snapshot written by our writer: strict load, KV cache, fork, embedding rules, RoPE."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from kimia_edge.export.checkpoint import CheckpointError, load_strict
from kimia_edge.export.reference.llm import (IGNORED_CHECKPOINT_KEYS, MoonshotKimia, continuous_feature_scale,
                                             rope_cos_sin)
from kimia_edge.export.reference.loaders import load_llm
from kimia_edge.export.snapshot.llm import read_llm, write_llm
from kimia_edge.export.snapshot.weights import INDEX_FILE
from kimia_edge.runtime.llm_config import KimiaConfig
from kimia_edge.runtime.special_tokens import SpecialTokens
from kimia_edge.runtime.text_tokenizer import TextTokenizer

T = SpecialTokens()


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llm")
    write_llm(folder, "tiny", seed=3)
    return folder


@pytest.fixture(scope="module")
def model32(snap):
    torch.manual_seed(0)
    return load_llm(snap, dtype=torch.float32)


def _prompt(cfg: KimiaConfig, n_sem: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sem = torch.randint(cfg.kimia_token_offset, cfg.vocab_size, (n_sem,), generator=g)
    a = torch.tensor([T.kimia_user_msg_start, T.text_blank, T.text_blank, T.media_begin, *sem.tolist(), T.media_end,
                      T.speech_ctd, T.msg_end, T.kimia_assistant_msg_start])[None]
    x = torch.full_like(a, T.text_blank)
    x[0, 1:3] = torch.tensor([65, 300])
    mask = (a >= cfg.kimia_token_offset)
    feats = torch.randn(n_sem, cfg.kimia_adaptor_input_dim, generator=g)
    return a, x, mask, feats


def test_strict_load_and_written_layout(snap):
    cfg, sd = read_llm(snap)
    index = json.loads((snap / INDEX_FILE).read_text())["weight_map"]
    inv = [k for k in index if k.endswith("rotary_emb.inv_freq")]
    assert len(inv) == cfg.num_kv_cache_layers  # one per layer, like the official index
    heads_shard = {index[k] for k in ("model.embed_tokens.weight", "lm_head.weight", "mimo_output.weight",
                                      "model.norm.weight", "model.mimo_norm.weight")}
    assert len(heads_shard) == 1 and not any(v in heads_shard for k, v in index.items() if ".layers." in k)
    assert len(index) == 13 * cfg.num_kv_cache_layers + 6 + 5
    assert sd["lm_head.weight"].dtype == torch.bfloat16 and sd.shape("lm_head.weight") == (cfg.vocab_size, 16)
    assert cfg.rope_theta == 1e6 and cfg.vocab_size == 152064 + 512


def test_missing_and_unknown_keys_are_named(snap):
    cfg, sd = read_llm(snap)
    model = MoonshotKimia(cfg)
    state = dict(sd)
    del state["model.layers.2.mlp.up_proj.weight"]
    state["model.layers.2.mlp.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.2\.mlp\.up_proj\.weight") as e:
        load_strict(model, state, source="tiny", ignore=IGNORED_CHECKPOINT_KEYS)
    assert "unexpected keys: model.layers.2.mlp.extra.weight" in str(e.value)
    # without the explicit ignore, the stored inv_freq would be an unexpected key
    with pytest.raises(CheckpointError, match="rotary_emb.inv_freq"):
        load_strict(model, dict(sd), source="tiny")


def test_reader_rejects_index_shard_mismatch(snap, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(snap, bad)
    idx = json.loads((bad / INDEX_FILE).read_text())
    del idx["weight_map"]["model.norm.weight"]
    (bad / INDEX_FILE).write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="model.norm.weight"):
        read_llm(bad)


def test_kv_cached_steps_equal_full_forward(model32):
    cfg = model32.config
    a, x, mask, feats = _prompt(cfg)
    steps_a = torch.tensor([[152100, 151666, 152333, 152064]])
    steps_x = torch.tensor([[40, 7, 151667, 151666]])
    full_a, full_x = torch.cat([a, steps_a], 1), torch.cat([x, steps_x], 1)
    full = model32(full_a, full_x, features=feats, continuous_mask=torch.cat([mask, torch.zeros_like(steps_a, dtype=bool)], 1))
    cache = model32.new_cache()
    out = model32(a, x, features=feats, continuous_mask=mask, cache=cache, last_only=True)
    L = a.shape[1]
    got_t, got_a = [out.text_logits[0, -1]], [out.audio_logits[0, -1]]
    for k in range(steps_a.shape[1] - 1):
        o = model32(steps_a[:, k:k + 1], steps_x[:, k:k + 1], cache=cache)
        got_t.append(o.text_logits[0, -1])
        got_a.append(o.audio_logits[0, -1])
    assert cache.length == L + steps_a.shape[1] - 1
    for k, idx in enumerate(range(L - 1, L + steps_a.shape[1] - 1)):
        torch.testing.assert_close(got_t[k], full.text_logits[0, idx], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_a[k], full.audio_logits[0, idx], atol=1e-4, rtol=1e-4)


def test_text_id_zero_skips_text_embedding(model32):
    m = model32.model
    a = torch.tensor([[152100]])
    e0 = m.embed_inputs(a, torch.tensor([[0]]), None, None)
    torch.testing.assert_close(e0, m.embed_tokens(a), atol=0, rtol=0)
    e1 = m.embed_inputs(a, torch.tensor([[1]]), None, None)
    torch.testing.assert_close(e1, m.embed_tokens(a) + m.embed_tokens(torch.tensor([[1]])), atol=0, rtol=0)


def test_sqrt2_rule_at_continuous_positions(snap, model32):
    assert continuous_feature_scale(torch.bfloat16).item() == 1.4140625
    assert continuous_feature_scale(torch.float32).item() == np.float32(math.sqrt(2.0))
    cfg = model32.config
    a, x, mask, feats = _prompt(cfg)
    m = model32.model
    emb = m.embed_inputs(a, x, feats, mask)
    audio = m.embed_tokens(a)
    expect = audio.clone()
    expect[mask] = (audio[mask] + m.vq_adaptor(feats)) * math.sqrt(2.0)
    torch.testing.assert_close(emb, expect + m.embed_tokens(x), atol=1e-5, rtol=1e-5)
    # bf16 model uses the bf16-rounded constant
    m16 = load_llm(snap)
    e16 = m16.model.embed_inputs(a, x, feats, mask)
    au16 = m16.model.embed_tokens(a)
    exp16 = au16.clone()
    exp16[mask] = (au16[mask] + m16.model.vq_adaptor(feats.bfloat16())) * torch.tensor(1.4140625, dtype=torch.bfloat16)
    torch.testing.assert_close(e16, exp16 + m16.model.embed_tokens(x), atol=0, rtol=0)


def test_fork_audio_depends_on_shared_layers_and_mimo_only(snap):
    cfg, _ = read_llm(snap)
    a, x, mask, feats = _prompt(cfg)
    fork = cfg.kimia_mimo_transformer_from_layer_index

    def run(edit=None):
        model = load_llm(snap, dtype=torch.float32)
        if edit is not None:
            with torch.no_grad():
                w = model.get_parameter(edit)
                w.add_(0.5 * torch.ones_like(w))
        return model(a, x, features=feats, continuous_mask=mask)

    base = run()
    after_fork = run(f"model.layers.{fork + 1}.mlp.down_proj.weight")
    assert torch.equal(after_fork.audio_logits, base.audio_logits)
    assert not torch.allclose(after_fork.text_logits, base.text_logits)
    mimo = run("model.mimo_layers.0.mlp.down_proj.weight")
    assert torch.equal(mimo.text_logits, base.text_logits)
    assert not torch.allclose(mimo.audio_logits, base.audio_logits)
    shared = run(f"model.layers.{fork}.mlp.down_proj.weight")
    assert not torch.allclose(shared.text_logits, base.text_logits)
    assert not torch.allclose(shared.audio_logits, base.audio_logits)


def test_rope_relative_position_property(model32):
    d, theta = model32.config.head_dim, model32.config.rope_theta
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)

    def rot(v, p):
        cos, sin = rope_cos_sin(torch.tensor([p]), d, theta, torch.float32)
        half = d // 2
        return v * cos[0] + torch.cat((-v[half:], v[:half])) * sin[0]

    s1 = rot(q, 7) @ rot(k, 3)
    s2 = rot(q, 1007) @ rot(k, 1003)
    assert abs(s1 - s2) < 1e-4 and abs(s1 - q @ k) > 1e-3
    # whole model: shifting every position by a constant leaves the logits unchanged
    a, x, mask, feats = _prompt(model32.config)
    p = torch.arange(a.shape[1])
    o1 = model32(a, x, features=feats, continuous_mask=mask, positions=p)
    o2 = model32(a, x, features=feats, continuous_mask=mask, positions=p + 500)
    torch.testing.assert_close(o1.text_logits, o2.text_logits, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(o1.audio_logits, o2.audio_logits, atol=2e-3, rtol=1e-3)


def test_snapshot_tokenizer_round_trip(snap):
    tok = TextTokenizer.from_snapshot(snap)
    text = "Please transcribe 12.5 words, ü <|im_msg_end|>!"
    ids = tok.encode(text)
    assert max(ids) < tok.num_base_tokens and len(ids) < len(text.encode())  # merges apply; specials stay text
    assert tok.decode(ids) == text
    assert tok.decode([T.text_eos]) == "<|im_kimia_text_eos|>"
    assert SpecialTokens.from_snapshot(snap) == T
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([100000])


@pytest.mark.slow
def test_small_snapshot_loads(tmp_path):
    write_llm(tmp_path, "small", seed=0)
    model = load_llm(tmp_path)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.kimia_mimo_layers, cfg.kimia_mimo_transformer_from_layer_index) == (512, 28, 6, 21)
    a, x, mask, feats = _prompt(cfg)
    out = model(a, x, features=feats, continuous_mask=mask, last_only=True)
    assert torch.isfinite(out.text_logits.float()).all() and torch.isfinite(out.audio_logits.float()).all()


def test_full_size_layout_matches_official_index_totals():
    """Without writing: the full-size tensor list has the official 453 index entries and total_size (reference §2.4)."""
    from kimia_edge.export.snapshot.llm import _SIZES, _config_dict, llm_tensor_specs

    cfg = KimiaConfig.from_dict(_config_dict(_SIZES["full"]))
    specs = llm_tensor_specs(cfg)
    assert len(specs) == 453
    assert sum(int(np.prod(s.shape)) * 2 for s in specs) == 19_532_673_280
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.kv_groups) == (168448, 3584, 18944, 128, 7)


def test_config_defaults_and_validation(caplog):
    raw = {"vocab_size": 152576, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 4,
           "num_attention_heads": 2, "num_key_value_heads": 1, "kimia_mimo_layers": 2,
           "kimia_mimo_transformer_from_layer_index": 1}
    with caplog.at_level("WARNING"):
        cfg = KimiaConfig.from_dict(raw)
    assert cfg.rope_theta == 10000.0 and "rope_theta" in caplog.text  # official class default, warned
    with pytest.raises(ValueError, match="kimia_mimo_transformer_from_layer_index"):
        KimiaConfig.from_dict({**raw, "kimia_mimo_transformer_from_layer_index": 4})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        KimiaConfig.from_dict({**raw, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="hidden_size"):
        KimiaConfig.from_dict({k: v for k, v in raw.items() if k != "hidden_size"})


def test_tokenizer_pat_str_is_read_from_tokenizer_config(snap, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(snap, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["pat_str"] = r"\S+|\s+"  # a pattern that keeps digits together
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert TextTokenizer.from_snapshot(folder).pat_str == r"\S+|\s+"
    assert TextTokenizer.from_snapshot(snap).pat_str != r"\S+|\s+"
