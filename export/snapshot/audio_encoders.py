"""Snapshot I/O for the two audio encoders, in the official Hugging Face layouts.

- Whisper-large-v3 (Kimi snapshot sub-folder ``whisper-large-v3/``): ``config.json`` (``WhisperConfig``),
  ``preprocessor_config.json``, ``generation_config.json`` and ``model.safetensors`` in F16 with the
  ``WhisperForConditionalGeneration`` keys ``model.encoder.*`` / ``model.decoder.*`` (the decoder is written so the
  folder looks like the official one; Kimi never uses it). Sharded files with ``model.safetensors.index.json`` are
  read too. ``encoder_state_dict`` maps the file's keys (either HF layout) to the encoder's module names.
- GLM-4-Voice tokenizer (separate folder, HF repo ``THUDM/glm-4-voice-tokenizer``; our generated snapshots carry it
  in ``<snapshot>/glm-4-voice-tokenizer``, ``find_glm_tokenizer``): ``config.json`` (``WhisperVQConfig``),
  ``preprocessor_config.json`` and an fp32 ``model.safetensors`` with bare keys (``conv1.*``, ``layers.{i}.*``,
  ``codebook.weight``, ``embed_positions2.weight``, ``ema_count``, ``ema_weight``).

Readers return ``(config, state_dict)`` where the state dict is the lazy read-only mapping of
``export/snapshot/weights.py`` (tensors are read when accessed); ``export.reference.loaders`` turns them into modules.
Writers stream tensor by tensor into a safetensors file (constant memory: one tensor at a time), deterministic by
seed.
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from kimia_edge.export.checkpoint import CheckpointError
from kimia_edge.export.reference.glm_vq import WhisperVQEncoder
from kimia_edge.export.reference.whisper_encoder import WhisperEncoder
from kimia_edge.export.snapshot.presets import preset
from kimia_edge.export.snapshot.weights import WEIGHTS_FILE, open_weights
from kimia_edge.runtime.audio_encoder_config import (
    CONFIG_FILE,
    PREPROCESSOR_CONFIG_FILE,
    FeatureExtractorConfig,
    VQEncoderConfig,
    WhisperEncoderConfig,
)

__all__ = [
    "read_whisper_encoder",
    "read_vq_encoder",
    "find_glm_tokenizer",
    "encoder_state_dict",
    "write_whisper_encoder",
    "write_vq_encoder",
    "whisper_config_for_size",
    "vq_config_for_size",
    "whisper_tensor_specs",
    "vq_tensor_specs",
    "WHISPER_DIR",
    "GLM_TOKENIZER_SUBDIR",
    "ENCODER_PREFIXES",
    "IGNORED_KEYS",
]

WHISPER_DIR = "whisper-large-v3"               # sub-folder of the Kimi snapshot (reference doc §4)
# Where our generated snapshots carry the GLM-4-Voice tokenizer (for real users it is a separate download).
GLM_TOKENIZER_SUBDIR = "glm-4-voice-tokenizer"
GENERATION_CONFIG_FILE = "generation_config.json"
_WHISPER_ENCODER_PREFIX = "model.encoder."     # WhisperForConditionalGeneration layout (official file)
_WHISPER_DECODER_PREFIX = "model.decoder."
# Key prefixes of the encoder in the two HF layouts, tried in this order: WhisperForConditionalGeneration (the
# official file) and WhisperModel.save_pretrained (``encoder.*`` / ``decoder.*``, upstream's export_model).
ENCODER_PREFIXES = (_WHISPER_ENCODER_PREFIX, "encoder.")
# Keys of the HF file that Kimi never uses: the decoder (and a stored proj_out, tied to the decoder embedding).
IGNORED_KEYS = (_WHISPER_DECODER_PREFIX + "*", "decoder.*", "proj_out.weight")
_CONV_KERNEL = 3

# ---- size presets ---------------------------------------------------------------------------------------------------
# full Whisper: openai/whisper-large-v3 config.json (the Kimi copy has the same byte size, reference §4 / §6.7).
_WHISPER_FULL = dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                     decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, vocab_size=51866,
                     pad_token_id=50256, bos_token_id=50257, eos_token_id=50257, decoder_start_token_id=50258)
# small: the full depth (32 + 32 layers, full vocabulary), 5x narrower.
_WHISPER_SMALL = dict(_WHISPER_FULL, d_model=256, encoder_attention_heads=4, decoder_attention_heads=4,
                      encoder_ffn_dim=1024, decoder_ffn_dim=1024)
# tiny: the official-fixture geometry (MANIFEST.md §5).
_WHISPER_TINY = dict(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, vocab_size=1024,
                     pad_token_id=1023, bos_token_id=1022, eos_token_id=1022, decoder_start_token_id=1021)
_WHISPER_COMMON = dict(num_mel_bins=128, max_source_positions=1500, max_target_positions=448,
                       activation_function="gelu", scale_embedding=False)

# full VQ: GLM-4-Voice tokenizer per reference §1.1 (GLM-3P config mirror): 16 of 32 layers built, block 200 frames
# (4 s), avg-pool 4 after layer 16, 16384 codes, EMA buffers. encoder_layers 32 = the Whisper-large-v3 trunk it was
# cut from (INFERRED; unused when quantize_encoder_only).
_VQ_FULL = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                quantize_position=16, pooling_position=16, quantize_causal_block_size=200, quantize_vocab_size=16384)
_VQ_SMALL = dict(_VQ_FULL, d_model=256, encoder_attention_heads=4, encoder_ffn_dim=1024)
# tiny: the official-fixture geometry (MANIFEST.md §4).
_VQ_TINY = dict(d_model=64, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=256, quantize_position=2,
                pooling_position=2, quantize_causal_block_size=40, quantize_vocab_size=512)
_VQ_COMMON = dict(num_mel_bins=128, max_source_positions=1500, activation_function="gelu", scale_embedding=False,
                  pooling_kernel_size=4, pooling_type="avg", quantize_ema_decay=0.99, quantize_encoder_only=True,
                  quantize_causal_encoder=False, encoder_causal_attention=False, encoder_causal_convolution=True)
# WhisperVQConfig training-only fields written for fidelity (GLM-3P mirror / fixture config.json).
_VQ_TRAINING_FIELDS = dict(quantize_commit_coefficient=0.25, quantize_loss_scale=10.0, quantize_restart_interval=100,
                           skip_language_detection=True)

# ---- random-weight scales (activations O(1)) ------------------------------------------------------------------------
_BIAS_STD = 0.02
_NORM_WEIGHT_JITTER = 0.1      # LayerNorm weight ~ U(1 - j, 1 + j)
_POSITION_STD = 0.5            # learned position tables
_TOKEN_EMBED_STD = 0.02        # decoder token embedding (unused by Kimi)
_CODEBOOK_STD = 0.5            # codebook rows, comparable to the pre-VQ activations (std ~0.6 on "small")


# ---- readers --------------------------------------------------------------------------------------------------------
def find_glm_tokenizer(snapshot: Path, glm_tokenizer: Optional[Path] = None) -> Path:
    """The GLM-4-Voice tokenizer folder: ``glm_tokenizer`` if given, else ``<snapshot>/glm-4-voice-tokenizer``
    (our generated snapshots carry it there; the real one is a separate download). FileNotFoundError if the folder
    has no ``config.json``."""
    folder = Path(glm_tokenizer) if glm_tokenizer else Path(snapshot) / GLM_TOKENIZER_SUBDIR
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"GLM-4-Voice tokenizer not found at {folder}: pass its folder (THUDM/glm-4-voice-tokenizer layout)"
        )
    return folder


def read_whisper_encoder(snapshot_dir: Path) -> Tuple[WhisperEncoderConfig, Mapping[str, torch.Tensor]]:
    """Reads ``<snapshot_dir>/whisper-large-v3/{config.json, model.safetensors}``. The state dict holds the file's
    own keys (encoder and decoder); ``encoder_state_dict`` maps them to the encoder's names."""
    folder = Path(snapshot_dir) / WHISPER_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"whisper snapshot: expected folder {folder}, not found")
    cfg = WhisperEncoderConfig.from_json(folder / CONFIG_FILE)
    return cfg, open_weights(folder)


