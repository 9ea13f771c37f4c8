"""BigVGAN vocoder: config, reference generator vs the official-code fixture, weight-norm folding, snapshot I/O."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kimia_edge.export.checkpoint import CheckpointError, load_strict
from kimia_edge.export.reference.bigvgan import BigVGAN, anti_alias_filter, build_bigvgan
from kimia_edge.export.snapshot.vocoder import (
    read_vocoder,
    random_state_dict,
    vocoder_config_for_size,
    write_vocoder,
)
from kimia_edge.runtime.vocoder_config import VocoderConfig

# MANIFEST.md §10 "suggested parity thresholds for an fp32 re-implementation": 5e-5 abs on waves.
WAV_PARITY_ATOL = 5e-5
# Folding g·v/‖v‖ into a plain weight is the same kernel as the weight-norm forward: expect (near) bit identity.
FOLD_ATOL = 1e-6
# MANIFEST.md §10: official bf16 vs fp32 BigVGAN wav differs by 0.060; a bf16 re-run is only indicative. A bound
# 3x that catches a broken bf16 path (e.g. filters or g left in fp32 with a wrong cast) without flaking.
BF16_INDICATIVE_ATOL = 0.2
# Batched vs single-item convolutions take different CPU kernels: fp32 rounding only (measured 5e-6).
BATCH_ATOL = 2e-5
# Reference doc §3.4: 241 118 777 tensors' elements (params + filter buffers) in 1 206 keys for the real checkpoint.
FULL_NUM_ELEMENTS = 241_118_777
FULL_NUM_KEYS = 1206
# Reference doc §4: vocoder/model.pt is 964 918 850 B (pickle and zip overhead differ slightly from ours).
FULL_MODEL_PT_BYTES = 964_918_850


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # timings and fp32 rounding as measured


@pytest.fixture(scope="module")
def official_vocoder(official_fixtures: Path):
    cfg, sd = read_vocoder(official_fixtures / "kimia_snapshot")
    model = BigVGAN(cfg).eval()
    load_strict(model, sd, source="official-fixtures/kimia_snapshot/vocoder/model.pt")
    return cfg, sd, model


@pytest.fixture(scope="module")
def vocoder_io(official_fixtures: Path):
    from safetensors.torch import load_file

    return load_file(official_fixtures / "bigvgan" / "io.safetensors")


def _smooth_mel(num_frames: int, seed: int, num_mels: int = 80) -> torch.Tensor:
    """[1, num_mels, num_frames] mel ≈ N(-5, 2²), 3-tap smoothed (like the fixture input)."""
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(1, num_mels, num_frames, generator=g) * 2.0 - 5.0
    return torch.nn.functional.avg_pool1d(torch.nn.functional.pad(mel, (1, 1), mode="replicate"), 3, 1)


# ---- config -------------------------------------------------------------------------------------------------------
def test_config_reads_official_fixture(official_fixtures: Path):
    cfg = VocoderConfig.from_json(official_fixtures / "kimia_snapshot" / "vocoder" / "config.json")
    assert cfg.upsample_rates == (5, 2, 4, 3, 4)
    assert cfg.resblock_dilation_sizes == ((1, 3, 5),) * 4
    assert (cfg.activation, cfg.snake_logscale, cfg.use_tanh_at_final, cfg.use_bias_at_final) == (
        "snakebeta", True, False, False)
    assert cfg.frame_rate_hz == 50.0
    assert cfg.n_fft == 1920 and cfg.fmax is None


def test_config_validate_names_the_field():
    base = vocoder_config_for_size("tiny").to_dict()
    cases = {
        "upsample_rates": dict(upsample_rates=[5, 2, 4, 3, 2]),
        "upsample_kernel_sizes": dict(upsample_kernel_sizes=[9, 4, 8, 5]),
        "resblock_dilation_sizes": dict(resblock_dilation_sizes=[[1, 3, 5]] * 3),
        "resblock": dict(resblock="3"),
        "activation": dict(activation="relu"),
    }
    for field, change in cases.items():
        with pytest.raises(ValueError, match=field):
            VocoderConfig.from_dict({**base, **change})
    incomplete = dict(base)
    del incomplete["hop_size"]
    with pytest.raises(ValueError, match="hop_size"):
        VocoderConfig.from_dict(incomplete)
    # Official defaults when the flags are absent: tanh and bias at the final layer.
    legacy = {k: v for k, v in base.items() if k not in ("use_tanh_at_final", "use_bias_at_final")}
    cfg = VocoderConfig.from_dict(legacy)
    assert cfg.use_tanh_at_final and cfg.use_bias_at_final


def test_vocoder_config_is_torch_free():
    code = "import sys, kimia_edge.runtime.vocoder_config; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- official parity ----------------------------------------------------------------------------------------------
def test_fixture_parity_fp32(official_vocoder, vocoder_io):
    _, _, model = official_vocoder
    mel, want = vocoder_io["mel"], vocoder_io["wav"]
    with torch.no_grad():
        start = time.perf_counter()
        got = model(mel)
        elapsed = time.perf_counter() - start
    assert got.shape == want.shape == (1, 1, mel.shape[-1] * 480)
    err = (got - want).abs().max().item()
    print(f"\nBigVGAN fixture fp32: max abs err {err:.3g} (atol {WAV_PARITY_ATOL}), forward {elapsed * 1e3:.1f} ms")
    assert err <= WAV_PARITY_ATOL


def test_fixture_parity_float64_math(official_vocoder, vocoder_io):
    """The same graph in float64 vs the fp32 golden: bounded by the golden's own fp32 rounding (MANIFEST §10: 4.3e-6)."""
    cfg, sd, _ = official_vocoder
    model = BigVGAN(cfg).eval()
    load_strict(model, sd, source="fixture")
    model = model.double()
    with torch.no_grad():
        got = model(vocoder_io["mel"].double()).float()
    err = (got - vocoder_io["wav"]).abs().max().item()
    print(f"\nBigVGAN fixture float64 reference vs fp32 golden: {err:.3g}")
    assert err <= WAV_PARITY_ATOL


