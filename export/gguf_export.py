"""GGUF export of the Kimi-Audio dual-head LLM for llama.cpp (reference §1.5, §2; architecture §3).

Two stock ``qwen2`` GGUF files, streamed tensor by tensor from the snapshot (the lazy state dict of
``read_llm``; at most one tensor is in memory):

- ``llm_trunk.gguf``: the text path. ``token_embd`` = ``model.embed_tokens``, ``blk.0..N-1`` = ``model.layers.*``,
  ``output_norm`` = ``model.norm``, ``output`` = ``lm_head``.
- ``llm_audio.gguf``: the MIMO branch as its own ``qwen2`` model with ``block_count = kimia_mimo_layers``.
  ``blk.j`` = ``model.mimo_layers.j``, ``output_norm`` = ``model.mimo_norm`` and ``mimo_output`` stored AS
  ``token_embd`` with no ``output`` tensor: llama.cpp ties the output head to ``token_embd`` (checked by the tests),
  so the head is stored once and no dummy embedding exists. It is fed, per position, the trunk's output of layer
  ``kimia_mimo_transformer_from_layer_index`` as input embeddings; the embedding lookup is never used.
- ``llm_adaptor.gguf``: the continuous-feature adaptor (``model.vq_adaptor.layers.{0,3,4}``), a non-llama GGUF read
  with ``gguf.GGUFReader`` by the runtime (numpy MLP). It cannot live inside the trunk file: llama.cpp refuses a
  model file that holds tensors its architecture does not create ("wrong number of tensors").

Every file carries the model hyper-parameters llama.cpp needs plus our own ``kimia.*`` keys (fork index, token
offset, media ids, the continuous-feature scale, the role of the file, the source snapshot), so the runtime needs
no snapshot. No tensor is stored twice across the three files.

Precision: ``f32`` (exact copy of bf16 weights) or ``f16`` (2-D matrices in F16, 1-D norms/biases in F32, as
llama.cpp's own converter does). Quantized variants are made from the F32/F16 files by ``gguf_quantize``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from kimia_edge.export.reference.llm import IGNORED_CHECKPOINT_KEYS, continuous_feature_scale
from kimia_edge.export.snapshot.llm import read_llm
from kimia_edge.runtime.llm_config import KimiaConfig

import gguf

from kimia_edge.runtime.spec.gguf import ADAPTOR_ARCH, ADAPTOR_TENSORS, ARCH, KIMIA_KEYS
from kimia_edge.runtime.spec.gguf import FILES as GGUF_FILES
from kimia_edge.runtime.spec.precisions import LLM_BASE_PRECISIONS

__all__ = ["export_llm_gguf", "gguf_component_bytes", "GGUFExport", "TRUNK_FILE", "AUDIO_FILE", "ADAPTOR_FILE",
           "PRECISIONS", "KIMIA_KEYS", "trunk_tensor_map", "audio_tensor_map", "adaptor_tensor_map"]

log = logging.getLogger(__name__)

TRUNK_FILE, AUDIO_FILE, ADAPTOR_FILE = GGUF_FILES["trunk"], GGUF_FILES["audio"], GGUF_FILES["adaptor"]
PRECISIONS = tuple(p.lower() for p in LLM_BASE_PRECISIONS)  # the base GGUF precision, as gguf names it

# Per-layer name map, HF suffix -> GGUF suffix (llama.cpp LLM_TENSOR names for qwen2).
_LAYER_MAP: Tuple[Tuple[str, str], ...] = (
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
)
# Adaptor: HF key -> our tensor name in llm_adaptor.gguf.
_ADAPTOR_MAP: Tuple[Tuple[str, str], ...] = tuple(zip(
    ("model.vq_adaptor.layers.0.weight", "model.vq_adaptor.layers.0.bias", "model.vq_adaptor.layers.3.weight",
     "model.vq_adaptor.layers.3.bias", "model.vq_adaptor.layers.4.weight", "model.vq_adaptor.layers.4.bias"),
    ADAPTOR_TENSORS))
# llama.cpp needs a tokenizer model key; "none" loads with the low-level API (environment notes). Our runtime has
# its own text tokenizer and feeds embeddings, never token ids, so llama.cpp's vocabulary is never used.
_TOKENIZER_MODEL = "none"


def _layer_entries(hf_prefix: str, n_layers: int) -> List[Tuple[str, str]]:
    return [(f"{hf_prefix}.{i}.{src}", f"blk.{i}.{dst}") for i in range(n_layers) for src, dst in _LAYER_MAP]


def trunk_tensor_map(cfg: KimiaConfig) -> List[Tuple[str, str]]:
    """(HF key, GGUF name) pairs of llm_trunk.gguf, in file order."""
    return ([("model.embed_tokens.weight", "token_embd.weight")]
            + _layer_entries("model.layers", cfg.num_hidden_layers)
            + [("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")])


def audio_tensor_map(cfg: KimiaConfig) -> List[Tuple[str, str]]:
    """(HF key, GGUF name) pairs of llm_audio.gguf: mimo_output is stored as token_embd (tied output head)."""
    return ([("mimo_output.weight", "token_embd.weight")]
            + _layer_entries("model.mimo_layers", cfg.kimia_mimo_layers)
            + [("model.mimo_norm.weight", "output_norm.weight")])


def adaptor_tensor_map(cfg: KimiaConfig) -> List[Tuple[str, str]]:
    """(HF key, GGUF name) pairs of llm_adaptor.gguf (empty when the config has no whisper features)."""
    return list(_ADAPTOR_MAP) if cfg.use_whisper_feature else []


@dataclass(frozen=True)
class GGUFExport:
    """Paths written by :func:`export_llm_gguf` (adaptor is None when the model uses no continuous features)."""

    trunk: Path
    audio: Path
    adaptor: Optional[Path]
    precision: str

    def files(self) -> Dict[str, Path]:
        out = {"trunk": self.trunk, "audio": self.audio}
        if self.adaptor is not None:
            out["adaptor"] = self.adaptor
        return out


def _feature_scale(cfg: KimiaConfig) -> float:
    """sqrt(2) as the official forward computes it: in the model dtype (bf16 -> 1.4140625)."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.torch_dtype]
    return float(continuous_feature_scale(dtype).float())


