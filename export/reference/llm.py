"""PyTorch reference of the Kimi-Audio dual-head LLM (`MoonshotKimiaForCausalLM`, reference §1.5, §2.1-§2.5).

Module names equal the checkpoint keys (`model.embed_tokens`, `model.layers.i.*`, `model.mimo_layers.j.*`,
`model.norm`, `model.mimo_norm`, `model.vq_adaptor.layers.{0,3,4}`, `lm_head`, `mimo_output`). CPU / SDPA:

- Qwen2 decoder layers (RMSNorm computed in fp32 then `weight * x.to(dtype)`, q/k/v bias, no o bias, SiLU-GLU MLP),
  GQA (query head h reads KV head h // groups), NeoX (rotate-half) RoPE with `rope_theta` from config.json;
  cos/sin computed in fp32 and rounded to the model dtype, as the official bf16 cache is.
- attention = softmax(q k^T / sqrt(head_dim)) v with a causal mask aligned bottom-right (the query block is the last
  rows of the key sequence), math in fp32 and cast back (as the fixtures' flash-attn stub; CUDA flash-attn in bf16
  rounds differently).
- fork: the MIMO stack starts from the output of main layer `kimia_mimo_transformer_from_layer_index`;
  text logits = lm_head(norm(main output)), audio logits = mimo_output(mimo_norm(MIMO output)).
- input embedding (official `MoonshotKimiaModel.forward`): audio_emb = E[audio ids]; with features,
  at continuous positions audio_emb = (audio_emb + vq_adaptor(feature)) * sqrt(2) where sqrt(2) is computed in the
  model dtype (bf16: 1.4140625); then + E[text ids] unless the text ids sum to 0 (a decode step whose text id is 0
  skips the text embedding — official quirk, reproduced).
- KV cache: one (k, v) per layer, main then MIMO, post-RoPE, [1, kv_heads, S, head_dim].
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kimia_edge.runtime.llm_config import KimiaConfig

__all__ = ["MoonshotKimia", "KimiaModel", "DecoderLayer", "RMSNorm", "VQAdaptor", "KVCache", "KimiaOutput",
           "continuous_feature_scale", "rope_cos_sin", "IGNORED_CHECKPOINT_KEYS", "CONTINUOUS_FEATURE_SCALE_SQUARED"]

# The stored `*.rotary_emb.inv_freq` (34 tensors in the official index) is recomputed from rope_theta: ignored.
IGNORED_CHECKPOINT_KEYS = ("*.rotary_emb.inv_freq",)
# Official: `torch.sqrt(torch.tensor(2.0, dtype=whisper_emb.dtype))` multiplies (audio_emb + adaptor) at
# continuous positions; the square root is taken in the model dtype (bf16 -> 1.4140625, fp32 -> 1.4142135).
CONTINUOUS_FEATURE_SCALE_SQUARED = 2.0


def continuous_feature_scale(dtype: torch.dtype) -> torch.Tensor:
    """sqrt(2) computed in ``dtype`` (0-dim tensor), exactly as the official forward does."""
    return torch.sqrt(torch.tensor(CONTINUOUS_FEATURE_SCALE_SQUARED, dtype=dtype))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] for integer ``positions`` [T]: fp32 `inv_freq = 1/theta^(2i/d)`, angles
    `pos * inv_freq` duplicated over both halves (NeoX layout), rounded to ``dtype``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    """Qwen2RMSNorm: x * rsqrt(mean(x^2) + eps) in fp32, cast back, times weight."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: KimiaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.theta = cfg.rope_theta
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                past: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.theta, x.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        s = k.shape[2]
        groups = self.n_heads // self.n_kv
        kf = k.repeat_interleave(groups, dim=1).float()
        vf = v.repeat_interleave(groups, dim=1).float()
        mask = None
        if t > 1:  # bottom-right causal: query row r sits at key position r + (s - t)
            mask = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
        out = F.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=mask).to(x.dtype)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: KimiaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm Qwen2 layer (identical for main and MIMO stacks)."""

    def __init__(self, cfg: KimiaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                past: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.self_attn(self.input_layernorm(x), positions, past)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class VQAdaptor(nn.Module):
    """Continuous-feature adaptor: layers = (0 Linear D->H, 1 SiLU, 2 Dropout(0), 3 Linear H->H, 4 LayerNorm(eps=rms_norm_eps))."""

    def __init__(self, cfg: KimiaConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.kimia_adaptor_input_dim, cfg.hidden_size, bias=True),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True),
            nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class KVCache:
    """Per-layer (k, v) post-RoPE, [1, kv_heads, S, head_dim]; index = main layer i or num_hidden_layers + j."""

    def __init__(self, n_layers: int) -> None:
        self.layers: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * n_layers

    @property
    def length(self) -> int:
        """Cached positions."""
        first = self.layers[0]
        return 0 if first is None else int(first[0].shape[2])


class KimiaOutput(NamedTuple):
    """text_logits / audio_logits: [1, T, V] (T = 1 with last_only)."""

    text_logits: torch.Tensor
    audio_logits: torch.Tensor


class KimiaModel(nn.Module):
    """`model.*`: embeddings, both stacks, both final norms, the VQ adaptor."""

    def __init__(self, cfg: KimiaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mimo_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.kimia_mimo_layers))
        self.mimo_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.use_whisper_feature:
            self.vq_adaptor = VQAdaptor(cfg)

    def embed_inputs(self, audio_ids: torch.Tensor, text_ids: torch.Tensor, features: Optional[torch.Tensor],
                     continuous_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """[1, T, H] input embeddings. features: [n, D] rows for the n True positions of continuous_mask [1, T]."""
        audio_emb = self.embed_tokens(audio_ids)
        if features is not None:
            if not self.cfg.use_whisper_feature:
                raise ValueError("features given but config.use_whisper_feature is false")
            if continuous_mask is None:
                raise ValueError("features need continuous_mask")
            mask = continuous_mask.to(torch.bool)
            n = int(mask.sum())
            if features.shape[0] != n or features.shape[-1] != self.cfg.kimia_adaptor_input_dim:
                raise ValueError(f"features: expected [{n}, {self.cfg.kimia_adaptor_input_dim}], got {tuple(features.shape)}")
            dtype = audio_emb.dtype
            w = self.vq_adaptor(features.to(dtype))
            scale = continuous_feature_scale(dtype)
            audio_emb = audio_emb.clone()
            audio_emb[mask] = (audio_emb[mask] + w) * scale
        if int(text_ids.sum()) != 0:
            return audio_emb + self.embed_tokens(text_ids)
        return audio_emb

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                cache: Optional[KVCache]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(main output), mimo_norm(MIMO output)), each [1, T, H]; updates ``cache`` if given."""
        h = inputs_embeds
        n_main = len(self.layers)
        fork = self.cfg.kimia_mimo_transformer_from_layer_index
        m = None
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, positions, cache.layers[i] if cache is not None else None)
            if cache is not None:
                cache.layers[i] = kv
            if i == fork:
                m = h
        for j, layer in enumerate(self.mimo_layers):
            m, kv = layer(m, positions, cache.layers[n_main + j] if cache is not None else None)
            if cache is not None:
                cache.layers[n_main + j] = kv
        return self.norm(h), self.mimo_norm(m)


