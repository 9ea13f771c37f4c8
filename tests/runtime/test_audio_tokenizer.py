"""The audio tokenizer's host logic (runtime/audio_tokenizer.py) on its own, torch-free: stand-in networks that
record what they are fed and return position-coded outputs, so segmentation, per-batch padding, frame masks,
kept positions, the 4·N-frame slice and the [4N, d] -> [N, 4d] reshape are checked exactly. The same host logic
runs the ONNX graphs and the torch reference; the official-fixture parity of both is in test_audio_encoders.py
and test_encoder_graphs.py."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import pytest

from kimia_edge.runtime import frontend as fe
from kimia_edge.runtime.audio_encoder_config import FeatureExtractorConfig, VQEncoderConfig, WhisperEncoderConfig
from kimia_edge.runtime.audio_tokenizer import (
    AudioTokenizer,
    kept_positions,
    semantic_ids,
    whisper_features,
    whisper_frames,
)

VQ_CFG = VQEncoderConfig(d_model=8, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=16, num_mel_bins=128,
                         pooling_kernel_size=4, pooling_type="avg", pooling_position=1, quantize_vocab_size=16,
                         quantize_position=2, features=FeatureExtractorConfig(feature_size=128))
WHISPER_CFG = WhisperEncoderConfig(d_model=3, encoder_layers=1, encoder_attention_heads=1, encoder_ffn_dim=4)
SR = fe.SAMPLE_RATE_HZ


class RecordingVQ:
    """VQIdsFn stand-in: id = 1000 * call + 100 * row + position (padding positions included)."""

    def __init__(self) -> None:
        self.calls: List[Tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, mel: np.ndarray, frame_mask: np.ndarray) -> np.ndarray:
        self.calls.append((mel, frame_mask))
        b, t = frame_mask.shape
        positions = np.arange(t // VQ_CFG.frames_per_token)
        return 1000 * (len(self.calls) - 1) + 100 * np.arange(b)[:, None] + positions[None, :]


def _noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def test_segments_of_all_utterances_are_batched_and_padded_per_batch() -> None:
    a, b, empty = _noise(2.0, 0), _noise(31.0, 1)[:-100], np.zeros(0, np.float32)
    vq = RecordingVQ()
    ids = semantic_ids(vq, [a, b, empty], VQ_CFG, batch_size=2)
    b1 = len(b) - fe.N_SAMPLES  # 15 900 samples in the last segment of b
    n_a, n_b1 = fe.tokens_for_samples(len(a)), fe.tokens_for_samples(b1)  # 25, 13
    # segments a, b[0:30 s], b[30 s:] -> batches [a, b0] and [b1]
    assert [m.shape for m, _ in vq.calls] == [(2, 128, fe.N_FRAMES), (1, 128, 8 * n_b1)]
    # frame masks are the sample masks [::160]: a is padded to the 30 s of its batch partner, b1 to 1280 samples
    mask0, mask1 = vq.calls[0][1], vq.calls[1][1]
    assert mask0.dtype == np.int32 and int(mask0[0].sum()) == len(a) // 160 and int(mask0[1].sum()) == fe.N_FRAMES
    assert int(mask1[0].sum()) == -(-b1 // 160)
    # the ids kept are those at mask[::2][::4], in order, back to their utterance; nothing for the empty one
    np.testing.assert_array_equal(ids[0], np.arange(n_a))
    np.testing.assert_array_equal(ids[1], np.concatenate([100 + np.arange(375), 1000 + np.arange(n_b1)]))
    assert ids[2].shape == (0,) and all(x.dtype == np.int64 for x in ids)
    # alone, a is padded only to a multiple of 1280 samples (and its last frames see a different padding)
    alone = RecordingVQ()
    np.testing.assert_array_equal(semantic_ids(alone, [a], VQ_CFG)[0], np.arange(n_a))
    assert alone.calls[0][0].shape == (1, 128, 8 * n_a)
    assert not np.array_equal(alone.calls[0][0][0], vq.calls[0][0][0, :, : 8 * n_a])
    np.testing.assert_array_equal(alone.calls[0][0][0], fe.log_mel(fe.pad_or_trim(a, 1280 * n_a), 128))


def test_kept_positions_follow_the_official_mask_stride() -> None:
    mask = np.zeros(3000, np.int32)
    mask[:801] = 1  # 801 frames: positions 0, 8, ..., 800 are valid -> 101 ids
    keep = kept_positions(mask, VQ_CFG)
    assert keep.shape == (375,) and int(keep.sum()) == 101 and keep[:101].all()


def test_a_network_with_the_wrong_output_shape_is_named() -> None:
    with pytest.raises(ValueError, match=r"vq encoder: expected ids of shape \(1, 25\)"):
        semantic_ids(lambda mel, mask: np.zeros((1, 24), np.int64), [_noise(2.0, 0)], VQ_CFG)
    with pytest.raises(ValueError, match="utterances\\[1\\]: expected mono"):
        semantic_ids(RecordingVQ(), [_noise(1.0, 0), np.zeros((10, 2), np.float32)], VQ_CFG)


def test_whisper_frames_keep_4n_per_30s_window_and_reshape_to_features() -> None:
    calls: List[np.ndarray] = []

    def whisper(mel: np.ndarray) -> np.ndarray:  # hidden[f] = (call, f, f) so every frame is identifiable
        calls.append(mel)
        f = np.arange(1500, dtype=np.float32)
        return np.stack([np.full(1500, len(calls) - 1, np.float32), f, -f], axis=1)[None]

    clip = _noise(31.0, 3)[:-5000]  # 30 s + 0.6875 s -> 375 + 9 tokens
    frames = whisper_frames(whisper, clip, WHISPER_CFG)
    assert [m.shape for m in calls] == [(1, 128, fe.N_FRAMES)] * 2
    np.testing.assert_array_equal(calls[1][0], fe.log_mel(fe.pad_or_trim(clip[fe.N_SAMPLES:]), 128))
    assert frames.shape == (4 * (375 + 9), 3) and frames.dtype == np.float32
    np.testing.assert_array_equal(frames[:1500, 1], np.arange(1500))
    np.testing.assert_array_equal(frames[1500:, 0], 1)
    np.testing.assert_array_equal(frames[1500:, 1], np.arange(36))
    calls.clear()
    feats = whisper_features(whisper, clip, WHISPER_CFG)
    assert feats.shape == (384, 12)
    np.testing.assert_array_equal(feats[380], frames[1520:1524].reshape(-1))  # row t = frames 4t .. 4t+3
    with pytest.raises(ValueError, match=r"whisper encoder: expected hidden \[1, >= 32, 3\]"):
        whisper_frames(lambda mel: np.zeros((1, 1500, 4), np.float32), clip[:10000], WHISPER_CFG)


def test_tokenizer_composes_both_branches_and_rejects_bad_input() -> None:
    tok = AudioTokenizer(RecordingVQ(), lambda mel: np.ones((1, 1500, 3), np.float32), VQ_CFG, WHISPER_CFG)
    enc = tok.encode(_noise(1.0, 4))
    assert enc.semantic_ids.shape == (13,) and enc.features.shape == (13, 12)
    for bad in (np.zeros(0, np.float32), np.zeros((100, 2), np.float32)):
        with pytest.raises(ValueError, match="mono 16 kHz"):
            tok.encode(bad)
