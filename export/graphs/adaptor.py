"""The VQ adaptor (Linear-SiLU-Linear-LayerNorm, weights in the LLM checkpoint under ``model.vq_adaptor``) as an
ONNX graph: Whisper features [N, 4*d_whisper] (12.5 Hz) -> [N, hidden]. For runtimes that keep the LLM's input
embedding outside llama.cpp on an accelerator; the llama.cpp backend runs the same math from its adaptor GGUF."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from kimia_edge.export.checkpoint import load_strict
from kimia_edge.export.graphs.base import CalibrationContext, ErrorStats, GraphSpec
from kimia_edge.export.reference.llm import VQAdaptor
from kimia_edge.export.snapshot.llm import read_llm
from kimia_edge.runtime.manifest import ShapeProfile

ADAPTOR_PREFIX = "model.vq_adaptor."
MAX_TOKENS = 1500  # 120 s of audio at 12.5 Hz


def load_adaptor(snapshot: Path) -> VQAdaptor:
    """Only the adaptor's tensors are read from the (lazy) LLM checkpoint."""
    cfg, state = read_llm(snapshot)
    module = VQAdaptor(cfg)
    sd = {k[len(ADAPTOR_PREFIX):]: state[k] for k in state if k.startswith(ADAPTOR_PREFIX)}
    load_strict(module, sd, source=f"{snapshot} ({ADAPTOR_PREFIX}*)")
    module.cfg = cfg
    return module.float().eval()


class AdaptorGraph(GraphSpec):
    name = "adaptor"
    component = "adaptor"
    input_names = ("features",)
    output_names = ("adapted",)
    dynamic_axes = {"features": {0: "tokens"}, "adapted": {0: "tokens"}}
    parity_lengths = (52, 375, 7)
    fp32_tolerance = ErrorStats(max_abs=1e-4, rel_l2=1e-5)

    def build(self, snapshot: Path) -> torch.nn.Module:
        return load_adaptor(snapshot)

    def example_inputs(self, module: torch.nn.Module, length: int, seed: int) -> Tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(length, module.cfg.kimia_adaptor_input_dim, generator=g),)

    def profiles(self, module: torch.nn.Module) -> Dict[str, ShapeProfile]:
        d = module.cfg.kimia_adaptor_input_dim
        return {"features": ShapeProfile((2, d), (64, d), (MAX_TOKENS, d))}

    def calibration_feeds(self, module: torch.nn.Module, context: CalibrationContext) -> List[Dict[str, np.ndarray]]:
        pipe = context.pipeline()
        return [{"features": pipe.encode_audio(clip).features.astype(np.float32)} for clip in context.speech_16k]
