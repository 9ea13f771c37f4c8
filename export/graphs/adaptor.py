"""The LLM's VQ adaptor as one ONNX graph: raw Whisper features [N, kimia_adaptor_input_dim] (12.5 Hz, 4 x 50 Hz
frames concatenated; 5120 at full size) -> [N, hidden_size] through Linear(+b), SiLU, Linear(+b),
LayerNorm(eps = rms_norm_eps, affine) — ``model.vq_adaptor.layers.{0,3,4}`` of the LLM checkpoint (reference §1.2).
N is dynamic. Only the adaptor's tensors are read from the (lazy) LLM snapshot.

The llama.cpp backend runs the same math in numpy from its adaptor GGUF; this graph serves backends that compute
the LLM input embedding on an accelerator (runtime/audio_tokenizer.py ``OnnxAudioTokenizer.adapt``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from kimia_edge.export.graphs.base import CalibrationContext, ErrorStats, GraphSpec
from kimia_edge.export.graphs.whisper_encoder import speech_crops
from kimia_edge.export.reference.loaders import load_adaptor, load_whisper_encoder
from kimia_edge.runtime.spec.manifest import ShapeProfile

# Feature rows per call: profile up to 120 s of audio at 12.5 Hz (the generation buffers' 1500 positions,
# reference §2.6); opt = a 10 s clip.
MIN_ROWS, OPT_ROWS, MAX_ROWS = 1, 125, 1500
# Example inputs: Whisper last hidden states (after LayerNorm) are O(1) per channel.
_EXAMPLE_STD = 1.0


class AdaptorGraph(GraphSpec):
    name = "adaptor"
    dynamic_axes = {"features": {0: "rows"}, "embeds": {0: "rows"}}
    parity_lengths = (52, 388, 1)
    fp32_tolerance = ErrorStats(max_abs=1e-4, rel_l2=1e-5)

    def build(self, snapshot: Path) -> torch.nn.Module:
        return load_adaptor(snapshot)

    def example_inputs(self, module: torch.nn.Module, length: int, seed: int) -> Tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(length, module.cfg.kimia_adaptor_input_dim, generator=g) * _EXAMPLE_STD,)

    def profiles(self, module: torch.nn.Module) -> Dict[str, ShapeProfile]:
        d = module.cfg.kimia_adaptor_input_dim
        return {"features": ShapeProfile((MIN_ROWS, d), (OPT_ROWS, d), (MAX_ROWS, d))}

    def calibration_feeds(self, module: torch.nn.Module, context: CalibrationContext) -> List[Dict[str, np.ndarray]]:
        """Raw Whisper features of the speech clips (and crops), from the snapshot's reference Whisper encoder
        (only that encoder is loaded, not the golden pipeline's LLM)."""
        from kimia_edge.export.reference.whisper_encoder import extract_whisper_feat

        whisper = load_whisper_encoder(context.snapshot)
        feeds = []
        for crop in speech_crops(context.speech_16k):
            feats = extract_whisper_feat(whisper, crop)[0].float().numpy()
            if feats.shape[1] != module.cfg.kimia_adaptor_input_dim:
                raise ValueError(f"adaptor calibration: Whisper features are {feats.shape[1]} wide, config.json "
                                 f"kimia_adaptor_input_dim is {module.cfg.kimia_adaptor_input_dim}")
            feeds.append({"features": np.ascontiguousarray(feats, dtype=np.float32)})
        return feeds