class MoonshotKimia(nn.Module):
    """`MoonshotKimiaForCausalLM` for inference: `model`, `lm_head` (text head), `mimo_output` (audio head)."""

    def __init__(self, cfg: KimiaConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.model = KimiaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mimo_output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self) -> KVCache:
        """Empty KV cache for both stacks."""
        return KVCache(self.config.num_kv_cache_layers)

    @torch.no_grad()
    def forward(self, audio_ids: torch.Tensor, text_ids: torch.Tensor, *, features: Optional[torch.Tensor] = None,
                continuous_mask: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, last_only: bool = False) -> KimiaOutput:
        """audio_ids / text_ids: [1, T] int64. positions: [T] (default: cache length + arange(T)).
        Returns both heads' logits in the model dtype."""
        if audio_ids.shape != text_ids.shape or audio_ids.dim() != 2 or audio_ids.shape[0] != 1:
            raise ValueError(f"expected audio_ids and text_ids of shape [1, T], got {tuple(audio_ids.shape)} "
                             f"and {tuple(text_ids.shape)}")
        t = audio_ids.shape[1]
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + t)
        x = self.model.embed_inputs(audio_ids, text_ids, features, continuous_mask)
        text_h, audio_h = self.model(x, positions, cache)
        if last_only:
            text_h, audio_h = text_h[:, -1:], audio_h[:, -1:]
        return KimiaOutput(self.lm_head(text_h), self.mimo_output(audio_h))
