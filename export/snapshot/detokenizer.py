"""Snapshot I/O for the flow-matching DiT: ``<snapshot>/audio_detokenizer/{config.yaml, model.pt}``.

Official format (``StreamingSemanticFMWrapper.from_pretrained``, kimia_infer/models/detokenizer/
semantic_fm_prefix_streaming.py): ``config.yaml`` holds ``model.dit`` (DiTPrefix arguments) and the top-level
``normalize_mel`` / ``mel_mean`` / ``mel_std``; ``model.pt`` is ``torch.save({"state_dict": {...}})`` of a training
checkpoint whose ``speech_model.*`` entries are the DiT weights (the official loader keeps keys containing
``speech_model`` and strips the prefix). Everything else in the file (the real one is 19 GB, ~3x the weights:
likely optimizer moments, reference doc §6.11) is ignored.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch
import yaml

from kimia_edge.export.reference.dit import build_dit
from kimia_edge.export.snapshot.presets import preset
from kimia_edge.runtime.dit_config import DitConfig
from kimia_edge.export.fileio import atomic_write

__all__ = ["read_detokenizer", "write_detokenizer", "dit_config_for_size", "random_tensors", "DETOKENIZER_DIR",
           "SPEECH_MODEL_PREFIX"]

DETOKENIZER_DIR = "audio_detokenizer"   # sub-folder of the HF snapshot (reference doc §4)
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.pt"
STATE_DICT_KEY = "state_dict"           # torch.load(model.pt)["state_dict"] (semantic_fm_prefix_streaming.py)
SPEECH_MODEL_PREFIX = "speech_model."   # DiT entries of the training checkpoint

# ---- size presets -------------------------------------------------------------------------------------------------
# full: reference doc §3.1 (OMNI-3P shapes: hidden 2304, depth 16, heads 18, vocab 16384 (+1), fc1 [9216, 2304]).
# Fields the real config.yaml carries but nobody has read (reference doc §6.4, UNKNOWN) get the official loader's
# defaults where it has one (rope_params) and the third-party / fixture values otherwise (position_embedding_type
# "skip", max_seq_len 4096, ffn_type "vanilla_mlp" — the only implemented one, mlp_ratio 4 from fc1's shape).
_FULL = dict(hidden_size=2304, depth=16, num_heads=18, semantic_vocab_size=16384)
# small: the full depth and head_dim 128, 6x narrower (~50 M parameters, ~0.2 GB fp32).
_SMALL = dict(hidden_size=384, depth=16, num_heads=3, semantic_vocab_size=16384)
# tiny: the official-fixture geometry (MANIFEST.md §2), but the semantic vocabulary of the other tiny
# components (512 codebook rows), so a tiny snapshot runs end to end.
_TINY = dict(hidden_size=96, depth=2, num_heads=3, semantic_vocab_size=512)
_COMMON = dict(input_size=80, mlp_ratio=4.0, position_embedding_type="skip", max_seq_len=4096, ffn_type="vanilla_mlp",
               ffn_gated_glu=False, ffn_act_layer="gelu", ffn_conv_kernel_size=5, use_rope=True,
               rope_max_position_embeddings=4096, rope_base=10000.0, rope_interpolation_factor=1.0,
               normalize_mel=True,
               # OMNI-3P values (reference doc §3.1), also the fixture's.
               mel_mean=-4.479605, mel_std=3.4584913)

# ---- random-weight scales (keep activations O(1); the same recipe as the official fixture, MANIFEST.md §1) --------
_BIAS_STD = 0.1
_EMBEDDING_STD = 0.5
_ADALN_GAIN = 0.5          # adaLN_modulation.1.weight: gates/scales of order 0.5
_FINAL_LINEAR_GAIN = 0.35  # final_layer.linear.weight: velocity of order 1
# State dicts above this size are built in a temporary memory-mapped file, so torch.save streams them from disk
# instead of holding them in RAM (full: 6.3 GB fp32).
_MMAP_THRESHOLD_BYTES = 1 << 30


def dit_config_for_size(size: str) -> DitConfig:
    """The configuration written for ``size`` in ("tiny", "small", "full")."""
    cfg = DitConfig(**_COMMON, **preset(size, {"tiny": _TINY, "small": _SMALL, "full": _FULL}))
    cfg.validate()
    return cfg


# ---- reader -------------------------------------------------------------------------------------------------------
def read_detokenizer_config(snapshot_dir: Path) -> DitConfig:
    """``<snapshot_dir>/audio_detokenizer/config.yaml`` as a DitConfig; ValueError naming the file if it is not
    UTF-8 YAML holding a valid configuration (FileNotFoundError if it is missing)."""
    config_path = Path(snapshot_dir) / DETOKENIZER_DIR / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"detokenizer snapshot: expected {config_path}, not found")
    try:
        with config_path.open("r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid YAML ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{config_path}: expected a YAML mapping, got {type(data).__name__}")
    try:
        return DitConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from e


def read_detokenizer(snapshot_dir: Path) -> Tuple[DitConfig, Dict[str, torch.Tensor]]:
    """Reads ``<snapshot_dir>/audio_detokenizer/config.yaml`` and the DiT weights of ``model.pt`` (memory-mapped,
    ``weights_only``). Returns (config, state dict with the ``speech_model.`` prefix stripped). Entries outside
    ``speech_model.*`` (optimizer state, other modules) are dropped here on purpose; a key that mentions
    ``speech_model`` elsewhere than as its prefix is an error (the official loader would feed it to the model)."""
    folder = Path(snapshot_dir) / DETOKENIZER_DIR
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"detokenizer snapshot: expected {weights_path}, not found")
    cfg = read_detokenizer_config(snapshot_dir)

    checkpoint = torch.load(weights_path, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(checkpoint, dict) or STATE_DICT_KEY not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{weights_path}: expected a dict with key {STATE_DICT_KEY!r}, got {found}")
    full = checkpoint[STATE_DICT_KEY]
    del checkpoint                              # the rest of the training checkpoint is not kept
    if not isinstance(full, dict):
        raise ValueError(f"{weights_path}: expected {STATE_DICT_KEY!r} to hold a dict, got {type(full).__name__}")
    state_dict: Dict[str, torch.Tensor] = {}
    stray = []
    for key, value in full.items():
        if key.startswith(SPEECH_MODEL_PREFIX):
            state_dict[key[len(SPEECH_MODEL_PREFIX):]] = value
        elif "speech_model" in key:
            stray.append(key)
    del full
    if stray:
        raise ValueError(f"{weights_path}: keys mention 'speech_model' but not as their prefix: {sorted(stray)[:8]}")
    if not state_dict:
        raise ValueError(f"{weights_path}: no {SPEECH_MODEL_PREFIX}* entries in {STATE_DICT_KEY!r}")
    return cfg, state_dict


# ---- writer -------------------------------------------------------------------------------------------------------
def _fill(key: str, out: torch.Tensor, gen: torch.Generator) -> None:
    """Seeded random values for one (stripped) key, written into ``out`` in place."""
    if key.endswith(".bias"):
        out.normal_(0.0, _BIAS_STD, generator=gen)
        return
    if key == "semantic_token_embedding.weight" or key == "position_embedding.weight":
        out.normal_(0.0, _EMBEDDING_STD, generator=gen)
        return
    if out.dim() != 2:
        raise KeyError(f"no random initialiser for detokenizer key {key!r} {tuple(out.shape)}")
    std = 1.0 / math.sqrt(out.shape[1])         # Linear weight [out, in]: std 1/sqrt(fan_in)
    if "adaLN_modulation" in key:
        std *= _ADALN_GAIN
    elif key == "final_layer.linear.weight":
        std *= _FINAL_LINEAR_GAIN
    out.normal_(0.0, std, generator=gen)


def random_tensors(cfg: DitConfig, seed: int, storage: torch.Tensor = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yields (official key with ``speech_model.`` prefix, float32 tensor) one by one, deterministic by ``seed``.
    Tensors are carved from ``storage`` (a flat float32 tensor, e.g. memory-mapped) when given."""
    shapes = {k: tuple(v.shape) for k, v in build_dit(cfg, device="meta").state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    offset = 0
    for key, shape in shapes.items():
        numel = math.prod(shape)
        if storage is None:
            t = torch.empty(shape, dtype=torch.float32)
        else:
            t = storage[offset:offset + numel].view(shape)
            offset += numel
        _fill(key, t, gen)
        yield SPEECH_MODEL_PREFIX + key, t


def _num_elements(cfg: DitConfig) -> int:
    return sum(math.prod(v.shape) for v in build_dit(cfg, device="meta").state_dict().values())


def write_detokenizer(snapshot_dir: Path, size: str, seed: int) -> None:
    """Writes ``<snapshot_dir>/audio_detokenizer/{config.yaml, model.pt}`` with random weights for ``size``
    (official format: ``torch.save({"state_dict": {"speech_model.<k>": tensor}})``, fp32, one file). Large sizes
    are built tensor by tensor inside a temporary memory-mapped file (no second copy in RAM); files are written to
    temporary names and renamed into place."""
    cfg = dit_config_for_size(size)
    folder = Path(snapshot_dir) / DETOKENIZER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    numel = _num_elements(cfg)
    backing = None
    storage = None
    if numel * 4 > _MMAP_THRESHOLD_BYTES:
        fd, backing = tempfile.mkstemp(prefix="dit-weights.", suffix=".bin", dir=folder)
        os.close(fd)
        storage = torch.from_file(backing, shared=True, size=numel, dtype=torch.float32)
    try:
        state_dict = dict(random_tensors(cfg, seed, storage))
        atomic_write(folder / WEIGHTS_FILE, lambda f: torch.save({STATE_DICT_KEY: state_dict}, f))
        del state_dict, storage
    finally:
        if backing is not None and os.path.exists(backing):
            os.unlink(backing)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(folder / CONFIG_FILE, lambda f: f.write(text.encode("utf-8")))

