"""The audio tokenizer at run time: 16 kHz speech -> GLM-4-Voice semantic ids (12.5 Hz) and Whisper features, from
ONNX sessions of the two encoders, with exactly the official segmentation, padding and masks.

- ids: per 30 s segment, padded to a multiple of 1280 samples, log-mel (128 bins), the VQ-encoder graph gives the
  pooled pre-VQ states, then the nearest codebook row by squared L2 in fp32 (as the official ``vector_quantize``),
  keeping the positions of real audio (``mask[::2][::pool]``).
- features: per 30 s segment padded/trimmed to 30 s, log-mel, the Whisper graph; the first 4*N frames of each
  segment (N = ceil(samples / 1280)), concatenated and reshaped to [N, 4*d] (feature t = frames 4t..4t+3).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from kimia_edge.runtime import frontend as fe
from kimia_edge.runtime.prompt import AudioEncoding
from kimia_edge.runtime.sessions import Session

CONV_STRIDE = 2  # both encoders: conv2 has stride 2 (100 Hz mel -> 50 Hz)
FRAMES_PER_FEATURE = 4  # 50 Hz Whisper frames per 12.5 Hz token


def segment_features(segment: np.ndarray, n_mels: int, padding_value: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """One segment as the official feature extractor pads it: (mel [n_mels, T] float32, frame mask [T] int32)."""
    padded, sample_mask = fe.pad_batch_longest([segment], fe.SAMPLES_PER_TOKEN, padding_value)
    return fe.log_mel(padded[0], n_mels), sample_mask[0, :: fe.HOP_LENGTH].astype(np.int32)


def nearest_codebook_rows(hidden: np.ndarray, codebook: np.ndarray, codebook_sq: np.ndarray) -> np.ndarray:
    """argmin over rows of ‖c‖² + ‖h‖² − 2 h·c in fp32: hidden [n, d], codebook [V, d] -> ids [n] int64."""
    h = np.ascontiguousarray(hidden, dtype=np.float32)
    dist = (codebook_sq[None, :] + np.sum(h * h, axis=1, keepdims=True)) - np.float32(2.0) * (h @ codebook.T)
    return np.argmin(dist, axis=1).astype(np.int64)


class OnnxAudioTokenizer:
    """``encode(samples_16k) -> AudioEncoding``; ``vq_config`` / ``whisper_config``: the manifest's model config."""

    def __init__(self, vq_session: Session, whisper_session: Session, codebook: np.ndarray,
                 vq_config: Dict[str, Any], whisper_config: Dict[str, Any]) -> None:
        self.vq, self.whisper = vq_session, whisper_session
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        self.codebook_sq = np.sum(self.codebook * self.codebook, axis=1)
        self.vq_mels = int(vq_config["num_mel_bins"])
        self.pool = int(vq_config["pooling_kernel_size"] or 1)
        self.padding_value = float(vq_config.get("features", {}).get("padding_value", 0.0))
        self.whisper_mels = int(whisper_config["num_mel_bins"])

    def semantic_ids(self, samples_16k: np.ndarray) -> np.ndarray:
        ids: List[np.ndarray] = []
        for segment in fe.segment_30s(samples_16k):
            mel, mask = segment_features(segment, self.vq_mels, self.padding_value)
            (pooled,) = self.vq.run({"mel": mel[None], "frame_mask": mask[None]})
            keep = mask[::CONV_STRIDE][:: self.pool].astype(bool)
            ids.append(nearest_codebook_rows(pooled[0][: len(keep)][keep], self.codebook, self.codebook_sq))
        return np.concatenate(ids) if ids else np.zeros(0, np.int64)

    def features(self, samples_16k: np.ndarray) -> np.ndarray:
        frames = []
        for segment in fe.segment_30s(samples_16k):
            mel = fe.log_mel(fe.pad_or_trim(segment), self.whisper_mels)
            (hidden,) = self.whisper.run({"mel": mel[None]})
            frames.append(hidden[0, : fe.tokens_for_samples(len(segment)) * FRAMES_PER_FEATURE])
        f = np.concatenate(frames)
        return f.reshape(f.shape[0] // FRAMES_PER_FEATURE, -1)

    def encode(self, samples_16k: np.ndarray) -> AudioEncoding:
        samples = np.asarray(samples_16k, dtype=np.float32)
        if samples.ndim != 1 or samples.size == 0:
            raise ValueError(f"expected mono 16 kHz samples [S] with S > 0, got shape {samples.shape}")
        return AudioEncoding(semantic_ids=self.semantic_ids(samples), features=self.features(samples))

    __call__ = encode