def _add_common_kv(w: gguf.GGUFWriter, cfg: KimiaConfig, role: str, source: str) -> None:
    w.add_string(KIMIA_KEYS["role"], role)
    w.add_uint32(KIMIA_KEYS["fork"], cfg.kimia_mimo_transformer_from_layer_index)
    w.add_uint32(KIMIA_KEYS["main_layers"], cfg.num_hidden_layers)
    w.add_uint32(KIMIA_KEYS["mimo_layers"], cfg.kimia_mimo_layers)
    w.add_uint32(KIMIA_KEYS["token_offset"], cfg.kimia_token_offset)
    w.add_uint32(KIMIA_KEYS["vocab_size"], cfg.vocab_size)
    w.add_uint32(KIMIA_KEYS["hidden_size"], cfg.hidden_size)
    w.add_uint32(KIMIA_KEYS["media_begin"], cfg.kimia_media_begin)
    w.add_uint32(KIMIA_KEYS["media_end"], cfg.kimia_media_end)
    w.add_uint32(KIMIA_KEYS["adaptor_input_dim"], cfg.kimia_adaptor_input_dim)
    w.add_float32(KIMIA_KEYS["adaptor_eps"], cfg.rms_norm_eps)
    w.add_float32(KIMIA_KEYS["feature_scale"], _feature_scale(cfg))
    w.add_bool(KIMIA_KEYS["use_whisper_feature"], cfg.use_whisper_feature)
    w.add_string(KIMIA_KEYS["source"], source)
    w.add_string(KIMIA_KEYS["source_dtype"], cfg.torch_dtype)


def _add_qwen2_kv(w: gguf.GGUFWriter, cfg: KimiaConfig, n_layers: int, name: str) -> None:
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model(_TOKENIZER_MODEL)


def _target_dtype(hf_key: str, shape: Sequence[int], precision: str) -> np.dtype:
    if precision == "f16" and len(shape) >= 2:
        return np.dtype(np.float16)
    return np.dtype(np.float32)


