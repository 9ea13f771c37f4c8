"""The BigVGAN vocoder as one ONNX graph: mel [1, 80, T] (de-normalised, 50 Hz) -> wav [1, 1, T*hop] at 24 kHz.
Weight norm is folded before export (one plain conv per layer, w = g·v/‖v‖)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from kimia_edge.export.graphs.base import CalibrationContext, ErrorStats, GraphSpec
from kimia_edge.export.reference.loaders import load_vocoder
from kimia_edge.runtime.spec.manifest import ShapeProfile
from kimia_edge.runtime.spec.streaming import StreamingConfig, frames_profile

# De-normalised mel is a natural-log magnitude around mel_mean (-4.48) with std 3.46 (reference §3.1).
_EXAMPLE_MEL_MEAN, _EXAMPLE_MEL_STD = -4.5, 2.0


class VocoderGraph(GraphSpec):
    name = "vocoder"
    dynamic_axes = {"mel": {2: "frames"}, "wav": {2: "samples"}}
    parity_lengths = (72, 156, 37)
    fp32_tolerance = ErrorStats(max_abs=1e-4, rel_l2=1e-4)
    int8_dynamic_signed_weights = False  # all convs: ORT's ConvInteger is faster with uint8 weights

    def build(self, snapshot: Path) -> torch.nn.Module:
        return load_vocoder(snapshot).folded_copy().freeze_phase_filters().eval()

    def example_inputs(self, module: torch.nn.Module, length: int, seed: int) -> Tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        mel = torch.randn(1, module.cfg.num_mels, length, generator=g) * _EXAMPLE_MEL_STD + _EXAMPLE_MEL_MEAN
        return (mel,)

    def profiles(self, module: torch.nn.Module) -> Dict[str, ShapeProfile]:
        n = module.cfg.num_mels
        low, opt, high = frames_profile(StreamingConfig(), self.name)  # frames per call of the streaming schedule
        return {"mel": ShapeProfile((1, n, low), (1, n, opt), (1, n, high))}

    def calibration_feeds(self, module: torch.nn.Module, context: CalibrationContext) -> List[Dict[str, np.ndarray]]:
        """The vocoder inputs the streaming detokenizer produces from the semantic tokens of real speech."""
        pipe = context.pipeline()
        feeds = []
        for i, clip in enumerate(context.speech_16k):
            ids = pipe.encode_audio(clip).semantic_ids
            det = pipe.detokenizer(np.random.default_rng(i))
            for chunk in [*det.push(ids), *det.finish()]:
                feeds.append({"mel": np.ascontiguousarray(chunk.vocoder_in_mel.T[None], dtype=np.float32)})
        return feeds