def read_vq_encoder(tokenizer_dir: Path) -> Tuple[VQEncoderConfig, Mapping[str, torch.Tensor]]:
    """Reads the GLM-4-Voice tokenizer folder: ``config.json`` + ``preprocessor_config.json`` (one config) and
    ``model.safetensors`` (bare keys, fp32)."""
    folder = Path(tokenizer_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"GLM-4-Voice tokenizer: expected folder {folder}, not found")
    cfg = VQEncoderConfig.from_folder(folder)
    return cfg, open_weights(folder)


class _RenamedView(Mapping):
    """Read-only view of a state dict with the encoder prefix stripped; values are fetched lazily."""

    def __init__(self, source: Mapping[str, torch.Tensor], rename: Dict[str, str]) -> None:
        self._source = source
        self._rename = rename  # new key -> source key

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._source[self._rename[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rename)

    def __len__(self) -> int:
        return len(self._rename)


def encoder_state_dict(state_dict: Mapping[str, torch.Tensor], *, source: str) -> Mapping[str, torch.Tensor]:
    """Maps an HF Whisper state dict to the encoder's names: strips ``model.encoder.`` or ``encoder.`` (one layout per
    file) and keeps every other key unchanged, so that ``load_strict`` ignores the decoder by ``IGNORED_KEYS`` and
    reports anything else as unexpected."""
    keys = list(state_dict.keys())
    used = [p for p in ENCODER_PREFIXES if any(k.startswith(p) for k in keys)]
    if not used:
        raise CheckpointError(f"{source}: no encoder keys (expected a prefix in {ENCODER_PREFIXES}); "
                              f"first keys: {sorted(keys)[:5]}")
    if len(used) > 1:
        raise CheckpointError(f"{source}: mixed encoder key layouts {used}; expected exactly one")
    prefix = used[0]
    rename = {(k[len(prefix):] if k.startswith(prefix) else k): k for k in keys}
    return _RenamedView(state_dict, rename)


# ---- streaming safetensors writer -----------------------------------------------------------------------------------
_ST_DTYPES = {torch.float16: ("F16", 2), torch.float32: ("F32", 4), torch.bfloat16: ("BF16", 2)}
_ST_ALIGN = 8  # the JSON header is space-padded to a multiple of 8 bytes (safetensors format)


def _write_safetensors_streaming(path: Path, specs: Sequence[Tuple[str, Tuple[int, ...]]], dtype: torch.dtype,
                                 make: Callable[[str, Tuple[int, ...]], torch.Tensor]) -> None:
    """Writes ``specs`` (key, shape) in order: header first (offsets known from shapes), then each tensor as
    ``make(key, shape)`` cast to ``dtype``. Only one tensor is in memory at a time. Atomic (temp file + rename)."""
    name, itemsize = _ST_DTYPES[dtype]
    header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in specs:
        nbytes = math.prod(shape) * itemsize
        header[key] = {"dtype": name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % _ST_ALIGN)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, shape in specs:
                t = make(key, shape).to(dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{key}: expected shape {shape}, got {tuple(t.shape)}")
                f.write(t.view(torch.uint8).numpy().tobytes() if dtype == torch.bfloat16 else t.numpy().tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---- random values ----------------------------------------------------------------------------------------------------
def _random_value(key: str, shape: Tuple[int, ...], gen: torch.Generator, residual_scale: float) -> torch.Tensor:
    """Seeded random value for one official key (scales: the constants above)."""
    leaf = key.rsplit(".", 1)[-1]
    if "layer_norm" in key:
        if leaf == "weight":
            return 1.0 + _NORM_WEIGHT_JITTER * (2.0 * torch.rand(shape, generator=gen) - 1.0)
        return torch.randn(shape, generator=gen) * _BIAS_STD
    if key.endswith("embed_positions.weight"):
        return torch.randn(shape, generator=gen) * _POSITION_STD
    if key.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen) * _TOKEN_EMBED_STD
    if key == "codebook.weight":
        return torch.randn(shape, generator=gen) * _CODEBOOK_STD
    if leaf == "bias":
        return torch.randn(shape, generator=gen) * _BIAS_STD
    if leaf == "weight":  # Linear [out, in] or Conv1d [out, in, k]: N(0, 1 / fan_in)
        fan_in = math.prod(shape[1:])
        scale = residual_scale if (".out_proj." in key or ".fc2." in key) else 1.0
        return torch.randn(shape, generator=gen) * (scale / math.sqrt(fan_in))
    raise KeyError(f"no random initialiser for key {key!r}")


# ---- Whisper ----------------------------------------------------------------------------------------------------------
def whisper_config_for_size(size: str) -> dict:
    """The ``config.json`` written for ``size`` (HF ``WhisperConfig`` fields)."""
    dims = preset(size, {"tiny": _WHISPER_TINY, "small": _WHISPER_SMALL, "full": _WHISPER_FULL})
    cfg = dict(_WHISPER_COMMON, **dims)
    cfg.update(architectures=["WhisperForConditionalGeneration"], model_type="whisper", is_encoder_decoder=True,
               torch_dtype="float16", num_hidden_layers=cfg["encoder_layers"], dropout=0.0, attention_dropout=0.0,
               activation_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0, use_cache=True)
    return cfg


def _attention_specs(prefix: str, d: int) -> List[Tuple[str, Tuple[int, ...]]]:
    out = [(f"{prefix}k_proj.weight", (d, d))]
    for proj in ("v_proj", "q_proj", "out_proj"):
        out += [(f"{prefix}{proj}.weight", (d, d)), (f"{prefix}{proj}.bias", (d,))]
    return out


def whisper_tensor_specs(config: dict) -> List[Tuple[str, Tuple[int, ...]]]:
    """(key, shape) of every tensor of the official file (``model.encoder.*`` from the reference encoder built on
    the meta device, then ``model.decoder.*``); ``proj_out`` is tied to ``embed_tokens`` and not stored."""
    enc_cfg = WhisperEncoderConfig.from_dict(config)
    with torch.device("meta"):
        encoder = WhisperEncoder(enc_cfg)
    specs = [(_WHISPER_ENCODER_PREFIX + k, tuple(v.shape)) for k, v in encoder.state_dict().items()]
    d, ffn, p = config["d_model"], config["decoder_ffn_dim"], _WHISPER_DECODER_PREFIX
    specs += [(f"{p}embed_tokens.weight", (config["vocab_size"], d)),
              (f"{p}embed_positions.weight", (config["max_target_positions"], d))]
    for i in range(config["decoder_layers"]):
        layer = f"{p}layers.{i}."
        specs += _attention_specs(layer + "self_attn.", d)
        specs += [(layer + "self_attn_layer_norm.weight", (d,)), (layer + "self_attn_layer_norm.bias", (d,))]
        specs += _attention_specs(layer + "encoder_attn.", d)
        specs += [(layer + "encoder_attn_layer_norm.weight", (d,)), (layer + "encoder_attn_layer_norm.bias", (d,)),
                  (layer + "fc1.weight", (ffn, d)), (layer + "fc1.bias", (ffn,)),
                  (layer + "fc2.weight", (d, ffn)), (layer + "fc2.bias", (d,)),
                  (layer + "final_layer_norm.weight", (d,)), (layer + "final_layer_norm.bias", (d,))]
    specs += [(f"{p}layer_norm.weight", (d,)), (f"{p}layer_norm.bias", (d,))]
    return specs


def write_whisper_encoder(snapshot_dir: Path, size: str, seed: int) -> None:
    """Writes ``<snapshot_dir>/whisper-large-v3/`` with random F16 weights (tiny / small / full), keys and files as
    the official folder."""
    config = whisper_config_for_size(size)
    folder = Path(snapshot_dir) / WHISPER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    enc_scale = 1.0 / math.sqrt(2 * config["encoder_layers"])
    dec_scale = 1.0 / math.sqrt(2 * config["decoder_layers"])

    def make(key: str, shape: Tuple[int, ...]) -> torch.Tensor:
        return _random_value(key, shape, gen, enc_scale if key.startswith(_WHISPER_ENCODER_PREFIX) else dec_scale)

    _write_safetensors_streaming(folder / WEIGHTS_FILE, whisper_tensor_specs(config), torch.float16, make)
    _write_json(folder / CONFIG_FILE, config)
    _write_json(folder / PREPROCESSOR_CONFIG_FILE,
                FeatureExtractorConfig(feature_size=config["num_mel_bins"]).to_dict())
    _write_json(folder / GENERATION_CONFIG_FILE,
                {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")})


# ---- GLM-4-Voice VQ encoder -----------------------------------------------------------------------------------------
def vq_config_for_size(size: str) -> dict:
    """The ``config.json`` written for ``size`` (``WhisperVQConfig`` fields)."""
    dims = preset(size, {"tiny": _VQ_TINY, "small": _VQ_SMALL, "full": _VQ_FULL})
    cfg = dict(_VQ_COMMON, **dims, **_VQ_TRAINING_FIELDS)
    cfg.update(architectures=["WhisperVQEncoder"], model_type="whisper", torch_dtype="float32",
               num_hidden_layers=cfg["encoder_layers"], dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
               encoder_layerdrop=0.0)
    return cfg


def vq_tensor_specs(cfg: VQEncoderConfig) -> List[Tuple[str, Tuple[int, ...]]]:
    """(key, shape) of every tensor of the official file, from the reference module built on the meta device."""
    with torch.device("meta"):
        module = WhisperVQEncoder(cfg)
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def write_vq_encoder(tokenizer_dir: Path, size: str, seed: int) -> None:
    """Writes a GLM-4-Voice tokenizer folder (config.json, preprocessor_config.json, fp32 model.safetensors) with
    random weights. As in the official initialiser, ``embed_positions2`` starts as a copy of the first rows of
    ``embed_positions``, ``ema_count`` is ones and ``ema_weight`` a copy of the codebook."""
    config = vq_config_for_size(size)
    fe_config = FeatureExtractorConfig(feature_size=config["num_mel_bins"])
    cfg = VQEncoderConfig.from_dict(config, fe_config.to_dict())
    folder = Path(tokenizer_dir)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    residual_scale = 1.0 / math.sqrt(2 * cfg.n_layers_built)
    saved: Dict[str, torch.Tensor] = {}

    def make(key: str, shape: Tuple[int, ...]) -> torch.Tensor:
        if key == "embed_positions2.weight":
            return saved["embed_positions.weight"][: shape[0]]
        if key == "ema_count":
            return torch.ones(shape)
        if key == "ema_weight":
            return saved["codebook.weight"]
        value = _random_value(key, shape, gen, residual_scale)
        if key in ("embed_positions.weight", "codebook.weight"):
            saved[key] = value
        return value

    specs = vq_tensor_specs(cfg)
    # the copies need their sources first: order the file so that sources precede copies
    sources = [s for s in specs if s[0] in ("embed_positions.weight", "codebook.weight")]
    specs = sources + [s for s in specs if s not in sources]
    _write_safetensors_streaming(folder / WEIGHTS_FILE, specs, torch.float32, make)
    _write_json(folder / CONFIG_FILE, config)
    _write_json(folder / PREPROCESSOR_CONFIG_FILE, fe_config.to_dict())