def test_fixture_bf16_indicative(official_vocoder, vocoder_io):
    cfg, sd, _ = official_vocoder
    model = BigVGAN(cfg).eval()
    load_strict(model, sd, source="fixture")
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        got = model(vocoder_io["mel"].to(torch.bfloat16)).float()
    err_bf16 = (got - vocoder_io["wav_bf16"]).abs().max().item()
    err_fp32 = (got - vocoder_io["wav"]).abs().max().item()
    print(f"\nBigVGAN bf16: vs official bf16 {err_bf16:.3g}, vs official fp32 {err_fp32:.3g} (indicative only)")
    assert err_bf16 <= BF16_INDICATIVE_ATOL and err_fp32 <= BF16_INDICATIVE_ATOL


def test_filters_match_official_buffers(official_vocoder):
    _, sd, _ = official_vocoder
    expected = anti_alias_filter()
    filter_keys = [k for k in sd if k.endswith(".filter")]
    assert len(filter_keys) == 2 * (20 * 6 + 1)
    for key in filter_keys:
        torch.testing.assert_close(sd[key], expected, rtol=0, atol=1e-7, msg=key)


# ---- weight-norm folding ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 2, 3, 17, 156])
@pytest.mark.parametrize("activation", ["snake", "snakebeta"])
def test_phase_form_activation_equals_the_official_sequence(length: int, activation: str):
    """Activation1d.forward (up-sampler phases as channel pairs, no interleaving) = the official
    down(act(up(x))) at every sample, the replicate-padded edges included."""
    from kimia_edge.export.reference.bigvgan import Activation1d, Snake, SnakeBeta

    torch.manual_seed(length)
    act = (Snake(6, True) if activation == "snake" else SnakeBeta(6, True))
    with torch.no_grad():
        for p in act.parameters():
            p.normal_(0.0, 0.5)
    module = Activation1d(act)
    x = 3 * torch.randn(2, 6, length)
    got, ref = module(x), module.unfused(x)
    assert got.shape == ref.shape == (2, 6, length)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)  # fp32 sums in another order; a wrong tap is O(1)


