"""Flow-matching DiT: config, reference forward vs the official-code fixture, RoPE invariance, strict loading,
snapshot I/O."""
from __future__ import annotations

import dataclasses

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kimia_edge.export.checkpoint import CheckpointError, load_strict
from kimia_edge.export.reference.dit import DiT, TorchDitStep, apply_rope, build_dit, rope_tables
from kimia_edge.export.snapshot import detokenizer as snap
from kimia_edge.export.snapshot.detokenizer import dit_config_for_size, read_detokenizer, write_detokenizer
from kimia_edge.runtime.dit_config import DitConfig
from kimia_edge.runtime.spec.streaming import StreamingConfig

# MANIFEST.md §10 "suggested parity thresholds for an fp32 re-implementation": 1e-4 abs on DiT hidden states/mels.
# (The official code itself differs from a float64 run by <= 8.9e-7 on these outputs.)
DIT_PARITY_ATOL = 1e-4
# Same arithmetic in a different order (position shift, padded prefix): fp32 rounding only.
INVARIANCE_ATOL = 1e-5
# Shifting positions by ~4000: fp32 RoPE angles (position x inv_freq, up to ~4000 rad) carry ~2.4e-4 rad of rounding
# (4000 x 2^-24), so the shifted outputs agree only to that relative order (measured 2.2e-5).
ROPE_SHIFT_ATOL = 1e-4
FIXTURE_CASES = ("f0", "f1", "f2")
# The tiny preset must be written fast (snapshot convention: "written in < 2 s").
TINY_WRITE_SECONDS = 2.0


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # timings and fp32 rounding as measured


@pytest.fixture(scope="module")
def official_dit(official_fixtures: Path):
    cfg, sd = read_detokenizer(official_fixtures / "kimia_snapshot")
    model = build_dit(cfg).eval()
    load_strict(model, sd, source="official-fixtures/kimia_snapshot/audio_detokenizer/model.pt")
    return cfg, sd, model


@pytest.fixture(scope="module")
def dit_io(official_fixtures: Path):
    from safetensors.torch import load_file

    return load_file(official_fixtures / "dit" / "forward_and_stream_fp32.safetensors")


# ---- config -------------------------------------------------------------------------------------------------------
def test_fixture_config_is_read_as_the_official_loader_does(official_dit):
    cfg, sd, _ = official_dit
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.head_dim) == (96, 2, 3, 32)
    assert cfg.semantic_vocab_size == 100 and cfg.embedding_rows == 101
    assert tuple(sd["semantic_token_embedding.weight"].shape) == (101, 96)
    assert cfg.use_rope and cfg.position_embedding_type == "skip" and cfg.max_positions == 4096
    assert cfg.normalize_mel and cfg.mel_mean == pytest.approx(-4.479605) and cfg.mel_std == pytest.approx(3.4584913)
    assert len(sd) == 31
    # The tiny preset is the fixture geometry except for the semantic vocabulary (the other tiny components').
    assert dataclasses.replace(dit_config_for_size("tiny"), semantic_vocab_size=cfg.semantic_vocab_size) == cfg


def test_config_errors_name_the_field(official_fixtures: Path):
    data = yaml.safe_load((official_fixtures / "kimia_snapshot/audio_detokenizer/config.yaml").read_text())
    broken = json.loads(json.dumps(data))
    del broken["model"]["dit"]["max_seq_len"]
    with pytest.raises(ValueError, match="model.dit.max_seq_len"):
        DitConfig.from_dict(broken)
    broken = json.loads(json.dumps(data))
    del broken["model"]["dit"]["ffn_type"]          # official default conv1d_conv1d raises in DiTBlock
    with pytest.raises(ValueError, match="ffn_type"):
        DitConfig.from_dict(broken)
    broken = json.loads(json.dumps(data))
    broken["model"]["dit"]["num_heads"] = 5
    with pytest.raises(ValueError, match="num_heads"):
        DitConfig.from_dict(broken)
    broken = json.loads(json.dumps(data))
    del broken["mel_std"]
    with pytest.raises(ValueError, match="mel_std"):
        DitConfig.from_dict(broken)
    assert DitConfig.from_dict(DitConfig.from_dict(data).to_dict()) == DitConfig.from_dict(data)


