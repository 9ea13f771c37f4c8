"""Torch twin of the Whisper log-mel front end, computed the way the official code does (``torch.stft``).

Kimi's ``whisper_Lv3/whisper.py::log_mel_spectrogram`` and HF ``WhisperFeatureExtractor._torch_extract_fbank_features``
(GLM-4-Voice) run the same float32 math: ``torch.stft(center=True, reflect)`` with a periodic Hann window, last frame
dropped, power, mel projection, ``log10`` clamp, ``max - 8`` floor per example, ``(x + 4) / 4``. Both tokenizer paths
(runtime and golden pipeline) use the numpy version, ``kimia_edge.runtime.frontend.log_mel`` (one host logic); this
twin is the official computation that tests hold it against, on inputs the fixtures do not cover. Same constants.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from kimia_edge.runtime import frontend as fe

__all__ = ["log_mel_torch", "mel_filters_torch"]


def mel_filters_torch(n_mels: int, n_fft: int = fe.N_FFT, sample_rate_hz: int = fe.SAMPLE_RATE_HZ) -> torch.Tensor:
    """The Slaney filter bank of the run-time front end as a float32 tensor [n_mels, n_fft // 2 + 1]."""
    return torch.from_numpy(np.ascontiguousarray(fe.mel_filter_bank(n_mels, n_fft, sample_rate_hz)))


def log_mel_torch(
    audio: torch.Tensor,
    n_mels: int,
    *,
    n_fft: int = fe.N_FFT,
    hop_length: int = fe.HOP_LENGTH,
    filters: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Whisper log-mel of 16 kHz audio, float32: [S] -> [n_mels, S // hop] or [B, S] -> [B, n_mels, S // hop]
    (batched: the ``max - 8`` floor is taken per example, as ``WhisperFeatureExtractor`` does)."""
    if audio.dim() not in (1, 2):
        raise ValueError(f"audio: expected shape [S] or [B, S], got {tuple(audio.shape)}")
    audio = audio.to(torch.float32)
    if filters is None:
        filters = mel_filters_torch(n_mels, n_fft)
    window = torch.hann_window(n_fft, device=audio.device)
    stft = torch.stft(audio, n_fft, hop_length, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    mel_spec = filters.to(audio.device, torch.float32) @ magnitudes
    log_spec = torch.clamp(mel_spec, min=fe.LOG_MEL_CLAMP).log10()
    if log_spec.dim() == 3:
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
    else:
        peak = log_spec.max()
    log_spec = torch.maximum(log_spec, peak - fe.LOG_MEL_DYNAMIC_RANGE)
    return (log_spec + fe.LOG_MEL_OFFSET) / fe.LOG_MEL_SCALE