def test_fold_weight_norm_keeps_output(official_vocoder, vocoder_io):
    _, _, model = official_vocoder
    folded = model.folded_copy()
    assert model.is_weight_normed and not folded.is_weight_normed
    keys = folded.state_dict().keys()
    assert not any(k.endswith(("weight_g", "weight_v")) for k in keys)
    assert {"conv_pre.weight", "conv_pre.bias", "ups.0.0.weight", "conv_post.weight"} <= set(keys)
    assert "conv_post.bias" not in keys          # use_bias_at_final false
    with torch.no_grad():
        err = (folded(vocoder_io["mel"]) - model(vocoder_io["mel"])).abs().max().item()
    assert err <= FOLD_ATOL
    with pytest.raises(ValueError, match="already folded"):
        folded.fold_weight_norm()


def test_fold_matches_torch_weight_norm_dim0_on_conv_transpose(official_vocoder):
    """torch's own weight_norm (default dim=0, as the official code calls it) on a ConvTranspose1d [C_in, C_out, k]
    normalises per input channel; our fold must give the same weight."""
    _, sd, model = official_vocoder
    v, g = sd["ups.0.0.weight_v"], sd["ups.0.0.weight_g"]
    assert g.shape == (v.shape[0], 1, 1)
    conv = torch.nn.ConvTranspose1d(v.shape[0], v.shape[1], v.shape[2])
    conv = torch.nn.utils.parametrizations.weight_norm(conv, dim=0)
    with torch.no_grad():
        conv.parametrizations.weight.original0.copy_(g)
        conv.parametrizations.weight.original1.copy_(v)
        torch.testing.assert_close(model.folded_copy().ups[0][0].weight, conv.weight, rtol=0, atol=1e-7)
        per_in_norm = model.folded_copy().ups[0][0].weight.flatten(1).norm(dim=1)
    torch.testing.assert_close(per_in_norm, g.flatten(), rtol=1e-5, atol=1e-6)


# ---- shapes -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_frames", [7, 23])
def test_output_length_is_frames_times_hop(official_vocoder, num_frames):
    cfg, _, model = official_vocoder
    with torch.no_grad():
        wav = model(_smooth_mel(num_frames, seed=num_frames))
    assert wav.shape == (1, 1, num_frames * cfg.hop_size) == (1, 1, model.num_samples(num_frames))
    assert torch.isfinite(wav).all() and wav.abs().max() <= 1.0


def test_batch_matches_single(official_vocoder):
    _, _, model = official_vocoder
    mels = torch.cat([_smooth_mel(12, seed=1), _smooth_mel(12, seed=2)])
    with torch.no_grad():
        both = model(mels)
        torch.testing.assert_close(both[1:], model(mels[1:]), rtol=0, atol=BATCH_ATOL)


def test_rejects_wrong_mel_shape(official_vocoder):
    _, _, model = official_vocoder
    with pytest.raises(ValueError, match=r"expected \[B, 80, T\]"):
        model(torch.zeros(1, 12, 80))


# ---- strict loading -----------------------------------------------------------------------------------------------
def test_strict_loading_names_keys(official_vocoder):
    cfg, sd, _ = official_vocoder
    broken = dict(sd)
    del broken["resblocks.3.convs2.1.weight_g"]
    broken["resblocks.3.convs2.1.weight"] = sd["resblocks.3.convs2.1.weight_v"]
    with pytest.raises(CheckpointError) as info:
        load_strict(BigVGAN(cfg), broken, source="broken.pt")
    assert "resblocks.3.convs2.1.weight_g" in str(info.value)
    assert "resblocks.3.convs2.1.weight" in str(info.value)
    assert "broken.pt" in str(info.value)

    # A config that disagrees with the checkpoint (conv_post bias) is a key error too.
    with_bias = VocoderConfig.from_dict({**cfg.to_dict(), "use_bias_at_final": True})
    with pytest.raises(CheckpointError, match=r"conv_post\.bias"):
        load_strict(BigVGAN(with_bias), sd, source="fixture")

    # Shape mismatch names the key and both shapes.
    reshaped = dict(sd)
    reshaped["ups.1.0.weight_v"] = sd["ups.1.0.weight_v"][:, :, :-1]
    with pytest.raises(CheckpointError, match=r"ups\.1\.0\.weight_v"):
        load_strict(BigVGAN(cfg), reshaped, source="fixture")


