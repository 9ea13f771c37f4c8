"""The exported graphs, one GraphSpec class per file, registered by name (imported lazily: each pulls in its
reference module)."""
from __future__ import annotations

import importlib
from typing import Dict

from kimia_edge.export.graphs.base import GraphSpec

# name -> "module:class"; the order is the export order (encoders first, as the pipeline runs).
REGISTRY: Dict[str, str] = {
    "whisper_encoder": "kimia_edge.export.graphs.whisper_encoder:WhisperEncoderGraph",
    "vq_encoder": "kimia_edge.export.graphs.vq_encoder:VQEncoderGraph",
    "adaptor": "kimia_edge.export.graphs.adaptor:AdaptorGraph",
    "dit_step": "kimia_edge.export.graphs.dit_step:DitStepGraph",
    "vocoder": "kimia_edge.export.graphs.vocoder:VocoderGraph",
}


def graph_spec(name: str) -> GraphSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown graph {name!r}; known: {list(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()
