"""The artifact registry: the names under which a bundle lists its artifacts, and the input / output names of every
ONNX graph. The exporter names its graphs and their tensors from here, the runtime feeds them by these names.

Shapes (batch 1): ``whisper_encoder`` mel [1, 128, 3000] -> hidden [1, 1500, d]; ``vq_encoder`` mel [1, 128, F],
frame_mask [1, F] -> pre_vq [1, F/8, d] (the fp32 codebook distance stays on the host); ``adaptor`` features
[T, 5120] -> embeds [T, hidden]; ``dit_step`` see ``export/graphs/dit_step.py``; ``vocoder`` mel [1, 80, T] ->
wav [1, 1, T*hop].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["GraphContract", "GRAPHS", "ONNX_GRAPHS", "RUNTIME_GRAPHS", "TEXT_ONLY_SKIPPED_GRAPHS", "VQ_CODEBOOK",
           "TEXT_TOKENIZER", "LLM_TRUNK", "LLM_AUDIO", "LLM_ADAPTOR", "LLM_ROLES", "llm_artifact", "VAD", "VAD_COMPONENT",
           "VAD_DIR"]


@dataclass(frozen=True)
class GraphContract:
    """One ONNX graph as both worlds see it. ``precisions``: the ONNX precisions the runtime may open for it (None:
    all that the bundle lists)."""

    name: str
    component: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    precisions: Optional[Tuple[str, ...]] = None


GRAPHS: Dict[str, GraphContract] = {g.name: g for g in (  # export order: as the pipeline runs
    GraphContract("whisper_encoder", "whisper_encoder", ("mel",), ("hidden",)),
    # int8 flipped 2-62 of 177 semantic ids on real speech (tests/test_encoder_graphs.py): a flipped id changes the
    # LLM's input, so the runtime opens the VQ encoder at fp32 or fp16 only.
    GraphContract("vq_encoder", "vq_encoder", ("mel", "frame_mask"), ("pre_vq",), precisions=("fp32", "fp16")),
    GraphContract("adaptor", "adaptor", ("features",), ("embeds",)),
    GraphContract("dit_step", "dit", ("x_t", "t_int", "tokens", "positions", "prefix_k", "prefix_v", "prefix_len"),
                  ("velocity", "k", "v")),
    GraphContract("vocoder", "vocoder", ("mel",), ("wav",)),
)}
ONNX_GRAPHS: Tuple[str, ...] = tuple(GRAPHS)
# The graphs the runtime opens (the LLM backend applies the adaptor itself, from llm_adaptor.gguf).
RUNTIME_GRAPHS: Tuple[str, ...] = ("whisper_encoder", "vq_encoder", "dit_step", "vocoder")
# Not opened by a text-only pipeline (asr, qa).
TEXT_ONLY_SKIPPED_GRAPHS: Tuple[str, ...] = ("dit_step", "vocoder")

VQ_CODEBOOK = "vq_codebook"        # [V, d] float32 .npy beside the VQ graph
TEXT_TOKENIZER = "text_tokenizer"  # the snapshot's tiktoken.model and tokenizer json files
LLM_TRUNK, LLM_AUDIO, LLM_ADAPTOR = "llm_trunk", "llm_audio", "llm_adaptor"
# Silero VAD (optional): its ONNX graph (inputs input [1, 64 + 512], state [2, 1, 128], sr; outputs output, stateN)
# and its licence, copied from the silero-vad package at export time; a bundle without it falls back to energy VAD.
VAD, VAD_COMPONENT, VAD_DIR = "vad", "vad", "vad"
LLM_ROLES: Tuple[str, ...] = ("trunk", "audio", "adaptor")  # the GGUF files' kimia.role


def llm_artifact(role: str) -> str:
    """The artifact name of the LLM GGUF with ``role`` (trunk | audio | adaptor)."""
    if role not in LLM_ROLES:
        raise ValueError(f"LLM role must be one of {LLM_ROLES}, got {role!r}")
    return f"llm_{role}"
