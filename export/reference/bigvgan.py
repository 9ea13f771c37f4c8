"""PyTorch reference of the BigVGAN generator used as Kimi-Audio's vocoder (checkpoint-compatible).

Module tree and state-dict names follow the official ``kimia_infer/models/detokenizer/vocoder/bigvgan.py``
(NVIDIA BigVGAN v2 with the torch ``Activation1d``): ``conv_pre``, ``ups.{i}.0``, ``resblocks.{i*K+j}`` (flat,
K = len(resblock_kernel_sizes)), ``activation_post``, ``conv_post``. Convolutions hold the weight-norm pair
``weight_g`` / ``weight_v`` as loaded from ``vocoder/model.pt``; :meth:`BigVGAN.fold_weight_norm` turns them into
plain ``weight`` tensors for export. The anti-aliasing Kaiser-sinc filters are buffers read from the checkpoint.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from kimia_edge.runtime.vocoder_config import VocoderConfig

__all__ = [
    "BigVGAN",
    "AMPBlock1",
    "AMPBlock2",
    "Activation1d",
    "Snake",
    "SnakeBeta",
    "WeightNormConv1d",
    "WeightNormConvTranspose1d",
    "kaiser_sinc_filter1d",
    "anti_alias_filter",
    "build_bigvgan",
    "WEIGHT_NORM_DIM",
]

# ---- constants of the official code (not in config.json) --------------------------------------------------------
# conv_pre / conv_post: Conv1d(kernel 7, stride 1, padding 3)  (BigVGAN bigvgan.py).
PRE_POST_KERNEL_SIZE = 7
# weight_norm(...) is called with its default dim=0 on every conv, also on ConvTranspose1d, whose weight is
# [C_in, C_out, k]: the norm runs over dims (1, 2) per *input* channel, so weight_g is [C_in, 1, 1].
WEIGHT_NORM_DIM = 0
# Activation1d defaults: up_ratio = down_ratio = 2, up/down kernel_size = 12 (alias_free_activation/torch/act.py).
ANTI_ALIAS_RATIO = 2
ANTI_ALIAS_KERNEL_SIZE = 12
# Kaiser-sinc low-pass: cutoff = 0.5 / ratio, half_width = 0.6 / ratio (alias_free_activation/torch/resample.py).
ANTI_ALIAS_CUTOFF_TIMES_RATIO = 0.5
ANTI_ALIAS_HALF_WIDTH_TIMES_RATIO = 0.6
# Snake / SnakeBeta: x + 1/(b + 1e-9) * sin(a x)^2 ("no_div_by_zero", activations.py).
SNAKE_NO_DIV_BY_ZERO = 1e-9
# Anti-aliasing resamplers pad with edge values (F.pad mode "replicate"; ONNX Pad mode "edge").
ANTI_ALIAS_PAD_MODE = "replicate"


# ---- Kaiser-sinc filter (the values the official code stores as buffers) ----------------------------------------
def kaiser_sinc_filter1d(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """Windowed-sinc low-pass filter, [1, 1, kernel_size] float32, normalised to unit DC gain.

    ``cutoff`` and ``half_width`` are in cycles per sample (Nyquist = 0.5). The Kaiser β follows the classic
    attenuation formula (Kaiser 1974 as in julius / alias-free-torch): A = 2.285·(N/2 − 1)·π·4·half_width + 7.95 dB.
    Even sizes are centred between taps (t = −N/2+0.5 … N/2−0.5).
    """
    half = kernel_size // 2
    attenuation_db = 2.285 * (half - 1) * math.pi * (4.0 * half_width) + 7.95
    if attenuation_db > 50.0:
        beta = 0.1102 * (attenuation_db - 8.7)
    elif attenuation_db >= 21.0:
        beta = 0.5842 * (attenuation_db - 21.0) ** 0.4 + 0.07886 * (attenuation_db - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, periodic=False, beta=beta)
    if kernel_size % 2 == 0:
        t = torch.arange(-half, half) + 0.5
    else:
        t = torch.arange(kernel_size) - half
    if cutoff == 0:
        taps = torch.zeros_like(t)
    else:
        taps = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
        taps = taps / taps.sum()
    return taps.view(1, 1, kernel_size)


def anti_alias_filter(ratio: int = ANTI_ALIAS_RATIO, kernel_size: int = ANTI_ALIAS_KERNEL_SIZE) -> torch.Tensor:
    """The filter the official UpSample1d / DownSample1d register for ``ratio``: [1, 1, kernel_size] float32."""
    return kaiser_sinc_filter1d(
        ANTI_ALIAS_CUTOFF_TIMES_RATIO / ratio, ANTI_ALIAS_HALF_WIDTH_TIMES_RATIO / ratio, kernel_size
    )


# ---- weight-normed convolutions -----------------------------------------------------------------------------------
class _WeightNormConv(nn.Module):
    """Convolution stored as ``weight_g`` [C0, 1, 1] and ``weight_v`` (full shape), weight = g · v / ‖v‖ with the
    norm over every dim except 0 — the exact math of ``torch.nn.utils.weight_norm(dim=0)`` (same kernel,
    ``torch._weight_norm``), so outputs match the official module bit for bit."""

    transposed: bool = False

    def __init__(self, weight_shape: Sequence[int], *, bias: bool, stride: int, padding: int, dilation: int) -> None:
        super().__init__()
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        # Registration order bias, weight_g, weight_v = the official state-dict order (weight_norm re-registers the
        # weight after the conv's bias).
        self.bias = nn.Parameter(torch.zeros(self._out_channels(weight_shape))) if bias else None
        self.weight_g = nn.Parameter(torch.ones(weight_shape[0], 1, 1))
        self.weight_v = nn.Parameter(torch.empty(*weight_shape))
        nn.init.normal_(self.weight_v, 0.0, 1.0)

    def _out_channels(self, weight_shape: Sequence[int]) -> int:
        return weight_shape[1] if self.transposed else weight_shape[0]

    def folded_weight(self) -> torch.Tensor:
        """g · v / ‖v‖ (norm over dims ≠ 0), same shape as ``weight_v``."""
        return torch._weight_norm(self.weight_v, self.weight_g, WEIGHT_NORM_DIM)

    def folded(self) -> nn.Module:
        """A plain ``nn.Conv1d`` / ``nn.ConvTranspose1d`` with the folded weight (keys ``weight``, ``bias``)."""
        v = self.weight_v
        cls = nn.ConvTranspose1d if self.transposed else nn.Conv1d
        in_ch, out_ch = (v.shape[0], v.shape[1]) if self.transposed else (v.shape[1], v.shape[0])
        conv = cls(
            in_ch, out_ch, v.shape[2], stride=self.stride, padding=self.padding, dilation=self.dilation,
            bias=self.bias is not None, device=v.device, dtype=v.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.folded_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv


class WeightNormConv1d(_WeightNormConv):
    """Conv1d [C_out, C_in, k] in weight-norm form; input [B, C_in, T] -> [B, C_out, T'] ("same" when padded so)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, dilation: int = 1, bias: bool = True) -> None:
        super().__init__((out_channels, in_channels, kernel_size), bias=bias, stride=stride, padding=padding,
                         dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.folded_weight(), self.bias, self.stride, self.padding, self.dilation)


class WeightNormConvTranspose1d(_WeightNormConv):
    """ConvTranspose1d [C_in, C_out, k] in weight-norm form (g per *input* channel); [B, C_in, T] -> [B, C_out, T']."""

    transposed = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, bias: bool = True) -> None:
        super().__init__((in_channels, out_channels, kernel_size), bias=bias, stride=stride, padding=padding,
                         dilation=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.folded_weight(), self.bias, self.stride, self.padding)