def test_streaming_config_defaults_and_validation():
    cfg = StreamingConfig()
    assert (cfg.chunk_tokens, cfg.first_chunk_tokens, cfg.look_ahead_frames, cfg.euler_steps) == (30, 30, 48, 29)
    assert (cfg.max_kv_cache_frames, cfg.max_positions, cfg.frame_size_samples) == (900, 4096, 480)
    assert [cfg.chunk_tokens_at(i) for i in range(3)] == [30, 30, 30]
    grown = StreamingConfig(first_chunk_tokens=10, chunk_tokens=20, chunk_growth_tokens=10, max_chunk_tokens=45)
    assert [grown.chunk_tokens_at(i) for i in range(5)] == [10, 20, 30, 40, 45]
    with pytest.raises(ValueError, match="max_chunk_tokens"):
        StreamingConfig(chunk_growth_tokens=5).validate()
    with pytest.raises(ValueError, match="ode_time_points"):
        StreamingConfig(ode_time_points=1).validate()
    with pytest.raises(ValueError, match="unknown field"):
        StreamingConfig.from_dict({"chunk_size": 30})


# ---- parity with the official forward -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_single_forward_matches_official(official_dit, dit_io, case):
    _, _, model = official_dit
    with torch.inference_mode():
        out, k, v = model.step(dit_io[f"{case}.x"], dit_io[f"{case}.t"], dit_io[f"{case}.condition"],
                               dit_io[f"{case}.position_ids"])
    ref = dit_io[f"{case}.out"]
    err = (out - ref).abs().max().item()
    assert err <= DIT_PARITY_ATOL, f"{case}: max |Δ| {err:.3g} > {DIT_PARITY_ATOL}"
    n = ref.shape[1]
    assert tuple(k.shape) == tuple(v.shape) == (2, 1, 3, n, 32)


def test_torch_step_adapter_matches_module(official_dit, dit_io):
    _, _, model = official_dit
    step = TorchDitStep(model)
    empty = np.zeros((2, 1, 3, 0, 32), np.float32)
    vel, k, v = step(dit_io["f1.x"].numpy(), dit_io["f1.t"].numpy(), dit_io["f1.condition"].numpy(),
                     dit_io["f1.position_ids"].numpy(), empty, empty)
    assert vel.dtype == np.float32 and k.shape == (2, 1, 3, 50, 32)
    assert np.abs(vel - dit_io["f1.out"].numpy()).max() <= DIT_PARITY_ATOL


# ---- RoPE and attention properties ----------------------------------------------------------------------------------
def test_rope_scores_depend_only_on_relative_position(official_dit):
    cfg, _, _ = official_dit
    cos, sin = rope_tables(cfg)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 1, cfg.head_dim, generator=gen)
    k = torch.randn(1, 1, 1, cfg.head_dim, generator=gen)

    def score(pq: int, pk: int) -> float:
        rq = apply_rope(q, cos[pq][None, None, None], sin[pq][None, None, None])
        rk = apply_rope(k, cos[pk][None, None, None], sin[pk][None, None, None])
        return float((rq * rk).sum())

    for offset in (0, 7, 300):
        base = score(10, 10 + offset)
        for shift in (1, 1000, 3500):
            assert score(10 + shift, 10 + offset + shift) == pytest.approx(base, abs=1e-3), (offset, shift)
    # ...and does depend on it (a broken RoPE that ignores positions fails here).
    assert abs(score(10, 10) - score(10, 310)) > 1e-3


