"""The Whisper-large-v3 encoder of Kimi-Audio's continuous-feature branch as one ONNX graph, on its fixed 30 s
window: mel [1, 128, 3000] (100 Hz log-mel of one segment padded/trimmed to 480 000 samples) -> hidden
[1, 1500, d_model] (50 Hz ``last_hidden_state`` after the final LayerNorm). Every shape is static: the official
encoder adds its 1500 learned positions in full, so it only ever sees exactly 3000 frames.

Segmentation, the 4·N-frame slice and the [4N, d] -> [N, 4d] reshape stay on the host
(runtime/audio_tokenizer.py). Exported in fp32; Kimi itself runs this encoder in bf16 (reference §1.2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from kimia_edge.export.graphs.base import CalibrationContext, ErrorStats, GraphSpec
from kimia_edge.export.reference.loaders import load_whisper_encoder
from kimia_edge.runtime import frontend as fe
from kimia_edge.runtime.spec.manifest import ShapeProfile

# Calibration: every clip also contributes crops starting at these fractions of its length, so that a handful of
# speech clips give int8 calibration several distinct windows (speech at different places in the 30 s window).
CALIBRATION_CROP_STARTS = (0.0, 1.0 / 3.0, 2.0 / 3.0)
_MAX_CALIBRATION_FEEDS = 16
# Example inputs are log-mels of seeded noise bursts: real log-mel statistics (max - 8 floor, (x + 4) / 4
# scaling) without depending on any audio file. Burst length and count are arbitrary test-signal choices.
_EXAMPLE_BURST_SAMPLES = 8000
_EXAMPLE_BURSTS = 12


def example_speechlike_samples(n_samples: int, seed: int) -> np.ndarray:
    """[n_samples] float32 at 16 kHz: silence with seeded noise bursts of random gain (a stand-in for speech)."""
    rng = np.random.default_rng(seed)
    x = np.zeros(n_samples, dtype=np.float32)
    for _ in range(_EXAMPLE_BURSTS):
        start = int(rng.integers(0, max(1, n_samples - _EXAMPLE_BURST_SAMPLES)))
        burst = rng.standard_normal(min(_EXAMPLE_BURST_SAMPLES, n_samples - start)).astype(np.float32)
        x[start:start + burst.shape[0]] += burst * float(rng.uniform(0.01, 0.3))
    return x


def speech_crops(clips: List[np.ndarray]) -> List[np.ndarray]:
    """Each clip, then its tails starting at ``CALIBRATION_CROP_STARTS`` of its length (non-empty ones)."""
    crops = []
    for clip in clips:
        for frac in CALIBRATION_CROP_STARTS:
            crop = np.asarray(clip, dtype=np.float32)[int(frac * len(clip)):]
            if crop.shape[0] > fe.N_FFT:
                crops.append(crop)
    return crops


class WhisperEncoderGraph(GraphSpec):
    name = "whisper_encoder"
    dynamic_axes: Dict[str, Dict[int, str]] = {}
    # static graph: two parity inputs of the one legal shape (different seeds)
    parity_lengths = (fe.N_FRAMES, fe.N_FRAMES)
    # Measured ORT vs torch: 4.1e-6 / 6.2e-7 (official fixture, 2 layers), 3.6e-6 / 5.5e-7 ("small": 32 layers,
    # d 256). Twice the MANIFEST's 1e-4 fp32 threshold leaves room for the full width (d 1280) without hiding a bug.
    fp32_tolerance = ErrorStats(max_abs=2e-4, rel_l2=2e-5)

    def build(self, snapshot: Path) -> torch.nn.Module:
        return load_whisper_encoder(Path(snapshot), dtype=torch.float32)

    def example_inputs(self, module: torch.nn.Module, length: int, seed: int) -> Tuple[torch.Tensor, ...]:
        cfg = module.cfg
        if length != cfg.n_input_frames:
            raise ValueError(f"whisper_encoder: the graph is static, expected length {cfg.n_input_frames}, got {length}")
        samples = example_speechlike_samples(fe.N_SAMPLES, seed)
        return (torch.from_numpy(fe.log_mel(samples, cfg.num_mel_bins))[None],)

    def profiles(self, module: torch.nn.Module) -> Dict[str, ShapeProfile]:
        shape = (1, module.cfg.num_mel_bins, module.cfg.n_input_frames)
        return {"mel": ShapeProfile(shape, shape, shape)}

    def calibration_feeds(self, module: torch.nn.Module, context: CalibrationContext) -> List[Dict[str, np.ndarray]]:
        """Log-mels of every 30 s segment of the speech clips (and of crops of them), as the runtime computes them."""
        feeds = []
        for crop in speech_crops(context.speech_16k):
            for segment in fe.segment_30s(crop):
                mel = fe.log_mel(fe.pad_or_trim(segment), module.cfg.num_mel_bins)
                feeds.append({"mel": np.ascontiguousarray(mel[None], dtype=np.float32)})
        return feeds[:_MAX_CALIBRATION_FEEDS]
