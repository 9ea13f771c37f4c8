"""Whisper log-mel front end: the numpy run-time version, its torch twin and the official fixtures agree; file
loading, resampling, segmentation and token counts behave as the official code does."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.numpy import load_file

from kimia_edge.export.reference.whisper_frontend import log_mel_torch
from kimia_edge.runtime import frontend as fe

# MANIFEST.md §10: 1e-4 abs on mels for an fp32 re-implementation (measured: numpy 1.8e-5, torch twin 1.2e-5).
MEL_ATOL = 1e-4
# Filter bank vs librosa's mel_filters.npz (environment-notes: a numpy Slaney bank matches to 4e-9).
FILTER_ATOL = 1e-8


@pytest.fixture(scope="module")
def waves(official_fixtures: Path) -> dict:
    return load_file(str(official_fixtures / "audio" / "waves_16k.safetensors"))


@pytest.fixture(scope="module")
def whisper_io(official_fixtures: Path) -> dict:
    return load_file(str(official_fixtures / "whisper_lv3" / "io.safetensors"))


@pytest.fixture(scope="module")
def glm_io(official_fixtures: Path) -> dict:
    return load_file(str(official_fixtures / "glm_vq" / "io.safetensors"))


# ---- filter bank --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_mels", [80, 128])
def test_filter_bank_matches_whisper_npz(reference_data: Path, n_mels: int) -> None:
    with np.load(reference_data / "whisper_mel_filters.npz") as f:
        official = f[f"mel_{n_mels}"]
    ours = fe.mel_filter_bank(n_mels)
    assert ours.shape == official.shape == (n_mels, fe.N_FFT // 2 + 1)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, official, rtol=0, atol=FILTER_ATOL)


# ---- log-mel: numpy vs torch twin vs official ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["A.seg0", "C.seg0", "C.seg1"])
def test_log_mel_matches_official_kimi_segments(waves: dict, whisper_io: dict, name: str) -> None:
    utt, seg = name.split(".")
    segment = fe.segment_30s(waves[utt])[int(seg[3:])]
    padded = fe.pad_or_trim(segment)
    official = whisper_io[f"fp32.{name}.mel"]
    ours = fe.log_mel(padded, 128)
    twin = log_mel_torch(torch.from_numpy(padded), 128).numpy()
    assert ours.shape == twin.shape == official.shape == (128, fe.N_FRAMES)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, official, rtol=0, atol=MEL_ATOL)
    np.testing.assert_allclose(twin, official, rtol=0, atol=MEL_ATOL)
    np.testing.assert_allclose(ours, twin, rtol=0, atol=MEL_ATOL)


@pytest.mark.parametrize("name", ["A", "B"])
def test_glm_feature_extractor_semantics_single(waves: dict, glm_io: dict, name: str) -> None:
    """padding="longest" + pad_to_multiple_of=1280, frame-level attention mask = sample mask[::160]."""
    padded, sample_mask = fe.pad_batch_longest([waves[name]], fe.SAMPLES_PER_TOKEN)
    assert padded.shape[1] % fe.SAMPLES_PER_TOKEN == 0
    features = fe.log_mel(padded[0], 128)
    np.testing.assert_allclose(features, glm_io[f"single.{name}.input_features"][0], rtol=0, atol=MEL_ATOL)
    np.testing.assert_array_equal(sample_mask[:, :: fe.HOP_LENGTH], glm_io[f"single.{name}.attention_mask"])


def test_glm_feature_extractor_semantics_batched(waves: dict, glm_io: dict) -> None:
    segments = [waves["A"], waves["B"], *fe.segment_30s(waves["C"])]
    padded, sample_mask = fe.pad_batch_longest(segments, fe.SAMPLES_PER_TOKEN)
    assert padded.shape == (4, fe.N_SAMPLES)
    # numpy per example and the torch twin batched (per-example max-8 floor) both match the official features
    ours = np.stack([fe.log_mel(x, 128) for x in padded])
    twin = log_mel_torch(torch.from_numpy(padded), 128).numpy()
    np.testing.assert_allclose(ours, glm_io["batched.input_features"], rtol=0, atol=MEL_ATOL)
    np.testing.assert_allclose(twin, glm_io["batched.input_features"], rtol=0, atol=MEL_ATOL)
    np.testing.assert_array_equal(sample_mask[:, :: fe.HOP_LENGTH], glm_io["batched.attention_mask"])


def test_log_mel_shape_and_floor() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(16_000) * 0.1).astype(np.float32)
    mel = fe.log_mel(x, 128)
    assert mel.shape == (128, 16_000 // fe.HOP_LENGTH)
    # after (x + 4) / 4 the dynamic range is at most 8 / 4 = 2
    assert mel.max() - mel.min() <= 2.0 + 1e-6
    with pytest.raises(ValueError, match=r"expected shape \[S\]"):
        fe.log_mel(np.zeros((2, 1000), np.float32), 128)


# ---- loading and resampling ---------------------------------------------------------------------------------------
def _sine(freq_hz: float, sr: int, seconds: float) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return np.sin(2 * np.pi * freq_hz * t)


def test_resample_44k1_stereo_to_16k_mono(tmp_path: Path) -> None:
    sr, freq = 44_100, 440.0
    left, right = 0.5 * _sine(freq, sr, 1.0), 0.3 * _sine(freq, sr, 1.0)
    stereo = np.stack([left, right], axis=1).astype(np.float32)  # [S, C]
    path = tmp_path / "stereo_44k1.wav"
    sf.write(str(path), stereo, sr, subtype="FLOAT")

    samples, file_sr = fe.load_audio(path)
    assert file_sr == sr and samples.dtype == np.float32 and samples.shape == (sr,)
    np.testing.assert_allclose(samples, 0.4 * _sine(freq, sr, 1.0), atol=1e-6)  # channel mean

    out = fe.to_16k_mono(stereo, sr)
    assert out.dtype == np.float32 and out.shape == (fe.SAMPLE_RATE_HZ,)
    expected = 0.4 * _sine(freq, fe.SAMPLE_RATE_HZ, 1.0)
    interior = slice(200, -200)  # away from the filter's edge transients
    np.testing.assert_allclose(out[interior], expected[interior], atol=2e-3)
    np.testing.assert_array_equal(fe.to_16k_mono(out, fe.SAMPLE_RATE_HZ), out)  # 16 kHz mono passes through


def test_to_16k_mono_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="sample rate 0 Hz is outside"):
        fe.to_16k_mono(np.zeros(10, np.float32), 0)
    with pytest.raises(ValueError, match=r"\[S\] or \[S, C\]"):
        fe.to_16k_mono(np.zeros((2, 2, 2), np.float32), 16_000)


def test_a_header_claiming_an_absurd_rate_is_refused_and_odd_rates_stay_small(tmp_path: Path) -> None:
    import resource

    import soundfile as sf

    lie = tmp_path / "lie.wav"
    sf.write(str(lie), np.zeros(32_000, np.float32) + 0.1, 4_000_001)  # 64 KB whose header says 4 MHz
    with pytest.raises(fe.AudioFileError, match=r"lie.wav: sample rate 4000001 Hz is outside 4000\.\.768000 Hz"):
        fe.load_audio(lie)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fe.to_16k_mono(np.full(70_000, 0.1, np.float32), 700_001)  # 0.1 s at a rate coprime with 16 000
    assert abs(out.size - 1_600) <= 1
    # the exact ratio 16000/700001 would design a 14-million-tap filter (> 100 MB); the capped one is tiny
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_bad_files_raise_errors_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    with pytest.raises(fe.AudioFileError, match="missing.wav"):
        fe.load_audio(missing)
    garbage = tmp_path / "not_audio.wav"
    garbage.write_text("this is not a wav file")
    with pytest.raises(fe.AudioFileError, match="not_audio.wav"):
        fe.load_audio(garbage)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros((0,), np.float32), 16_000)
    with pytest.raises(fe.AudioFileError, match="empty.wav.*no samples"):
        fe.load_audio(empty)


# ---- segmentation and token counts --------------------------------------------------------------------------------
def test_token_count_is_ceil_samples_over_1280() -> None:
    for n in [1, 1279, 1280, 1281, 2560, 65_600, 36_800, 480_000, 16_000]:
        assert fe.tokens_for_samples(n) == -(-n // 1280)
    assert fe.tokens_for_samples(0) == 0
    with pytest.raises(ValueError, match="n_samples"):
        fe.tokens_for_samples(-1)


def test_token_counts_of_fixture_clips(official_fixtures: Path, waves: dict) -> None:
    meta = json.loads((official_fixtures / "glm_vq" / "meta.json").read_text())
    for name in "ABC":
        total = sum(fe.tokens_for_samples(len(s)) for s in fe.segment_30s(waves[name]))
        assert total == meta["single"][name]["n_tokens"]
    assert [fe.tokens_for_samples(len(s)) for s in fe.segment_30s(waves["C"])] == [375, 13]


def test_segment_30s_boundaries() -> None:
    assert fe.segment_30s(np.zeros(0, np.float32)) == []
    assert [len(s) for s in fe.segment_30s(np.zeros(fe.N_SAMPLES, np.float32))] == [fe.N_SAMPLES]
    assert [len(s) for s in fe.segment_30s(np.zeros(fe.N_SAMPLES + 1, np.float32))] == [fe.N_SAMPLES, 1]
    x = np.arange(2 * fe.N_SAMPLES + 5, dtype=np.float32)
    pieces = fe.segment_30s(x)
    assert [len(s) for s in pieces] == [fe.N_SAMPLES, fe.N_SAMPLES, 5]
    np.testing.assert_array_equal(np.concatenate(pieces), x)


def test_pad_or_trim() -> None:
    assert fe.pad_or_trim(np.ones(10, np.float32), 16).tolist() == [1.0] * 10 + [0.0] * 6
    assert fe.pad_or_trim(np.ones(20, np.float32), 16).shape == (16,)