# ---- snapshot writer / reader ---------------------------------------------------------------------------------------
def test_tiny_snapshot_roundtrip(tmp_path: Path):
    start = time.perf_counter()
    write_vocoder(tmp_path, "tiny", seed=3)
    write_seconds = time.perf_counter() - start
    assert write_seconds < 2.0, f"tiny vocoder snapshot took {write_seconds:.2f} s"
    folder = tmp_path / "vocoder"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.pt"]
    raw = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    assert list(raw) == ["generator"]
    assert json.loads((folder / "config.json").read_text())["upsample_rates"] == [5, 2, 4, 3, 4]
    assert (folder / "model.pt").stat().st_size < 4_000_000

    cfg, sd = read_vocoder(tmp_path)
    assert cfg == vocoder_config_for_size("tiny")
    model = BigVGAN(cfg).eval()
    load_strict(model, sd, source=str(folder))
    for key in (k for k in sd if k.endswith(".filter")):
        torch.testing.assert_close(sd[key], anti_alias_filter(), rtol=0, atol=0)

    with torch.no_grad():
        wav = model(_smooth_mel(30, seed=0))
    std, peak = wav.std().item(), wav.abs().max().item()
    assert 0.01 < std < 0.5 and peak < 1.0, f"random weights should give O(0.1) audio, got std {std}, peak {peak}"


def test_tiny_snapshot_layout_matches_official_fixture(official_fixtures: Path):
    """Our tiny preset has the fixture's geometry: the same keys and shapes as the official checkpoint."""
    _, official_sd = read_vocoder(official_fixtures / "kimia_snapshot")
    ours = random_state_dict(vocoder_config_for_size("tiny"), seed=0)
    assert list(ours) == list(official_sd)
    assert all(ours[k].shape == official_sd[k].shape for k in ours)


def test_writer_is_deterministic_by_seed():
    cfg = vocoder_config_for_size("tiny")
    a, b, c = (random_state_dict(cfg, seed) for seed in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_pre.weight_v"], c["conv_pre.weight_v"])


def test_reader_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_vocoder(tmp_path)
    write_vocoder(tmp_path, "tiny", seed=0)
    torch.save({"state_dict": {}}, tmp_path / "vocoder" / "model.pt")
    with pytest.raises(ValueError, match="'generator'"):
        read_vocoder(tmp_path)


def test_full_size_layout_without_allocation():
    cfg = vocoder_config_for_size("full")
    sd = build_bigvgan(cfg, device="meta").state_dict()
    assert len(sd) == FULL_NUM_KEYS
    assert sum(t.numel() for t in sd.values()) == FULL_NUM_ELEMENTS
    assert sd["conv_pre.weight_v"].shape == (2048, 80, 7)
    assert sd["ups.6.0.weight_v"].shape == (32, 16, 4)


@pytest.mark.slow
@pytest.mark.parametrize("size", ["small", "full"])
def test_large_snapshot_roundtrip(tmp_path: Path, size: str):
    write_vocoder(tmp_path, size, seed=0)
    cfg, sd = read_vocoder(tmp_path)
    assert cfg == vocoder_config_for_size(size)
    if size == "full":
        assert sum(t.numel() for t in sd.values()) == FULL_NUM_ELEMENTS
        size_bytes = (tmp_path / "vocoder" / "model.pt").stat().st_size
        assert abs(size_bytes - FULL_MODEL_PT_BYTES) < 0.001 * FULL_MODEL_PT_BYTES, size_bytes
    model = BigVGAN(cfg).eval()
    load_strict(model, sd, source=size)
    del sd
    with torch.no_grad():
        wav = model(_smooth_mel(4, seed=0))
    assert wav.shape == (1, 1, 4 * cfg.hop_size)
    assert 0.01 < wav.std().item() < 0.5 and wav.abs().max().item() < 1.0
    (tmp_path / "vocoder" / "model.pt").unlink()   # do not leave up to 1 GB behind in pytest's kept tmp dirs


def test_frozen_phase_filters_keep_official_parity(official_vocoder, vocoder_io):
    """The export form (phase filters stored once, weight norm folded) still equals the official output."""
    _, _, model = official_vocoder
    frozen = model.folded_copy().freeze_phase_filters()
    assert frozen.state_dict().keys() == model.folded_copy().state_dict().keys()  # nothing new in the checkpoint
    with torch.no_grad():
        err = (frozen(vocoder_io["mel"]) - vocoder_io["wav"]).abs().max().item()
    assert err <= WAV_PARITY_ATOL