def _stream(path: Path, arch: str, entries: List[Tuple[str, str]], state: Mapping[str, torch.Tensor],
            shapes: Callable[[str], Tuple[int, ...]], precision: str,
            add_kv: Callable[[gguf.GGUFWriter], None]) -> None:
    """Writes one GGUF: metadata, tensor infos, then each tensor read from ``state`` one at a time."""
    tmp = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(tmp, arch)
    add_kv(w)
    plan = []
    for hf_key, name in entries:
        shape = shapes(hf_key)
        dt = _target_dtype(hf_key, shape, precision)
        w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)
        plan.append((hf_key, name, shape, dt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for hf_key, name, shape, dt in plan:
        t = state[hf_key]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{hf_key}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
        arr = t.to(torch.float32).numpy().astype(dt, copy=False)
        if dt == np.float16 and not np.isfinite(arr).all():
            raise ValueError(f"{hf_key}: values overflow float16; export with precision='f32'")
        w.write_tensor_data(np.ascontiguousarray(arr))
        del t, arr
    w.close()
    os.replace(tmp, path)


def export_llm_gguf(snapshot: Path, out_dir: Path, precision: str = "f32") -> GGUFExport:
    """Writes llm_trunk.gguf, llm_audio.gguf (and llm_adaptor.gguf) from the HF snapshot folder ``snapshot``.

    Every non-ignored checkpoint key goes to exactly one file (checked: an unmapped key is an error)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    snapshot, out_dir = Path(snapshot), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, state = read_llm(snapshot)
    fork = cfg.kimia_mimo_transformer_from_layer_index
    if fork >= cfg.num_hidden_layers - 1:
        # llama.cpp prunes the last layer's rows to the output positions, so l_out of the last layer is not a
        # full per-position hidden state; the fork must be an inner layer.
        raise ValueError(f"kimia_mimo_transformer_from_layer_index={fork}: expected < num_hidden_layers-1 "
                         f"({cfg.num_hidden_layers - 1}) for the llama.cpp capture")
    maps = {"trunk": trunk_tensor_map(cfg), "audio": audio_tensor_map(cfg), "adaptor": adaptor_tensor_map(cfg)}
    _check_coverage(state.keys(), maps)
    shapes = state.shape if hasattr(state, "shape") else (lambda k: tuple(state[k].shape))
    source = snapshot.name

    def trunk_kv(w: gguf.GGUFWriter) -> None:
        _add_qwen2_kv(w, cfg, cfg.num_hidden_layers, "kimia-audio-trunk")
        _add_common_kv(w, cfg, "trunk", source)

    def audio_kv(w: gguf.GGUFWriter) -> None:
        _add_qwen2_kv(w, cfg, cfg.kimia_mimo_layers, "kimia-audio-mimo")
        _add_common_kv(w, cfg, "audio", source)

    def adaptor_kv(w: gguf.GGUFWriter) -> None:
        w.add_name("kimia-audio-adaptor")
        _add_common_kv(w, cfg, "adaptor", source)

    trunk, audio = out_dir / TRUNK_FILE, out_dir / AUDIO_FILE
    _stream(trunk, ARCH, maps["trunk"], state, shapes, precision, trunk_kv)
    _stream(audio, ARCH, maps["audio"], state, shapes, precision, audio_kv)
    adaptor = None
    if maps["adaptor"]:
        adaptor = out_dir / ADAPTOR_FILE
        # the adaptor is small and runs in numpy at run time: always F32
        _stream(adaptor, ADAPTOR_ARCH, maps["adaptor"], state, shapes, "f32", adaptor_kv)
    return GGUFExport(trunk, audio, adaptor, precision)


def _check_coverage(keys, maps: Mapping[str, List[Tuple[str, str]]]) -> None:
    import fnmatch

    used: Dict[str, str] = {}
    for role, entries in maps.items():
        for hf_key, _ in entries:
            if hf_key in used:
                raise ValueError(f"{hf_key} mapped twice ({used[hf_key]} and {role})")
            used[hf_key] = role
    stored = {k for k in keys if not any(fnmatch.fnmatchcase(k, p) for p in IGNORED_CHECKPOINT_KEYS)}
    missing = sorted(set(used) - stored)
    unmapped = sorted(stored - set(used))
    if missing:
        raise ValueError(f"snapshot lacks tensors the GGUF export needs: {missing[:8]}")
    if unmapped:
        raise ValueError(f"snapshot tensors with no GGUF destination: {unmapped[:8]}")


def gguf_component_bytes(files: Mapping[str, Path]) -> Dict[str, Dict[str, int]]:
    """Per component (e.g. {"trunk": path, ...}): file bytes and tensor-data bytes, for the bundle manifest."""
    out: Dict[str, Dict[str, int]] = {}
    for role, path in files.items():
        reader = gguf.GGUFReader(str(path))
        out[role] = {"file_bytes": Path(path).stat().st_size,
                     "tensor_bytes": int(sum(int(t.n_bytes) for t in reader.tensors)),
                     "tensors": len(reader.tensors)}
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Export the Kimi-Audio LLM snapshot to llama.cpp GGUF files")
    p.add_argument("snapshot", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--precision", choices=PRECISIONS, default="f16")
    a = p.parse_args(argv)
    res = export_llm_gguf(a.snapshot, a.out_dir, a.precision)
    print(json.dumps(gguf_component_bytes(res.files()), indent=2))


if __name__ == "__main__":
    main()
