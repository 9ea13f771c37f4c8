"""Snapshot I/O for the BigVGAN vocoder: ``<snapshot>/vocoder/{config.json, model.pt}``.

Official format (``BigVGANWrapper.from_pretrained`` in kimia_infer/models/detokenizer/bigvgan_wrapper.py):
``config.json`` is the BigVGAN AttrDict JSON; ``model.pt`` is ``torch.save({"generator": state_dict})`` with every
convolution in weight-norm form (``*.weight_g`` / ``*.weight_v`` / ``*.bias``), log-scale Snake parameters
(``*.act.alpha`` / ``*.act.beta``) and the anti-aliasing filters as buffers (``*.upsample.filter``,
``*.downsample.lowpass.filter``, [1, 1, 12]).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Tuple

import torch

from kimia_edge.export.reference.bigvgan import anti_alias_filter, build_bigvgan
from kimia_edge.export.snapshot.presets import preset
from kimia_edge.runtime.vocoder_config import VocoderConfig
from kimia_edge.export.fileio import atomic_write

__all__ = ["read_vocoder", "write_vocoder", "random_state_dict", "vocoder_config_for_size", "VOCODER_DIR"]

VOCODER_DIR = "vocoder"          # sub-folder of the HF snapshot (reference doc §4)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
GENERATOR_KEY = "generator"      # top-level key of model.pt (bigvgan_wrapper.py: state_dict_g["generator"])

# ---- size presets -------------------------------------------------------------------------------------------------
# full: reference doc §3.4 (values OMNI-3P / INFERRED from the 964.9 MB file; config.json itself is UNKNOWN, §6.5).
_FULL_UPSAMPLE_RATES = (5, 2, 2, 2, 2, 3, 2)
_FULL_UPSAMPLE_KERNEL_SIZES = (9, 4, 4, 4, 4, 5, 4)
_FULL_UPSAMPLE_INITIAL_CHANNEL = 2048
# small: the full stage structure, 4x narrower (~1/16 of the parameters).
_SMALL_UPSAMPLE_INITIAL_CHANNEL = 512
# tiny: the official-fixture geometry (MANIFEST.md §3): 5 stages, prod = 480, 64 -> 2 channels.
_TINY_UPSAMPLE_RATES = (5, 2, 4, 3, 4)
_TINY_UPSAMPLE_KERNEL_SIZES = (9, 4, 8, 5, 8)
_TINY_UPSAMPLE_INITIAL_CHANNEL = 64
# Shared by every size (reference doc §3.4): AMPBlock1, kernels [3,5,7,11], dilations (1,3,5) each, SnakeBeta with
# log-scale parameters, clamp (no tanh) and no conv_post bias, 80 mels, 24 kHz, hop 480.
_RESBLOCK = "1"
_RESBLOCK_KERNEL_SIZES = (3, 5, 7, 11)
_RESBLOCK_DILATIONS = (1, 3, 5)
_NUM_MELS = 80
_SAMPLING_RATE_HZ = 24_000
_HOP_SIZE = 480

# ---- random-weight scales (keep activations O(1) for mel ~ N(-5, 2^2); tuned on the tiny and small sizes) -----------
# weight_norm makes ||w_row|| = g, so a conv maps unit-variance input to ~g^2 variance output. A transposed conv of
# stride u spreads each input over k/u taps of C_out outputs: gain^2 ~ 2 g^2 / u for C_out = C_in / 2.
_CONV_PRE_G = 0.3          # mel has |mean| ~ 5: shrink the first projection
_RES_CONV1_G = 1.0
_RES_CONV2_G = 0.3         # residual branch gain (3 residual adds per block)
_CONV_POST_G = 0.05        # final projection to the waveform, |wav| well below the clamp at 1
_G_JITTER = 0.2            # g ~ base * U(1 - j, 1 + j)
_BIAS_STD = 0.02
_LOG_SNAKE_STD = 0.3       # log alpha, log beta ~ N(0, 0.3^2)


def vocoder_config_for_size(size: str) -> VocoderConfig:
    """The configuration written for ``size`` in ("tiny", "small", "full")."""
    rates, kernels, channels = preset(size, {
        "full": (_FULL_UPSAMPLE_RATES, _FULL_UPSAMPLE_KERNEL_SIZES, _FULL_UPSAMPLE_INITIAL_CHANNEL),
        "small": (_FULL_UPSAMPLE_RATES, _FULL_UPSAMPLE_KERNEL_SIZES, _SMALL_UPSAMPLE_INITIAL_CHANNEL),
        "tiny": (_TINY_UPSAMPLE_RATES, _TINY_UPSAMPLE_KERNEL_SIZES, _TINY_UPSAMPLE_INITIAL_CHANNEL),
    })
    cfg = VocoderConfig(
        resblock=_RESBLOCK,
        upsample_rates=rates,
        upsample_kernel_sizes=kernels,
        upsample_initial_channel=channels,
        resblock_kernel_sizes=_RESBLOCK_KERNEL_SIZES,
        resblock_dilation_sizes=tuple(_RESBLOCK_DILATIONS for _ in _RESBLOCK_KERNEL_SIZES),
        activation="snakebeta",
        snake_logscale=True,
        num_mels=_NUM_MELS,
        sampling_rate=_SAMPLING_RATE_HZ,
        hop_size=_HOP_SIZE,
        use_tanh_at_final=False,
        use_bias_at_final=False,
    )
    cfg.validate()
    return cfg


# ---- reader -------------------------------------------------------------------------------------------------------
def read_vocoder(snapshot_dir: Path) -> Tuple[VocoderConfig, Dict[str, torch.Tensor]]:
    """Reads ``<snapshot_dir>/vocoder/config.json`` and the ``generator`` state dict of ``model.pt``
    (memory-mapped, ``weights_only``). Returns (config, state dict in weight-norm form)."""
    folder = Path(snapshot_dir) / VOCODER_DIR
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"vocoder snapshot: expected {path}, not found")
    cfg = VocoderConfig.from_json(config_path)
    checkpoint = torch.load(weights_path, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(checkpoint, dict) or GENERATOR_KEY not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{weights_path}: expected a dict with key {GENERATOR_KEY!r}, got {found}")
    state_dict = checkpoint[GENERATOR_KEY]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{weights_path}: expected {GENERATOR_KEY!r} to hold a state dict, got "
                         f"{type(state_dict).__name__}")
    return cfg, state_dict


# ---- writer -------------------------------------------------------------------------------------------------------
def _random_tensor(key: str, shape: Tuple[int, ...], cfg: VocoderConfig, gen: torch.Generator) -> torch.Tensor:
    """Seeded random value for one official key (scales: the constants above)."""
    if key.endswith(".weight_v"):
        return torch.randn(shape, generator=gen)
    if key.endswith(".weight_g"):
        if key.startswith("conv_pre."):
            base = _CONV_PRE_G
        elif key.startswith("conv_post."):
            base = _CONV_POST_G
        elif key.startswith("ups."):
            base = math.sqrt(cfg.upsample_rates[int(key.split(".")[1])] / 2.0)
        elif ".convs2." in key:
            base = _RES_CONV2_G
        else:                                   # convs1 (AMPBlock1) and convs (AMPBlock2)
            base = _RES_CONV1_G
        return base * (1.0 + _G_JITTER * (2.0 * torch.rand(shape, generator=gen) - 1.0))
    if key.endswith(".bias"):
        return torch.randn(shape, generator=gen) * _BIAS_STD
    if key.endswith(".act.alpha") or key.endswith(".act.beta"):
        return torch.randn(shape, generator=gen) * _LOG_SNAKE_STD
    raise KeyError(f"no random initialiser for vocoder key {key!r}")


def random_state_dict(cfg: VocoderConfig, seed: int) -> Dict[str, torch.Tensor]:
    """Random weights in the official weight-norm layout for ``cfg``, deterministic by ``seed``, float32. The
    anti-aliasing filters get the official Kaiser-sinc values. Key order and shapes come from the reference module
    built on the meta device (nothing allocated)."""
    shapes = {k: tuple(v.shape) for k, v in build_bigvgan(cfg, device="meta").state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    filt = anti_alias_filter()
    out: Dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key.endswith(".filter"):
            if tuple(filt.shape) != shape:
                raise ValueError(f"{key}: expected filter shape {shape}, got {tuple(filt.shape)}")
            out[key] = filt.clone()
        else:
            out[key] = _random_tensor(key, shape, cfg, gen).contiguous()
    return out


def write_vocoder(snapshot_dir: Path, size: str, seed: int) -> None:
    """Writes ``<snapshot_dir>/vocoder/{config.json, model.pt}`` with random weights for ``size`` (official
    format: AttrDict JSON, ``torch.save({"generator": state_dict})`` in weight-norm form). Files are written to
    temporary names and renamed into place. full ~ 241 M parameters, 0.96 GB (the whole state dict is held once in
    RAM because ``torch.save`` pickles one dict)."""
    cfg = vocoder_config_for_size(size)
    folder = Path(snapshot_dir) / VOCODER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = random_state_dict(cfg, seed)
    atomic_write(folder / WEIGHTS_FILE, lambda f: torch.save({GENERATOR_KEY: state_dict}, f))
    del state_dict
    text = json.dumps(cfg.to_dict(), indent=4) + "\n"
    atomic_write(folder / CONFIG_FILE, lambda f: f.write(text.encode("utf-8")))