def test_velocity_is_invariant_to_an_absolute_position_shift(official_dit):
    """RoPE + non-causal attention over [prefix ‖ chunk]: shifting every position (prefix and chunk) by the same
    amount leaves the output unchanged; the cached K/V is the one of the shifted prefix."""
    _, _, model = official_dit
    gen = torch.Generator().manual_seed(11)
    xa, xb = torch.randn(1, 40, 80, generator=gen), torch.randn(1, 24, 80, generator=gen)
    ta, tb = torch.randint(0, 100, (1, 40), generator=gen), torch.randint(0, 100, (1, 24), generator=gen)
    t_prime, t_mid = torch.tensor([999]), torch.tensor([413])
    outs = []
    with torch.inference_mode():
        for base in (0, 2000, 4096 - 64):
            _, k, v = model.step(xa, t_prime, ta, torch.arange(base, base + 40)[None])
            out, _, _ = model.step(xb, t_mid, tb, torch.arange(base + 40, base + 64)[None], k, v)
            outs.append(out)
        _, k, v = model.step(xa, t_prime, ta, torch.arange(0, 40)[None])
        moved, _, _ = model.step(xb, t_mid, tb, torch.arange(500, 524)[None], k, v)
    for other in outs[1:]:
        assert (other - outs[0]).abs().max().item() <= ROPE_SHIFT_ATOL
    assert (moved - outs[0]).abs().max().item() > 1e-3    # relative distance changed: output must change


def test_padded_prefix_with_mask_equals_exact_prefix(official_dit):
    """Export form: a fixed-size prefix padded with garbage and masked gives the same velocity."""
    _, _, model = official_dit
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 80, generator=gen)
    tok = torch.randint(0, 100, (1, 16), generator=gen)
    with torch.inference_mode():
        _, k, v = model.step(torch.randn(1, 30, 80, generator=gen), torch.tensor([999]),
                             torch.randint(0, 100, (1, 30), generator=gen), torch.arange(30)[None])
        ref, _, _ = model.step(x, torch.tensor([68]), tok, torch.arange(30, 46)[None], k, v)
        pad = torch.randn(2, 1, 3, 10, 32, generator=gen) * 10
        mask = torch.cat([torch.zeros(1, 10, dtype=torch.bool), torch.ones(1, 30, dtype=torch.bool)], dim=1)
        out, _, _ = model.step(x, torch.tensor([68]), tok, torch.arange(30, 46)[None],
                               torch.cat([pad, k], dim=3), torch.cat([pad, v], dim=3), prefix_mask=mask)
        as_list, _, _ = model.step(x, torch.tensor([68]), tok, torch.arange(30, 46)[None], list(k), list(v))
    assert (out - ref).abs().max().item() <= INVARIANCE_ATOL
    assert torch.equal(as_list, ref)


# ---- strict loading and snapshot I/O --------------------------------------------------------------------------------
def test_strict_loading_names_missing_unexpected_and_misshaped_keys(official_dit):
    cfg, sd, _ = official_dit
    broken = dict(sd)
    del broken["blocks.1.attn.qkv.weight"]
    broken["blocks.1.attn.q_norm.weight"] = torch.zeros(32)
    broken["final_layer.linear.bias"] = torch.zeros(81)
    with pytest.raises(CheckpointError) as info:
        load_strict(build_dit(cfg), broken, source="broken.pt")
    msg = str(info.value)
    for name in ("blocks.1.attn.qkv.weight", "blocks.1.attn.q_norm.weight", "final_layer.linear.bias", "broken.pt"):
        assert name in msg