def _fold_children(module: nn.Module) -> int:
    """Replaces every weight-normed conv below ``module`` by its plain folded conv; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, _WeightNormConv):
            setattr(module, name, child.folded())
            count += 1
        else:
            count += _fold_children(child)
    return count


# ---- activations ------------------------------------------------------------------------------------------------
def _square(x: torch.Tensor) -> torch.Tensor:
    """x² as one multiply: bit-identical to the official ``pow(x, 2)`` in fp32, and exported as Mul instead of
    ONNX Pow (which ONNX Runtime evaluates as a general power on CPU)."""
    return x * x


class Snake(nn.Module):
    """x + 1/(α + ε) · sin²(α x), per channel; α stored as log α when ``logscale``. [B, C, T] -> [B, C, T]."""

    def __init__(self, channels: int, logscale: bool) -> None:
        super().__init__()
        self.logscale = logscale
        self.alpha = nn.Parameter(torch.zeros(channels) if logscale else torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.unsqueeze(0).unsqueeze(-1)
        if self.logscale:
            alpha = torch.exp(alpha)
        return x + (1.0 / (alpha + SNAKE_NO_DIV_BY_ZERO)) * _square(torch.sin(x * alpha))


class SnakeBeta(nn.Module):
    """x + 1/(β + ε) · sin²(α x), per channel; α, β stored as logs when ``logscale``. [B, C, T] -> [B, C, T]."""

    def __init__(self, channels: int, logscale: bool) -> None:
        super().__init__()
        self.logscale = logscale
        init = torch.zeros(channels) if logscale else torch.ones(channels)
        self.alpha = nn.Parameter(init.clone())
        self.beta = nn.Parameter(init.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.unsqueeze(0).unsqueeze(-1)
        beta = self.beta.unsqueeze(0).unsqueeze(-1)
        if self.logscale:
            alpha = torch.exp(alpha)
            beta = torch.exp(beta)
        return x + (1.0 / (beta + SNAKE_NO_DIV_BY_ZERO)) * _square(torch.sin(x * alpha))


def _make_activation(cfg: VocoderConfig, channels: int) -> nn.Module:
    if cfg.activation == "snakebeta":
        return SnakeBeta(channels, cfg.snake_logscale)
    if cfg.activation == "snake":
        return Snake(channels, cfg.snake_logscale)
    raise ValueError(f"activation: expected 'snake' or 'snakebeta', got {cfg.activation!r}")


# ---- anti-aliased activation ----------------------------------------------------------------------------------
class UpSample1d(nn.Module):
    """×ratio up-sampling: replicate-pad, zero-stuffing transposed conv with the low-pass ``filter`` [1, 1, k]
    (gain ×ratio), crop. [B, C, T] -> [B, C, ratio·T]."""

    def __init__(self, ratio: int = ANTI_ALIAS_RATIO, kernel_size: int = ANTI_ALIAS_KERNEL_SIZE) -> None:
        super().__init__()
        self.ratio = ratio
        self.pad = kernel_size // ratio - 1
        self.crop_left = self.pad * ratio + (kernel_size - ratio) // 2
        self.crop_right = self.pad * ratio + (kernel_size - ratio + 1) // 2
        self.register_buffer("filter", anti_alias_filter(ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        x = F.pad(x, (self.pad, self.pad), mode=ANTI_ALIAS_PAD_MODE)
        x = self.ratio * F.conv_transpose1d(x, self.filter.expand(channels, -1, -1), stride=self.ratio,
                                            groups=channels)
        return x[..., self.crop_left:-self.crop_right]


class LowPassFilter1d(nn.Module):
    """Depth-wise low-pass with ``filter`` [1, 1, k], replicate padding, optional stride. [B, C, T] -> [B, C, T/stride]."""

    def __init__(self, stride: int, kernel_size: int, cutoff: float, half_width: float) -> None:
        super().__init__()
        even = kernel_size % 2 == 0
        self.pad_left = kernel_size // 2 - int(even)
        self.pad_right = kernel_size // 2
        self.stride = stride
        self.register_buffer("filter", kaiser_sinc_filter1d(cutoff, half_width, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        x = F.pad(x, (self.pad_left, self.pad_right), mode=ANTI_ALIAS_PAD_MODE)
        return F.conv1d(x, self.filter.expand(channels, -1, -1), stride=self.stride, groups=channels)


class DownSample1d(nn.Module):
    """÷ratio down-sampling through ``lowpass`` (key ``downsample.lowpass.filter``). [B, C, T] -> [B, C, T/ratio]."""

    def __init__(self, ratio: int = ANTI_ALIAS_RATIO, kernel_size: int = ANTI_ALIAS_KERNEL_SIZE) -> None:
        super().__init__()
        self.lowpass = LowPassFilter1d(
            ratio, kernel_size, ANTI_ALIAS_CUTOFF_TIMES_RATIO / ratio, ANTI_ALIAS_HALF_WIDTH_TIMES_RATIO / ratio
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class Activation1d(nn.Module):
    """Anti-aliased periodic activation: up-sample ×2, ``act``, down-sample ÷2. [B, C, T] -> [B, C, T].

    ``forward`` computes ``downsample(act(upsample(x)))`` (the official sequence, kept as :meth:`unfused`) without
    ever interleaving the ×2 signal: the up-sampler's two output phases (even, odd samples) come out of one
    depthwise conv as channel pairs, ``act`` (per channel, elementwise) runs on them as they lie, and the stride-2
    low-pass becomes one conv over each (even, odd) pair. Same sums, replicate edges included (tests compare with
    :meth:`unfused`, official-fixture parity is unchanged); what is gone is the zero-stuffing transposed conv and
    the ×2-length pad — half of the ONNX Runtime vocoder's time on CPU.

    Index algebra for ratio 2 and 12-tap filters u = ``upsample.filter``, d = ``downsample.lowpass.filter``, with x
    edge-padded by 3 samples per side: even sample 2m of the ×2 signal is the 7-tap correlation of x with
    2·[rev(u[1::2]), 0] at m, odd sample 2m + 1 with 2·[0, rev(u[0::2])]. The down-sampler's edge copies are the
    ×2 signal's first sample (even phase) on the left and its last (odd phase) on the right, for both phases; its
    output j is the correlation of the padded even phase with [0, d[1::2]] plus the odd phase with [d[0::2], 0].
    """

    _EDGE = 3  # edge samples per side, before the up-sampler and per phase before the down-sampler

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act
        self.upsample = UpSample1d()
        self.downsample = DownSample1d()
        if (self.upsample.ratio, self.upsample.filter.shape[-1]) != (2, 12):
            raise ValueError("Activation1d: the phase form is derived for ratio 2 and 12-tap filters")
        # per-channel phase filters, made once by freeze_phase_filters() (export: constants instead of the ~15 ops
        # that derive them from the checkpoint's filters, which made the exporter's optimiser several times slower)
        self.register_buffer("frozen_up", None, persistent=False)
        self.register_buffer("frozen_down", None, persistent=False)

    def phase_filters(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(up [2, 1, 7]: even, odd phase with the ×2 gain; down [1, 2, 7]: taps on the even, odd phase)."""
        u, d = self.upsample.filter[0, 0], self.downsample.lowpass.filter[0, 0]
        zero = u.new_zeros(1)
        up = 2 * torch.stack([torch.cat([u[1::2].flip(0), zero]), torch.cat([zero, u[0::2].flip(0)])])[:, None]
        down = torch.stack([torch.cat([zero, d[1::2]]), torch.cat([d[0::2], zero])])[None]
        return up, down

    def freeze_phase_filters(self, channels: int) -> None:
        """Stores the per-channel phase filters of ``channels`` channels (call after loading the checkpoint)."""
        up, down = self.phase_filters()
        self.frozen_up, self.frozen_down = up.repeat(channels, 1, 1), down.repeat(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        if self.frozen_up is not None and self.frozen_up.shape[0] == 2 * c:
            up, down = self.frozen_up, self.frozen_down
        else:
            up, down = (f.repeat(c, 1, 1) for f in self.phase_filters())
        e = self._EDGE
        y = F.conv1d(F.pad(x, (e, e), mode=ANTI_ALIAS_PAD_MODE), up, groups=c)  # [B, 2C, T]
        y = self.act(y.view(b, c, 2 * t)).view(b, c, 2, t)        # channel c: its T even, then its T odd samples
        left = y[:, :, :1, :1].expand(b, c, 2, e)                  # first sample of the ×2 signal (even phase)
        right = y[:, :, 1:, t - 1:].expand(b, c, 2, e)             # last sample (odd phase)
        y = torch.cat([left, y, right], dim=3).view(b, 2 * c, t + 2 * e)
        return F.conv1d(y, down, groups=c)

    def unfused(self, x: torch.Tensor) -> torch.Tensor:
        """The official sequence, literally: down-sample(act(up-sample(x)))."""
        return self.downsample(self.act(self.upsample(x)))


def _same_padding(kernel_size: int, dilation: int) -> int:
    return (kernel_size * dilation - dilation) // 2


# ---- residual blocks ----------------------------------------------------------------------------------------------
class AMPBlock1(nn.Module):
    """For each dilation d: x += convs2[i](act(convs1[i](act(x)))) — convs1 dilated by d, convs2 dilation 1.
    ``activations`` alternates (a1, a2) per dilation: index 2i before convs1[i], 2i+1 before convs2[i]."""

    def __init__(self, cfg: VocoderConfig, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            WeightNormConv1d(channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            WeightNormConv1d(channels, channels, kernel_size, dilation=1, padding=_same_padding(kernel_size, 1))
            for _ in dilations
        )
        self.activations = nn.ModuleList(
            Activation1d(_make_activation(cfg, channels)) for _ in range(2 * len(dilations))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            xt = c1(self.activations[2 * i](x))
            xt = c2(self.activations[2 * i + 1](xt))
            x = xt + x
        return x


class AMPBlock2(nn.Module):
    """For each dilation d: x += convs[i](act(x)). NB: the copy in Kimi-Audio's repo lacks ``return x`` (a
    ``resblock: "2"`` config crashes there); this follows NVIDIA BigVGAN, which returns x."""

    def __init__(self, cfg: VocoderConfig, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            WeightNormConv1d(channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d))
            for d in dilations
        )
        self.activations = nn.ModuleList(Activation1d(_make_activation(cfg, channels)) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, act in zip(self.convs, self.activations):
            x = conv(act(x)) + x
        return x


_RESBLOCKS = {"1": AMPBlock1, "2": AMPBlock2}


# ---- generator ----------------------------------------------------------------------------------------------------
class BigVGAN(nn.Module):
    """BigVGAN generator: mel [B, num_mels, T] (natural-log mel, de-normalised) -> wav [B, 1, T·hop_size] in [-1, 1]
    at ``sampling_rate`` Hz.

    Construct, then load the official ``generator`` state dict with ``load_strict``; call :meth:`fold_weight_norm`
    before ONNX export.
    """

    def __init__(self, cfg: VocoderConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        pre_post_pad = PRE_POST_KERNEL_SIZE // 2
        self.conv_pre = WeightNormConv1d(cfg.num_mels, cfg.upsample_initial_channel, PRE_POST_KERNEL_SIZE,
                                         padding=pre_post_pad)
        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            # Wrapped in a one-element ModuleList: the official key is ups.{i}.0.*
            self.ups.append(nn.ModuleList([
                WeightNormConvTranspose1d(cfg.stage_channels(i - 1), cfg.stage_channels(i), k, stride=u,
                                          padding=(k - u) // 2)
            ]))
        block_cls = _RESBLOCKS[cfg.resblock]
        self.resblocks = nn.ModuleList(
            block_cls(cfg, cfg.stage_channels(i), k, d)
            for i in range(cfg.num_upsamples)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        last_channels = cfg.stage_channels(cfg.num_upsamples - 1)
        self.activation_post = Activation1d(_make_activation(cfg, last_channels))
        self.conv_post = WeightNormConv1d(last_channels, 1, PRE_POST_KERNEL_SIZE, padding=pre_post_pad,
                                          bias=cfg.use_bias_at_final)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 3 or mel.shape[1] != self.cfg.num_mels:
            raise ValueError(f"mel: expected [B, {self.cfg.num_mels}, T], got {list(mel.shape)}")
        x = self.conv_pre(mel)
        k = self.cfg.num_kernels
        for i, up in enumerate(self.ups):
            for layer in up:
                x = layer(x)
            xs = self.resblocks[i * k](x)
            for j in range(1, k):
                xs = xs + self.resblocks[i * k + j](x)
            x = xs / k
        x = self.conv_post(self.activation_post(x))
        if self.cfg.use_tanh_at_final:
            return torch.tanh(x)
        return torch.clamp(x, min=-1.0, max=1.0)

    def num_samples(self, num_frames: int) -> int:
        """Output length in samples for ``num_frames`` mel frames."""
        return num_frames * self.cfg.hop_size

    @property
    def is_weight_normed(self) -> bool:
        return any(isinstance(m, _WeightNormConv) for m in self.modules())

    def fold_weight_norm(self) -> "BigVGAN":
        """In place: every weight-normed conv becomes a plain conv with w = g·v/‖v‖ (state-dict keys ``*.weight``,
        the official "removed weight norm" form). Returns ``self``. Raises if already folded."""
        if not self.is_weight_normed:
            raise ValueError("fold_weight_norm: the model holds no weight-normed convolution (already folded?)")
        _fold_children(self)
        return self

    def freeze_phase_filters(self) -> "BigVGAN":
        """In place: every anti-aliased activation stores its phase filters (for export). Returns ``self``."""
        for module in self.modules():
            if isinstance(module, Activation1d):
                module.freeze_phase_filters(module.act.alpha.shape[0])
        return self

    def folded_copy(self) -> "BigVGAN":
        """A deep copy with weight norm folded; ``self`` is left unchanged."""
        return copy.deepcopy(self).fold_weight_norm()


def build_bigvgan(cfg: VocoderConfig, device: Optional[Union[str, torch.device]] = None) -> BigVGAN:
    """Constructs the generator (optionally on ``device``, e.g. "meta" to list shapes without allocating)."""
    if device is None:
        return BigVGAN(cfg)
    with torch.device(device):
        return BigVGAN(cfg)
