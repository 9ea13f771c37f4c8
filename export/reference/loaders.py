"""Snapshot parts -> PyTorch reference modules: the one place that does it.

Each loader reads one part of a snapshot through its reader in ``export.snapshot`` (official folder layout), builds
the reference module of ``export.reference`` from the part's config and loads the weights with
``export.checkpoint.load_strict`` (every key expected, every stored key used or ignored on purpose). The graphs of
``export.graphs`` and the golden pipeline import their modules from here; neither the readers nor the modules
import this file, so the dependency runs one way: snapshot readers, reference modules -> loaders -> users.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from kimia_edge.export.checkpoint import load_strict
from kimia_edge.export.reference.bigvgan import BigVGAN, build_bigvgan
from kimia_edge.export.reference.dit import DiT, build_dit
from kimia_edge.export.reference.glm_vq import WhisperVQEncoder
from kimia_edge.export.reference.llm import IGNORED_CHECKPOINT_KEYS, MoonshotKimia, VQAdaptor
from kimia_edge.export.reference.whisper_encoder import WhisperEncoder
from kimia_edge.export.snapshot.audio_encoders import (
    IGNORED_KEYS,
    WHISPER_DIR,
    encoder_state_dict,
    read_vq_encoder,
    read_whisper_encoder,
)
from kimia_edge.export.snapshot.detokenizer import DETOKENIZER_DIR, read_detokenizer
from kimia_edge.export.snapshot.llm import ADAPTOR_PREFIX, read_llm
from kimia_edge.export.snapshot.vocoder import VOCODER_DIR, read_vocoder

__all__ = [
    "load_whisper_encoder",
    "load_vq_encoder",
    "load_llm",
    "load_adaptor",
    "load_dit",
    "load_vocoder",
    "TORCH_DTYPES",
]

# config.json ``torch_dtype`` -> torch dtype (the LLM's default load dtype).
TORCH_DTYPES: Dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_whisper_encoder(snapshot_dir: Path, dtype: torch.dtype = torch.float32) -> WhisperEncoder:
    """Kimi's Whisper encoder from ``<snapshot_dir>/whisper-large-v3``, strict (the decoder keys ignored by name).
    The official F16 values are upcast exactly; Kimi itself then runs in bf16 (pass ``dtype=torch.bfloat16``)."""
    cfg, state_dict = read_whisper_encoder(Path(snapshot_dir))
    source = str(Path(snapshot_dir) / WHISPER_DIR)
    module = WhisperEncoder(cfg)
    load_strict(module, encoder_state_dict(state_dict, source=source), source=source, ignore=IGNORED_KEYS)
    return module.to(dtype).eval()


def load_vq_encoder(tokenizer_dir: Path) -> WhisperVQEncoder:
    """The GLM-4-Voice ``WhisperVQEncoder`` from its tokenizer folder (``model.safetensors``), strict, fp32."""
    cfg, state_dict = read_vq_encoder(Path(tokenizer_dir))
    module = WhisperVQEncoder(cfg)
    load_strict(module, state_dict, source=str(Path(tokenizer_dir)))
    return module.float().eval()


def load_llm(snapshot_dir: Path, dtype: Optional[torch.dtype] = None) -> MoonshotKimia:
    """The dual-head LLM from an HF snapshot folder, strict (the stored ``*.rotary_emb.inv_freq`` ignored by name).
    ``dtype`` defaults to config.json ``torch_dtype``."""
    cfg, state = read_llm(Path(snapshot_dir))
    model = MoonshotKimia(cfg).to(dtype or TORCH_DTYPES[cfg.torch_dtype])
    load_strict(model, state, source=str(snapshot_dir), ignore=IGNORED_CHECKPOINT_KEYS)
    return model.eval()


def load_adaptor(snapshot_dir: Path) -> VQAdaptor:
    """The LLM's VQ adaptor alone, strict over the ``model.vq_adaptor.*`` keys of the LLM checkpoint, fp32; the
    module carries the LLM config as ``.cfg``."""
    cfg, state = read_llm(Path(snapshot_dir))
    if not cfg.use_whisper_feature:
        raise ValueError(f"{snapshot_dir}: config.json use_whisper_feature is false: the model has no VQ adaptor")
    module = VQAdaptor(cfg)
    sub = {k[len(ADAPTOR_PREFIX):]: state[k] for k in state if k.startswith(ADAPTOR_PREFIX)}
    load_strict(module, sub, source=f"{snapshot_dir} ({ADAPTOR_PREFIX}*)")
    module.cfg = cfg
    return module.float().eval()


def load_dit(snapshot_dir: Path) -> DiT:
    """The flow-matching DiT from ``<snapshot_dir>/audio_detokenizer``, strict, in the checkpoint's dtype."""
    cfg, state_dict = read_detokenizer(Path(snapshot_dir))
    model = build_dit(cfg)
    load_strict(model, state_dict, source=str(Path(snapshot_dir) / DETOKENIZER_DIR))
    return model.eval()


def load_vocoder(snapshot_dir: Path) -> BigVGAN:
    """The BigVGAN vocoder from ``<snapshot_dir>/vocoder``, in weight-norm form, strict."""
    cfg, state_dict = read_vocoder(Path(snapshot_dir))
    model = build_bigvgan(cfg)
    load_strict(model, state_dict, source=str(Path(snapshot_dir) / VOCODER_DIR))
    return model.eval()
