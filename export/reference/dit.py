"""PyTorch reference of Kimi-Audio's flow-matching DiT (``DiTPrefix``), checkpoint-compatible and export-friendly.

Module names follow kimia_infer/models/detokenizer/flow_matching/{model.py, dit_block.py}, so the stripped
``speech_model.*`` keys of ``audio_detokenizer/model.pt`` load strictly: ``t_embedder.mlp.{0,2}``,
``semantic_token_embedding``, ``input_linear``, ``blocks.{i}.attn.{qkv,proj}``, ``blocks.{i}.mlp.{fc1,fc2}``,
``blocks.{i}.adaLN_modulation.1``, ``final_layer.{linear,adaLN_modulation.1}`` (+ ``position_embedding`` when
``position_embedding_type == "learnable"``).

Differences from the official graph, all numerically neutral in fp32: RoPE is applied with real arithmetic on
interleaved pairs (2i, 2i+1) instead of ``view_as_complex`` (ONNX has no complex ops); attention is
``scaled_dot_product_attention`` over [prefix K/V ‖ chunk K/V] (non-causal, default scale) instead of flash-attn
varlen; the KV cache is explicit input/output instead of a Python dict. One call of :meth:`DiT.step` is one network
evaluation of the ODE (or the priming pass); the streaming logic lives in ``kimia_edge.runtime.detokenizer``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kimia_edge.runtime.dit_config import LAYER_NORM_EPS, TIMESTEP_FREQUENCY_DIM, TIMESTEP_MAX_PERIOD, DitConfig

__all__ = ["DiT", "DiTBlock", "FinalLayer", "TimestepEmbedder", "TorchDitStep", "build_dit", "rope_tables",
           "apply_rope", "per_frame", "PrefixKV"]

# timm Mlp in the official DiTBlock: act_layer = nn.GELU(approximate="tanh") (dit_block.py "approx_gelu").
_GELU_APPROXIMATE = "tanh"
# adaLN modulation chunk counts: 6 per block (shift/scale/gate for attention and MLP), 2 in the final layer
# (shift first, then scale) (dit_block.py).
_BLOCK_MODULATIONS = 6
_FINAL_MODULATIONS = 2

PrefixKV = Union[torch.Tensor, Sequence[torch.Tensor]]


# ---- RoPE ---------------------------------------------------------------------------------------------------------
def rope_tables(cfg: DitConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables [cfg.max_positions, head_dim // 2] float32, rows indexed by absolute frame position.

    Same arithmetic as the official ``precompute_freqs_cis``: inv_freq = 1 / base^(arange(0, d, 2) / d) in fp32,
    angle = (position / interpolation_factor) · inv_freq in fp32; rows truncated to min(max_position_embeddings,
    max_seq_len).
    """
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    positions = torch.arange(cfg.rope_max_position_embeddings).float()
    positions *= 1.0 / float(cfg.rope_interpolation_factor)
    angles = torch.outer(positions, inv_freq).float()[: cfg.max_positions]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x[2i], x[2i+1]) of ``x`` [B, H, T, D] by the angles whose cos / sin are
    [B, 1, T, D/2] — the complex product (x0 + i·x1)·(cos + i·sin) of the official code, in real arithmetic."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# ---- modules (names = checkpoint keys) ----------------------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    """Integer timestep t_int [B] -> [B, hidden]: sinusoid [cos | sin] of dim 256 (max period 1e4), then
    Linear-SiLU-Linear (``t_embedder.mlp.{0,2}``)."""

    def __init__(self, hidden_size: int, frequency_dim: int = TIMESTEP_FREQUENCY_DIM) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(TIMESTEP_MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device)
                          / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """``attn.qkv`` (rows laid out [q (H×D) | k | v]) and ``attn.proj``; non-causal attention over
    [prefix ‖ chunk]."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                prefix_k: Optional[torch.Tensor], prefix_v: Optional[torch.Tensor],
                attn_mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                     # [B, H, T, D]
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys = k if prefix_k is None else torch.cat([prefix_k, k], dim=2)
        values = v if prefix_v is None else torch.cat([prefix_v, v], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj(out), k, v


class Mlp(nn.Module):
    """timm ``Mlp``: ``fc1`` -> GELU(tanh) -> ``fc2`` (dropout 0, no norm)."""

    def __init__(self, hidden_size: int, mlp_hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size)
        self.act = nn.GELU(approximate=_GELU_APPROXIMATE)
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def per_frame(rows: torch.Tensor, group: int, frames: int) -> torch.Tensor:
    """[B, G, C] rows, one per aligned group of ``group`` frames -> [B, frames, C]: each row copied to its group's
    frames (the last group may be partial). Copies, no arithmetic: exact. One gather (frame f takes row f // group):
    in ONNX one copy, where expand + reshape + slice made two."""
    if group == 1:
        return rows
    return rows.index_select(1, torch.arange(frames, device=rows.device) // group)


def _norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, eps 1e-6 (norm1 / norm2 / norm_final)."""
    return F.layer_norm(x, (x.shape[-1],), eps=LAYER_NORM_EPS)


class DiTBlock(nn.Module):
    """adaLN-Zero block: ``adaLN_modulation.1`` gives shift/scale/gate for attention and MLP from SiLU(c)."""

    def __init__(self, cfg: DitConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.mlp = Mlp(cfg.hidden_size, cfg.mlp_hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(),
                                              nn.Linear(cfg.hidden_size, _BLOCK_MODULATIONS * cfg.hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos, sin, prefix_k, prefix_v, attn_mask, group: int = 1):
        """``c``: the condition per frame [B, T, d], or per aligned group of ``group`` frames [B, ceil(T/group), d]
        (the modulation is then computed per group and copied to its frames)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            per_frame(self.adaLN_modulation(c), group, x.shape[1]).chunk(_BLOCK_MODULATIONS, dim=2)
        h, k, v = self.attn(_modulate(_norm(x), shift_msa, scale_msa), cos, sin, prefix_k, prefix_v, attn_mask)
        x = x + gate_msa * h
        x = x + gate_mlp * self.mlp(_modulate(_norm(x), shift_mlp, scale_mlp))
        return x, k, v


class FinalLayer(nn.Module):
    """``final_layer``: shift, scale = adaLN_modulation(c) (shift first); linear(LN(x)·(1+scale)+shift)."""

    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(),
                                              nn.Linear(hidden_size, _FINAL_MODULATIONS * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, group: int = 1) -> torch.Tensor:
        shift, scale = per_frame(self.adaLN_modulation(c), group, x.shape[1]).chunk(_FINAL_MODULATIONS, dim=2)
        return self.linear(_modulate(_norm(x), shift, scale))


class DiT(nn.Module):
    """The flow-matching DiT: noisy normalised mel x_t [1, T, 80] + integer time + 50 Hz semantic ids + absolute
    frame positions (+ cached prefix K/V) -> velocity [1, T, 80] and this chunk's post-RoPE K/V per layer."""

    def __init__(self, cfg: DitConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.position_embedding_type == "sincos":
            # The official sincos module ignores the position values (cumsum of non-zero ids); the real config is
            # "skip" per the third-party loaders (reference doc §3.1). Not implemented rather than guessed.
            raise NotImplementedError("position_embedding_type 'sincos' is not implemented (expected 'skip' or "
                                      "'learnable')")
        self.cfg = cfg
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.semantic_token_embedding = nn.Embedding(cfg.embedding_rows, cfg.hidden_size)
        self.input_linear = nn.Linear(cfg.input_size, cfg.hidden_size)
        if cfg.position_embedding_type == "learnable":
            self.position_embedding = nn.Embedding(cfg.max_seq_len + 1, cfg.hidden_size)
        else:
            self.position_embedding = None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.output_size)
        if cfg.use_rope:
            cos, sin = rope_tables(cfg)
            # Derived from the config, not stored in the checkpoint (the official table is a plain attribute).
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = None
            self.rope_sin = None

    def step(
        self,
        x_t: torch.Tensor,
        t_int: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        prefix_k: Optional[PrefixKV] = None,
        prefix_v: Optional[PrefixKV] = None,
        prefix_mask: Optional[torch.Tensor] = None,
        token_frames: int = 1,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One network evaluation.

        x_t [1, T, input_size] normalised mel; t_int [1] int64 (= floor(t·1000)); tokens [1, T] int64 50 Hz
        semantic ids; positions [1, T] int64 absolute frame positions; prefix_k / prefix_v cached post-RoPE K/V,
        [depth, 1, heads, P, head_dim] or a list of depth [1, heads, P, head_dim] (P may be 0, None = no prefix);
        prefix_mask [1, P] bool, True = valid (for a padded fixed-size prefix; None = all valid).
        token_frames: the frames of one semantic token when ``tokens`` holds one id per aligned group of that many
        frames (the detokenizer repeats each 12.5 Hz id x4): the condition c = t_emb + embedding(id) — nothing else
        in it varies per frame (positions enter through RoPE and the input side only) — and its adaLN modulation
        (a third of the per-frame FLOPs) are then computed once per group and copied to its frames. Exact for such
        tokens (the same rows, computed by fewer GEMM rows: equal up to fp32 rounding); wrong for any other.
        Returns (velocity [1, T, input_size], k, v of this chunk [depth, 1, heads, T, head_dim]).
        """
        cfg = self.cfg
        if x_t.dim() != 3 or x_t.shape[-1] != cfg.input_size:
            raise ValueError(f"x_t: expected [B, T, {cfg.input_size}], got {list(x_t.shape)}")
        if tokens.shape != x_t.shape[:2] or positions.shape != x_t.shape[:2]:
            raise ValueError(f"tokens / positions: expected {list(x_t.shape[:2])}, got {list(tokens.shape)} / "
                             f"{list(positions.shape)}")
        prefix_k = self._layers(prefix_k, "prefix_k")
        prefix_v = self._layers(prefix_v, "prefix_v")
        attn_mask = None
        if prefix_mask is not None:
            if prefix_k is None:
                raise ValueError("prefix_mask: given without prefix_k")
            n = x_t.shape[1]
            valid = torch.cat([prefix_mask.to(torch.bool),
                               torch.ones(prefix_mask.shape[0], n, dtype=torch.bool, device=x_t.device)], dim=1)
            # Additive float mask [B, 1, 1, P + T], broadcast over heads and queries; made once for all layers. The
            # same softmax as a boolean mask (every row keeps its chunk keys, so none is all -inf), but SDPA with a
            # boolean mask exports with a NaN guard (Where + IsNaN) per layer: ~12 % of the ONNX step on CPU.
            attn_mask = torch.zeros(valid.shape, dtype=x_t.dtype, device=x_t.device) \
                .masked_fill(~valid, float("-inf"))[:, None, None, :]

        if token_frames < 1:
            raise ValueError(f"token_frames: expected >= 1, got {token_frames}")
        group_ids = tokens if token_frames == 1 else tokens[:, ::token_frames]
        c = self.t_embedder(t_int)[:, None, :] + self.semantic_token_embedding(group_ids)
        x = self.input_linear(x_t)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        cos = sin = None
        if self.rope_cos is not None:
            cos = self.rope_cos[positions][:, None]          # [B, 1, T, D/2]
            sin = self.rope_sin[positions][:, None]
        ks: List[torch.Tensor] = []
        vs: List[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            pk = None if prefix_k is None else prefix_k[i]
            pv = None if prefix_v is None else prefix_v[i]
            x, k, v = block(x, c, cos, sin, pk, pv, attn_mask, token_frames)
            ks.append(k)
            vs.append(v)
        return self.final_layer(x, c, token_frames), torch.stack(ks), torch.stack(vs)

    forward = step

    def _layers(self, prefix: Optional[PrefixKV], name: str) -> Optional[Sequence[torch.Tensor]]:
        if prefix is None:
            return None
        depth = self.cfg.depth
        if len(prefix) != depth:
            raise ValueError(f"{name}: expected {depth} layers, got {len(prefix)}")
        return prefix

    def empty_prefix(self) -> torch.Tensor:
        """An empty K or V prefix [depth, 1, heads, 0, head_dim]."""
        cfg = self.cfg
        return torch.zeros(cfg.depth, 1, cfg.num_heads, 0, cfg.head_dim,
                           dtype=self.input_linear.weight.dtype, device=self.input_linear.weight.device)


def build_dit(cfg: DitConfig, device: Optional[Union[str, torch.device]] = None) -> DiT:
    """Constructs the DiT (optionally on ``device``, e.g. "meta" to list shapes without allocating)."""
    if device is None:
        return DiT(cfg)
    with torch.device(device):
        return DiT(cfg)


class TorchDitStep:
    """Plugs the torch :class:`DiT` into the numpy streaming state machine: a callable with the signature of
    ``kimia_edge.runtime.detokenizer.DitStep`` (numpy in, numpy out, float32)."""

    def __init__(self, model: DiT) -> None:
        self.model = model.eval()
        self._dtype = model.input_linear.weight.dtype

    @torch.inference_mode()
    def __call__(self, x_t: np.ndarray, t_int: np.ndarray, tokens: np.ndarray, positions: np.ndarray,
                 prefix_k: np.ndarray, prefix_v: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        pk = torch.from_numpy(np.ascontiguousarray(prefix_k)).to(self._dtype)
        pv = torch.from_numpy(np.ascontiguousarray(prefix_v)).to(self._dtype)
        vel, k, v = self.model.step(
            torch.from_numpy(np.ascontiguousarray(x_t)).to(self._dtype),
            torch.from_numpy(np.asarray(t_int, dtype=np.int64)),
            torch.from_numpy(np.asarray(tokens, dtype=np.int64)),
            torch.from_numpy(np.asarray(positions, dtype=np.int64)),
            pk if pk.shape[3] else None,
            pv if pv.shape[3] else None,
        )
        return (vel.float().numpy(), k.float().numpy(), v.float().numpy())
