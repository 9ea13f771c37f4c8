"""The GLM-4-Voice ``WhisperVQEncoder`` up to its VQ input, as one ONNX graph:
mel [1, n_mels, T] (100 Hz log-mel, T a multiple of 8) + frame_mask [1, T] int32 (1 = real audio) ->
pre_vq [1, T/8, d] float32 (the pooled 12.5 Hz hidden states the official ``vector_quantize`` reads).
Inside: causal convs, learned positions, the block-causal + key-padding attention mask, the layers up to
``quantize_position`` with the average pooling after ``pooling_position``. T is dynamic, 8 .. 3000 (30 s).

Decision: the codebook distance and the argmin run in the RUNTIME, not in the graph.
A flipped id changes the LLM's input, so the distance must stay fp32 whatever precision the encoder runs at —
the official tokenizer computes it in fp32. In the graph, every fp16 / int8 variant would have to exclude the
distance MatMul, the norms and the ArgMin from conversion by node name (quantization/variants.py has no exclusion
lists; the dynamo exporter's node names are not a stable interface; TensorRT may still fuse and lower them).
In the runtime, no precision variant can reach it: ``runtime/audio_tokenizer.py`` computes
``argmin(‖c‖² + ‖h‖² − 2 h·c)`` in numpy fp32 (the official ``vector_quantize`` formula, ‖h‖² kept so the
rounding matches it) with the codebook shipped as an artifact of its own, ``vq_codebook`` (.npy [V, d] fp32,
written by the exporter from ``sidecar_arrays``). Costs: the codebook file (16384 x 1280 x 4 B = 84 MB at full
size, the same bytes the fp32 graph would carry) and one fp32 matmul [T/8, d] x [d, V] per segment on the host
(375 x 1280 x 16384 x 2 ≈ 16 GFLOP: 65 ms per 30 s segment in numpy, measured here).

The precision variants of this graph still move the pre-VQ states, hence flip ids that sit near a decision
boundary. Measured on the two real speech clips (177 ids), full-depth "small" snapshot (16 layers, 16384 rows):
fp32 0, fp16 1, int8_dynamic 6, int8_qdq 62 flipped ids (qdq calibrated on the shorter clip only: 60 of its 62
flips are on the other clip). Run the tokenizer's encoder at fp32 or fp16; int8 needs a real calibration set.

The frame count is exported as ``8 * k`` (a derived dimension): the conv stride (2) and the pooling (4) then
divide it exactly, so neither the reference's shape checks nor the pooling's pad-to-multiple branch depend on
a runtime value. The runtime always pads segments to a multiple of 1280 samples (= 8 frames), as the official
feature extractor does (``pad_to_multiple_of=1280``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from kimia_edge.export.graphs.base import CalibrationContext, ErrorStats, GraphSpec
from kimia_edge.export.graphs.whisper_encoder import example_speechlike_samples, speech_crops
from kimia_edge.export.reference.glm_vq import WhisperVQEncoder
from kimia_edge.export.reference.loaders import load_vq_encoder
from kimia_edge.export.snapshot.audio_encoders import find_glm_tokenizer
from kimia_edge.runtime import frontend as fe
from kimia_edge.runtime.audio_encoder_config import CONV1_STRIDE, CONV2_STRIDE, VQEncoderConfig
from kimia_edge.runtime.audio_tokenizer import vq_segment_inputs
from kimia_edge.runtime.spec.graphs import VQ_CODEBOOK
from kimia_edge.runtime.spec.manifest import ShapeProfile

# TensorRT opt shape: a 10 s utterance (the length of a typical spoken turn); max = one 30 s segment.
OPT_SECONDS = 10
_MAX_CALIBRATION_FEEDS = 16


class VQPreQuantizer(torch.nn.Module):
    """The reference encoder's forward up to the VQ input (same submodules, same masks, same pooling):
    (mel [1, n_mels, T], frame_mask [1, T] int) -> pre_vq [1, T / (conv strides x pool), d]."""

    def __init__(self, encoder: WhisperVQEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.cfg = encoder.cfg

    def forward(self, mel: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        enc, cfg = self.encoder, self.cfg
        conv_stride = CONV1_STRIDE * CONV2_STRIDE
        t = mel.shape[2]
        valid = frame_mask[:, ::conv_stride]
        block = cfg.quantize_causal_block_size
        mask = enc._mask(valid, block)
        x = F.gelu(enc.conv1(mel))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: t // conv_stride]
        for idx, layer in enumerate(enc.layers[: cfg.quantize_position]):
            x = layer(x, mask, is_causal=cfg.layers_causal)
            if idx + 1 == cfg.pooling_position and cfg.pooling_kernel_size is not None:
                x = enc._pool(x)
                valid = valid[:, :: cfg.pooling_kernel_size]
                mask = enc._mask(valid, None if block is None else block // cfg.pooling_kernel_size)
        return x


class VQEncoderGraph(GraphSpec):
    name = "vq_encoder"
    dynamic_axes = {"mel": {2: "frames"}, "frame_mask": {1: "frames"}, "pre_vq": {1: "tokens"}}
    # 52 tokens (fixture clip A), a full 30 s segment, 29 tokens (clip B)
    parity_lengths = (416, fe.N_FRAMES, 232)
    fp32_tolerance = ErrorStats(max_abs=1e-4, rel_l2=1e-5)

    def build(self, snapshot: Path) -> torch.nn.Module:
        """From ``<snapshot>/glm-4-voice-tokenizer`` (where our snapshots carry it: ``find_glm_tokenizer``)."""
        return VQPreQuantizer(load_vq_encoder(find_glm_tokenizer(Path(snapshot), None))).eval()

    def _max_frames(self, cfg: VQEncoderConfig) -> int:
        return min(fe.N_FRAMES, cfg.max_source_positions * CONV1_STRIDE * CONV2_STRIDE)

    def example_inputs(self, module: torch.nn.Module, length: int, seed: int) -> Tuple[torch.Tensor, ...]:
        """Log-mel of a seeded speech-like signal whose real part ends inside the last 1280-sample block (a padded
        tail, as the feature extractor produces), with its frame mask."""
        cfg = module.cfg
        step = cfg.frames_per_token * cfg.features.hop_length
        if length % cfg.frames_per_token:
            raise ValueError(f"vq_encoder: length must be a multiple of {cfg.frames_per_token} frames, got {length}")
        n_samples = length * cfg.features.hop_length - int(np.random.default_rng(seed).integers(0, step))
        mel, mask = vq_segment_inputs([example_speechlike_samples(n_samples, seed)], cfg)[0]
        return torch.from_numpy(mel)[None], torch.from_numpy(mask)[None]

    def dynamic_shapes(self, module: torch.nn.Module) -> Tuple[Dict[int, torch.export.Dim], ...]:
        step = module.cfg.frames_per_token
        tokens = torch.export.Dim("tokens", min=1, max=self._max_frames(module.cfg) // step)
        frames = step * tokens
        return {2: frames}, {1: frames}

    def profiles(self, module: torch.nn.Module) -> Dict[str, ShapeProfile]:
        cfg = module.cfg
        n, lo, hi = cfg.num_mel_bins, cfg.frames_per_token, self._max_frames(cfg)
        opt = min(hi, OPT_SECONDS * cfg.features.sampling_rate // cfg.features.hop_length)
        return {"mel": ShapeProfile((1, n, lo), (1, n, opt), (1, n, hi)),
                "frame_mask": ShapeProfile((1, lo), (1, opt), (1, hi))}

    def calibration_feeds(self, module: torch.nn.Module, context: CalibrationContext) -> List[Dict[str, np.ndarray]]:
        """The (mel, frame_mask) rows the runtime feeds for each speech clip (and crops of it)."""
        feeds = []
        for crop in speech_crops(context.speech_16k):
            for mel, mask in vq_segment_inputs(fe.segment_30s(crop), module.cfg):
                feeds.append({"mel": mel[None], "frame_mask": mask[None]})
        return feeds[:_MAX_CALIBRATION_FEEDS]

    def sidecar_arrays(self, module: torch.nn.Module) -> Dict[str, np.ndarray]:
        """The codebook [V, d] float32 for the runtime's fp32 nearest-row search (artifact ``vq_codebook``)."""
        return {VQ_CODEBOOK: module.encoder.codebook.weight.detach().float().numpy().copy()}
