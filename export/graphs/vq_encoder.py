"""The GLM-4-Voice WhisperVQEncoder up to its VQ input, as an ONNX graph: log-mel [1, 128, T] (100 Hz, T a
multiple of 8) + frame mask [1, T] -> pooled pre-VQ hidden states [1, T/8, d] (12.5 Hz).

The codebook distance and argmin are NOT in the graph: the runtime computes them in numpy, in fp32, with the
codebook stored in the bundle (``vq_codebook``). A flipped id changes the LLM's input, and the official code
computes the distance in fp32 whatever the model's dtype; keeping it out of the graph guarantees that no
fp16 or int8 variant of the encoder touches it, without per-node exclusion lists in the quantizers. The cost
is one fp32 matmul of [T/8, d] x [d, 16384] per segment in numpy (~0.2 s per 30 s at full size on 2 cores).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from kimia_edge.export.graphs.base import CalibrationContext, ErrorStats, GraphSpec
from kimia_edge.export.reference.glm_vq import WhisperVQEncoder, load_vq_encoder
from kimia_edge.export.reference.pipeline import find_glm_tokenizer
from kimia_edge.runtime import frontend as fe
from kimia_edge.runtime.audio_tokenizer import segment_features
from kimia_edge.runtime.manifest import ShapeProfile

FRAMES_PER_TOKEN = 8  # 1280 samples per token / 160 samples per mel frame
MAX_FRAMES = fe.N_FRAMES  # one 30 s segment


class VQEncoderModule(torch.nn.Module):
    def __init__(self, encoder: WhisperVQEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.cfg = encoder.cfg

    def forward(self, mel: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(mel, frame_mask).pooled_pre_vq


class VQEncoderGraph(GraphSpec):
    name = "vq_encoder"
    component = "vq_encoder"
    input_names = ("mel", "frame_mask")
    output_names = ("pooled",)
    dynamic_axes = {"mel": {2: "frames"}, "frame_mask": {1: "frames"}, "pooled": {1: "tokens"}}
    parity_lengths = (400, 1600, 96)
    fp32_tolerance = ErrorStats(max_abs=2e-4, rel_l2=1e-5)

    def build(self, snapshot: Path) -> torch.nn.Module:
        return VQEncoderModule(load_vq_encoder(find_glm_tokenizer(snapshot, None))).eval()

    def example_inputs(self, module: torch.nn.Module, length: int, seed: int) -> Tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        mel = torch.rand(1, module.cfg.num_mel_bins, length, generator=g) * 2.0 - 0.8
        mask = torch.ones(1, length, dtype=torch.int32)
        mask[:, length - length // 10:] = 0  # a padded tail, as the feature extractor produces
        return mel, mask

    def profiles(self, module: torch.nn.Module) -> Dict[str, ShapeProfile]:
        n = module.cfg.num_mel_bins
        lo, opt, hi = FRAMES_PER_TOKEN * 4, 1000, MAX_FRAMES
        return {"mel": ShapeProfile((1, n, lo), (1, n, opt), (1, n, hi)),
                "frame_mask": ShapeProfile((1, lo), (1, opt), (1, hi))}

    def calibration_feeds(self, module: torch.nn.Module, context: CalibrationContext) -> List[Dict[str, np.ndarray]]:
        feeds = []
        for clip in context.speech_16k:
            for segment in fe.segment_30s(clip):
                mel, mask = segment_features(segment, module.cfg.num_mel_bins)
                feeds.append({"mel": mel[None].astype(np.float32), "frame_mask": mask[None]})
        return feeds

    def sidecar_arrays(self, module: torch.nn.Module) -> Dict[str, np.ndarray]:
        """The codebook [V, d] float32, for the runtime's fp32 argmin."""
        return {"vq_codebook": module.encoder.codebook.weight.detach().float().numpy()}
