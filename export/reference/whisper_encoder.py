"""Whisper-large-v3 encoder as Kimi-Audio runs it (reference §1.2), and its plug into the continuous-feature path.

Module and state-dict names follow kimia_infer/models/tokenizer/whisper_Lv3/modeling_whisper.py ``WhisperEncoder``:
``conv1`` / ``conv2`` (kernel 3, padding 1, stride 1 / 2, exact GELU after each), ``embed_positions`` (learned,
[max_source_positions, d_model], added in full: the input must be exactly 3000 mel frames), ``layers.{i}`` pre-LN
blocks (``self_attn.{q,v,out}_proj`` with bias, ``self_attn.k_proj`` without, ``self_attn_layer_norm``, ``fc1``,
``fc2``, ``final_layer_norm``) and the final ``layer_norm``. Attention is full (non-causal) SDPA with scale
``head_dim ** -0.5`` (official: flash-attn with the same scale).

Kimi loads ``WhisperModel.from_pretrained(<snapshot>/whisper-large-v3).encoder``; the mapping of the HF file's keys
to these names is ``export.snapshot.audio_encoders.encoder_state_dict``, the strict loader
``export.reference.loaders.load_whisper_encoder``. The Kimi feature path around the encoder (30 s segments, log-mel,
the 4·N-frame slice, the [4N, d] -> [N, 4d] reshape) is the runtime's host logic
(``kimia_edge.runtime.audio_tokenizer``); ``whisper_fn`` plugs this module into it.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kimia_edge.runtime.audio_encoder_config import (
    CONV1_STRIDE,
    CONV2_STRIDE,
    CONV_KERNEL_SIZE,
    LAYER_NORM_EPS,
    WhisperEncoderConfig,
)
from kimia_edge.runtime.audio_tokenizer import WhisperFn, whisper_features, whisper_frames

__all__ = [
    "WhisperAttention",
    "WhisperEncoderLayer",
    "WhisperEncoder",
    "activation",
    "whisper_fn",
    "tokenize_waveform",
    "extract_whisper_feat",
]

_CONV_PADDING = 1  # nn.Conv1d(..., kernel_size=3, padding=1) for both convs


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers ``ACT2FN[name]`` for the names the configs allow."""
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    if name in ("silu", "swish"):
        return F.silu
    raise ValueError(f"activation_function: unsupported {name!r}")


class WhisperAttention(nn.Module):
    """Multi-head self-attention, [B, T, d] -> [B, T, d]; q/v/out projections with bias, k without."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model {d_model}, got {n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=True)
        self.q_proj = nn.Linear(d_model, d_model, bias=True)
        self.out_proj = nn.Linear(d_model, d_model, bias=True)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """``attn_mask``: additive float [B, 1, T, T] (or None). ``is_causal``: plain causal mask instead."""
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
            attn_mask=attn_mask, is_causal=is_causal and attn_mask is None and t > 1,
            scale=self.head_dim ** -0.5,
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class WhisperEncoderLayer(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``h + fc2(act(fc1(ln2(h))))`` (shared with the GLM VQ encoder)."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, activation_function: str) -> None:
        super().__init__()
        self.self_attn = WhisperAttention(d_model, n_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.act = activation(activation_function)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        h = x + self.self_attn(self.self_attn_layer_norm(x), attn_mask, is_causal)
        return h + self.fc2(self.act(self.fc1(self.final_layer_norm(h))))


class WhisperEncoder(nn.Module):
    """Kimi's Whisper encoder: mel [B, 128, 3000] (100 Hz) -> last_hidden_state [B, 1500, d_model] (50 Hz)."""

    def __init__(self, cfg: WhisperEncoderConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, CONV_KERNEL_SIZE, stride=CONV1_STRIDE, padding=_CONV_PADDING)
        self.conv2 = nn.Conv1d(d, d, CONV_KERNEL_SIZE, stride=CONV2_STRIDE, padding=_CONV_PADDING)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(
            WhisperEncoderLayer(d, cfg.encoder_attention_heads, cfg.encoder_ffn_dim, cfg.activation_function)
            for _ in range(cfg.encoder_layers)
        )
        self.layer_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        expected = (self.cfg.num_mel_bins, self.cfg.n_input_frames)
        if input_features.dim() != 3 or tuple(input_features.shape[1:]) != expected:
            raise ValueError(f"input_features: expected shape [B, {expected[0]}, {expected[1]}], "
                             f"got {tuple(input_features.shape)}")
        x = F.gelu(self.conv1(input_features))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.embed_positions.weight  # embed_scale is computed but never applied by the official encoder
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


# ---- Kimi continuous-feature path (host logic: runtime.audio_tokenizer) ---------------------------------------------
def whisper_fn(encoder: WhisperEncoder) -> WhisperFn:
    """The module as the runtime host logic's Whisper network (``runtime.audio_tokenizer.WhisperFn``): mel
    [1, 128, 3000] float32 -> last hidden state [1, 1500, d] float32. The mel is cast to the module's dtype first,
    as whisper.py does (bf16 for Kimi); a bf16 output is widened to float32 exactly."""
    param = next(encoder.parameters())

    @torch.no_grad()
    def run(mel: np.ndarray) -> np.ndarray:
        return encoder(torch.from_numpy(mel).to(param.device, param.dtype)).float().cpu().numpy()

    return run


def _like_encoder(array: np.ndarray, encoder: WhisperEncoder) -> torch.Tensor:
    param = next(encoder.parameters())
    return torch.from_numpy(array)[None].to(param.device, param.dtype)  # exact: the values came from this dtype


def tokenize_waveform(encoder: WhisperEncoder, samples_16k: np.ndarray) -> torch.Tensor:
    """``WhisperEncoder.tokenize_waveform``: 16 kHz audio [S] -> [1, 4N, d] in the encoder's dtype (the first
    4 * token_len 50 Hz frames of each 30 s segment, concatenated; ``runtime.audio_tokenizer.whisper_frames``).
    N = sum over segments of ceil(len / 1280)."""
    return _like_encoder(whisper_frames(whisper_fn(encoder), samples_16k, encoder.cfg), encoder)


def extract_whisper_feat(encoder: WhisperEncoder, samples_16k: np.ndarray) -> torch.Tensor:
    """``KimiAPromptManager.extract_whisper_feat``: [1, 4N, d] -> [1, N, 4d] in the encoder's dtype, by a pure
    reshape (feature t = concat of 50 Hz frames 4t .. 4t+3; ``runtime.audio_tokenizer.whisper_features``)."""
    return _like_encoder(whisper_features(whisper_fn(encoder), samples_16k, encoder.cfg), encoder)