def test_reader_keeps_only_speech_model_entries(tmp_path: Path, official_fixtures: Path):
    src = official_fixtures / "kimia_snapshot/audio_detokenizer"
    folder = tmp_path / "audio_detokenizer"
    folder.mkdir()
    (folder / "config.yaml").write_text((src / "config.yaml").read_text())
    state = torch.load(src / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    extra = dict(state)
    extra["resampler.kernel"] = torch.zeros(3)                 # OMNI-3P: non-DiT entries exist in the real file
    torch.save({"state_dict": extra, "optimizer_states": [{"exp_avg": torch.zeros(2)}]}, folder / "model.pt")
    cfg, sd = read_detokenizer(tmp_path)
    assert set(sd) == {k[len("speech_model."):] for k in state}
    load_strict(build_dit(cfg), sd, source="with-extras")

    extra["ema.speech_model.input_linear.weight"] = torch.zeros(1)
    torch.save({"state_dict": extra}, folder / "model.pt")
    with pytest.raises(ValueError, match="ema.speech_model.input_linear.weight"):
        read_detokenizer(tmp_path)
    torch.save({"weights": state}, folder / "model.pt")
    with pytest.raises(ValueError, match="state_dict"):
        read_detokenizer(tmp_path)


def test_write_tiny_round_trips_and_is_deterministic(tmp_path: Path):
    t0 = time.perf_counter()
    write_detokenizer(tmp_path / "a", "tiny", seed=7)
    elapsed = time.perf_counter() - t0
    assert elapsed < TINY_WRITE_SECONDS, f"tiny write took {elapsed:.2f} s"
    write_detokenizer(tmp_path / "b", "tiny", seed=7)
    write_detokenizer(tmp_path / "c", "tiny", seed=8)
    cfg, sd = read_detokenizer(tmp_path / "a")
    assert cfg == dit_config_for_size("tiny")
    model = build_dit(cfg).eval()
    load_strict(model, sd, source="tiny")
    raw = yaml.safe_load((tmp_path / "a/audio_detokenizer/config.yaml").read_text())
    assert set(raw) == {"model", "normalize_mel", "mel_mean", "mel_std"} and "rope_params" in raw["model"]["dit"]
    top = torch.load(tmp_path / "a/audio_detokenizer/model.pt", map_location="cpu", weights_only=True)
    assert list(top) == ["state_dict"] and all(k.startswith("speech_model.") for k in top["state_dict"])
    _, sd_b = read_detokenizer(tmp_path / "b")
    _, sd_c = read_detokenizer(tmp_path / "c")
    assert all(torch.equal(sd[k], sd_b[k]) for k in sd)
    assert not torch.equal(sd["input_linear.weight"], sd_c["input_linear.weight"])
    # Random weights keep the velocity O(1).
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        out, _, _ = model.step(torch.randn(1, 50, 80, generator=gen), torch.tensor([500]),
                               torch.randint(0, 100, (1, 50), generator=gen), torch.arange(50)[None])
    assert 0.1 < out.std().item() < 10.0


def test_memory_mapped_build_gives_the_same_file_content(tmp_path: Path, monkeypatch):
    """The large-size path (tensors carved from a temporary memory-mapped file) writes the same values."""
    write_detokenizer(tmp_path / "ram", "tiny", seed=3)
    monkeypatch.setattr(snap, "_MMAP_THRESHOLD_BYTES", 0)
    write_detokenizer(tmp_path / "mmap", "tiny", seed=3)
    assert sorted(p.name for p in (tmp_path / "mmap/audio_detokenizer").iterdir()) == ["config.yaml", "model.pt"]
    _, a = read_detokenizer(tmp_path / "ram")
    _, b = read_detokenizer(tmp_path / "mmap")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_size_shapes_match_the_reference_doc():
    """Reference doc §3.1: 1 584 023 120 parameters, embedding [16385, 2304], fc1 [9216, 2304] (meta device)."""
    cfg = dit_config_for_size("full")
    shapes = {k: tuple(v.shape) for k, v in build_dit(cfg, device="meta").state_dict().items()}
    assert sum(int(np.prod(s)) for s in shapes.values()) == 1_584_023_120
    assert shapes["semantic_token_embedding.weight"] == (16385, 2304)
    assert shapes["blocks.15.mlp.fc1.weight"] == (9216, 2304)
    assert shapes["blocks.0.attn.qkv.weight"] == (6912, 2304)


@pytest.mark.slow
def test_write_small_loads(tmp_path: Path):
    write_detokenizer(tmp_path, "small", seed=1)
    cfg, sd = read_detokenizer(tmp_path)
    assert cfg.depth == 16 and cfg.head_dim == 128
    load_strict(DiT(cfg), sd, source="small")
