"""GLM-4-Voice ``WhisperVQEncoder`` (the discrete semantic tokenizer, reference §1.1) and its plug into the host logic.

Names and math follow THUDM/GLM-4-Voice speech_tokenizer/modeling_whisper.py (``WhisperVQEncoder``,
``CausalConv1d``, ``get_block_causal_attention_mask``, ``vector_quantize``). Runs in fp32 like the official
tokenizer; the distance + argmin always run in fp32. The batching front end of speech_tokenizer/utils.py
(``extract_speech_token``: segmentation, padding, log-mel, frame masks, kept positions) is the runtime's host logic
(``kimia_edge.runtime.audio_tokenizer``); ``vq_ids_fn`` plugs this module into it.

State dict (``THUDM/glm-4-voice-tokenizer/model.safetensors``, bare keys): ``conv1.*``, ``conv2.*``,
``embed_positions.weight``, ``layers.{i}.*`` for the ``quantize_position`` layers that exist, ``codebook.weight``,
``embed_positions2.weight`` (added to the quantized vectors to form ``last_hidden_state``), and — when
``quantize_ema_decay`` is set — the persistent buffers ``ema_count`` / ``ema_weight``. Those two are registered
buffers of the official module (``register_buffer`` in ``init_quantize_layer``), only updated in training; they are
kept here as buffers too, so the checkpoint loads with exactly the official key set and nothing is silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kimia_edge.export.reference.whisper_encoder import WhisperEncoderLayer
from kimia_edge.runtime import frontend as fe
from kimia_edge.runtime.audio_encoder_config import (
    CONV1_STRIDE,
    CONV2_STRIDE,
    CONV_KERNEL_SIZE,
    LAYER_NORM_EPS,
    VQEncoderConfig,
)
from kimia_edge.runtime.audio_tokenizer import MAX_BATCH_SEGMENTS, VQIdsFn, semantic_ids

__all__ = [
    "CausalConv1d",
    "WhisperVQEncoder",
    "VQOutput",
    "block_causal_mask",
    "padding_mask",
    "vector_quantize",
    "vq_ids_fn",
    "extract_speech_token",
    "tokenize_file",
]

_CONV_PADDING = 1  # non-causal convs: nn.Conv1d(..., kernel_size=3, padding=1)


class CausalConv1d(nn.Conv1d):
    """Conv1d with ``dilation * (kernel - 1)`` zeros on the left only (no right padding): [B, C, T] -> [B, C', ceil]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        self.left_padding = self.dilation[0] * (kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_padding, 0)))


def padding_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key-padding mask [B, T] (1 = valid) -> additive [B, 1, 1, T] (HF ``get_extended_attention_mask``)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def block_causal_mask(mask: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Block-causal + key-padding mask: query i sees keys j <= i and every key of its own ``block_size`` block, and
    only valid keys. [B, T] (1 = valid) -> additive [B, 1, T, T] (``get_block_causal_attention_mask``)."""
    t = mask.shape[1]
    pos = torch.arange(t, device=mask.device)
    causal = pos[None, :] <= pos[:, None]
    same_block = (pos[:, None] // block_size) == (pos[None, :] // block_size)
    allowed = (causal | same_block)[None] & mask.bool()[:, None, :]
    return ((1.0 - allowed.to(dtype)) * torch.finfo(dtype).min).unsqueeze(1)


def vector_quantize(hidden: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest codebook row by squared L2, computed in fp32 exactly as the official ``vector_quantize``:
    ``argmin(|c|^2 + |h|^2 - 2 h.c)`` through one ``addmm``. hidden [..., d], codebook [V, d] -> ids [...] int64."""
    d = codebook.shape[1]
    flat = hidden.reshape(-1, d).float()
    codebook = codebook.float()
    codebook_sq = torch.sum(codebook ** 2, dim=1)
    hidden_sq = torch.sum(flat ** 2, dim=1, keepdim=True)
    distances = torch.addmm(codebook_sq + hidden_sq, flat, codebook.t(), alpha=-2.0, beta=1.0)
    _, ids = torch.min(distances, dim=1)
    return ids.reshape(hidden.shape[:-1])


@dataclass(frozen=True)
class VQOutput:
    """Outputs at the token rate (12.5 Hz for GLM-4-Voice): ``token_ids`` [B, T'] int64 (all positions, padding
    included), ``mask`` [B, T'] (1 = position of real audio), ``pooled_pre_vq`` [B, T', d] (VQ input),
    ``last_hidden_state`` [B, T', d] (codebook rows + embed_positions2, or later layers / layer_norm if present)."""

    token_ids: torch.Tensor
    mask: torch.Tensor
    pooled_pre_vq: torch.Tensor
    last_hidden_state: torch.Tensor


class WhisperVQEncoder(nn.Module):
    """mel [B, n_mels, T] (100 Hz, T a multiple of 2) + frame mask [B, T] -> ``VQOutput``."""

    def __init__(self, cfg: VQEncoderConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.encoder_causal_convolution:
            self.conv1 = CausalConv1d(cfg.num_mel_bins, d, CONV_KERNEL_SIZE, stride=CONV1_STRIDE)
            self.conv2 = CausalConv1d(d, d, CONV_KERNEL_SIZE, stride=CONV2_STRIDE)
        else:
            self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, CONV_KERNEL_SIZE, stride=CONV1_STRIDE, padding=_CONV_PADDING)
            self.conv2 = nn.Conv1d(d, d, CONV_KERNEL_SIZE, stride=CONV2_STRIDE, padding=_CONV_PADDING)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(
            WhisperEncoderLayer(d, cfg.encoder_attention_heads, cfg.encoder_ffn_dim, cfg.activation_function)
            for _ in range(cfg.n_layers_built)
        )
        self.layer_norm = None if cfg.quantize_encoder_only else nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.codebook = nn.Embedding(cfg.quantize_vocab_size, d)
        self.embed_positions2 = nn.Embedding(cfg.max_pooled_positions, d)
        if cfg.quantize_ema_decay is not None:
            self.register_buffer("ema_count", torch.ones(cfg.quantize_vocab_size))
            self.register_buffer("ema_weight", torch.zeros(cfg.quantize_vocab_size, d))

    def _mask(self, valid: torch.Tensor, block: Optional[int]) -> Optional[torch.Tensor]:
        if self.cfg.layers_causal:
            return None  # causal layers get attention_mask=None and SDPA is_causal (WhisperVQEncoderLayer)
        dtype = self.embed_positions.weight.dtype
        return padding_mask(valid, dtype) if block is None else block_causal_mask(valid, block, dtype)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        k = self.cfg.pool
        x = x.permute(0, 2, 1)
        if x.shape[-1] % k:
            x = F.pad(x, (0, k - x.shape[-1] % k))
        x = F.avg_pool1d(x, k) if self.cfg.pooling_type == "avg" else F.max_pool1d(x, k)
        return x.permute(0, 2, 1)

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor) -> VQOutput:
        cfg = self.cfg
        conv_stride = CONV1_STRIDE * CONV2_STRIDE
        b, n_mels, t = input_features.shape
        if n_mels != cfg.num_mel_bins or t % conv_stride:
            raise ValueError(f"input_features: expected [B, {cfg.num_mel_bins}, T] with T a multiple of "
                             f"{conv_stride}, got {tuple(input_features.shape)}")
        if tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask: expected shape {(b, t)}, got {tuple(attention_mask.shape)}")
        if t // conv_stride > cfg.max_source_positions:
            raise ValueError(f"input_features: expected at most {cfg.max_source_positions * conv_stride} frames, "
                             f"got {t}")
        valid = attention_mask[:, ::conv_stride]
        block = cfg.quantize_causal_block_size
        mask = self._mask(valid, block)
        x = F.gelu(self.conv1(input_features))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.embed_positions.weight[: t // conv_stride]
        pooled_pre_vq = token_ids = None
        for idx, layer in enumerate(self.layers):
            x = layer(x, mask, is_causal=cfg.layers_causal)
            if idx + 1 == cfg.pooling_position and cfg.pooling_kernel_size is not None:
                x = self._pool(x)
                valid = valid[:, :: cfg.pooling_kernel_size]
                mask = self._mask(valid, None if block is None else block // cfg.pooling_kernel_size)
            if idx + 1 == cfg.quantize_position:
                pooled_pre_vq = x
                token_ids = vector_quantize(x, self.codebook.weight)
                x = self.codebook.weight[token_ids].to(x.dtype) + self.embed_positions2.weight[: x.shape[1]]
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return VQOutput(token_ids=token_ids, mask=valid, pooled_pre_vq=pooled_pre_vq, last_hidden_state=x)


def vq_ids_fn(model: WhisperVQEncoder) -> VQIdsFn:
    """The module as the runtime host logic's VQ network (``runtime.audio_tokenizer.VQIdsFn``): (mel [B, n_mels, T]
    float32, frame mask [B, T] int32) -> ids [B, T / 8] int64 from the module's own forward (the official fp32
    ``vector_quantize`` at every position), on the module's device."""
    device = model.embed_positions.weight.device

    @torch.no_grad()
    def run(mel: np.ndarray, frame_mask: np.ndarray) -> np.ndarray:
        out = model(torch.from_numpy(mel).to(device), torch.from_numpy(frame_mask).to(device))
        return out.token_ids.cpu().numpy()

    return run


def extract_speech_token(model: WhisperVQEncoder, utterances: Sequence[np.ndarray],
                         batch_size: int = MAX_BATCH_SEGMENTS) -> List[List[int]]:
    """``extract_speech_token``: 16 kHz mono utterances [S_i] -> one id list per utterance, through the runtime's
    host logic (``runtime.audio_tokenizer.semantic_ids``: 30 s segments of all utterances batched ``batch_size``
    at a time, padding per batch to a multiple of 1280 samples, log-mel, frame mask, kept positions) with this
    module as the network."""
    return [ids.tolist() for ids in semantic_ids(vq_ids_fn(model), utterances, model.cfg, batch_size)]


def tokenize_file(model: WhisperVQEncoder, path: Union[str, Path]) -> List[int]:
    """``Glm4Tokenizer.tokenize(audio_path=...)``: file -> 16 kHz mono -> ids (without Kimi's +152064 offset)."""
    samples, sr = fe.load_audio(path)
    return extract_speech_token(model, [fe.to_16k_mono(samples, sr)])[0]
