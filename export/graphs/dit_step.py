"""The flow-matching DiT, one network evaluation, as an ONNX graph; the Euler loop, the KV window and the chunk
schedule stay on the host (runtime/detokenizer.py), written once for every backend.

Inputs: x_t [1, T, 80] normalised mel, t_int [1] int64 (floor(t*1000)), tokens [1, T] int64 (50 Hz semantic
ids), positions [1, T] int64 (absolute frame positions), prefix_k / prefix_v [depth, 1, heads, P, head_dim] (the
cached post-RoPE K/V of earlier frames), prefix_len [1] int64 (how many of the P slots are valid).
Outputs: velocity [1, T, 80], k / v of this chunk [depth, 1, heads, T, head_dim].

Prefix design: P is a dynamic axis of at least ``MIN_PREFIX`` slots, and ``prefix_len`` masks the slots that
hold nothing. The first chunk (no cache yet) passes MIN_PREFIX masked dummy slots. A fixed 900-slot padded window
would make every early chunk pay for attention over 900 keys and feed ~270 MB of K/V per call at full size;
a P that may be 0 is what torch.export specialises on and what TensorRT profiles handle worst. So: dynamic P
from MIN_PREFIX to the window size, profile opt = the full window (the steady state).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from kimia_edge.export.checkpoint import load_strict
from kimia_edge.export.graphs.base import CalibrationContext, ErrorStats, GraphSpec
from kimia_edge.export.reference.dit import DiT, build_dit
from kimia_edge.export.snapshot.detokenizer import read_detokenizer
from kimia_edge.runtime.dit_config import StreamingConfig
from kimia_edge.runtime.manifest import ShapeProfile

MIN_PREFIX = 2  # torch.export specialises sizes 0 and 1; two masked slots stand for "no prefix"
MIN_FRAMES = 4
# Largest chunk in frames: official 30 tokens x 4 + 48 look-ahead frames = 168; room for chunk growth.
MAX_FRAMES = 512
_MAX_CALIBRATION_FEEDS = 48
_MEL_ABS_MAX = 5.0


class DitStepModule(torch.nn.Module):
    """Wraps DiT.step with a valid-length input instead of a boolean mask."""

    def __init__(self, dit: DiT) -> None:
        super().__init__()
        self.dit = dit
        self.cfg = dit.cfg

    def forward(self, x_t: torch.Tensor, t_int: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                prefix_k: torch.Tensor, prefix_v: torch.Tensor, prefix_len: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slots = torch.arange(prefix_k.shape[3], device=x_t.device)
        mask = (slots < prefix_len)[None, :]
        return self.dit.step(x_t, t_int, tokens, positions, prefix_k, prefix_v, prefix_mask=mask)


def load_dit(snapshot: Path) -> DiT:
    cfg, sd = read_detokenizer(snapshot)
    model = build_dit(cfg)
    load_strict(model, sd, source=str(Path(snapshot) / "audio_detokenizer"))
    return model.eval()


class DitStepGraph(GraphSpec):
    name = "dit_step"
    component = "dit"
    input_names = ("x_t", "t_int", "tokens", "positions", "prefix_k", "prefix_v", "prefix_len")
    output_names = ("velocity", "k", "v")
    dynamic_axes = {
        "x_t": {1: "frames"}, "tokens": {1: "frames"}, "positions": {1: "frames"},
        "prefix_k": {3: "prefix"}, "prefix_v": {3: "prefix"},
        "velocity": {1: "frames"}, "k": {3: "frames"}, "v": {3: "frames"},
    }
    # (frames, prefix slots, valid prefix): a first chunk, a steady-state chunk, a short final chunk
    parity_lengths = (168, 120, 60)
    fp32_tolerance = ErrorStats(max_abs=1e-4, rel_l2=1e-5)

    def build(self, snapshot: Path) -> torch.nn.Module:
        return DitStepModule(load_dit(snapshot)).eval()

    def example_inputs(self, module: torch.nn.Module, length: int, seed: int) -> Tuple[torch.Tensor, ...]:
        cfg = module.cfg
        g = torch.Generator().manual_seed(seed)
        prefix = {168: MIN_PREFIX, 120: 300, 60: 96}.get(length, 64)
        valid = 0 if prefix == MIN_PREFIX else prefix - 7  # the tail of a padded window is masked
        start = int(torch.randint(0, 2000, (1,), generator=g))
        kv_shape = (cfg.depth, 1, cfg.num_heads, prefix, cfg.head_dim)
        return (
            torch.randn(1, length, cfg.input_size, generator=g),
            torch.randint(0, 1000, (1,), generator=g),
            torch.randint(0, cfg.semantic_vocab_size, (1, length), generator=g),
            torch.arange(start + prefix, start + prefix + length)[None],
            torch.randn(kv_shape, generator=g),
            torch.randn(kv_shape, generator=g),
            torch.tensor([valid]),
        )

    def profiles(self, module: torch.nn.Module) -> Dict[str, ShapeProfile]:
        cfg, window = module.cfg, StreamingConfig().max_kv_cache_frames
        chunk = StreamingConfig().chunk_tokens * StreamingConfig().upsample_factor + 48
        frames = lambda *rest: ShapeProfile((1, MIN_FRAMES, *rest), (1, chunk, *rest), (1, MAX_FRAMES, *rest))
        kv = ShapeProfile(*(((cfg.depth, 1, cfg.num_heads, p, cfg.head_dim)) for p in (MIN_PREFIX, window, window)))
        fixed = ShapeProfile((1,), (1,), (1,))
        return {
            "x_t": ShapeProfile((1, MIN_FRAMES, cfg.input_size), (1, chunk, cfg.input_size), (1, MAX_FRAMES, cfg.input_size)),
            "tokens": ShapeProfile((1, MIN_FRAMES), (1, chunk), (1, MAX_FRAMES)),
            "positions": ShapeProfile((1, MIN_FRAMES), (1, chunk), (1, MAX_FRAMES)),
            "prefix_k": kv, "prefix_v": kv, "t_int": fixed, "prefix_len": fixed,
        }

    def calibration_feeds(self, module: torch.nn.Module, context: CalibrationContext) -> List[Dict[str, np.ndarray]]:
        """The step inputs the golden streaming detokenizer really produces from the tokens of real speech."""
        from kimia_edge.runtime.dit_onnx import pad_prefix

        pipe = context.pipeline()
        feeds: List[Dict[str, np.ndarray]] = []
        cfg = module.cfg

        def recording_step(x_t, t_int, tokens, positions, prefix_k, prefix_v):
            pk, pv, n = pad_prefix(prefix_k, prefix_v, cfg.depth, cfg.num_heads, cfg.head_dim)
            feeds.append({"x_t": x_t.astype(np.float32), "t_int": np.asarray(t_int, np.int64).reshape(1),
                          "tokens": tokens.astype(np.int64), "positions": positions.astype(np.int64),
                          "prefix_k": pk, "prefix_v": pv, "prefix_len": np.array([n], np.int64)})
            return pipe.dit_step(x_t, t_int, tokens, positions, prefix_k, prefix_v)

        for i, clip in enumerate(context.speech_16k):
            det = pipe.detokenizer(np.random.default_rng(i))
            det.dit_step = recording_step
            ids = pipe.encode_audio(clip).semantic_ids
            for _ in [*det.push(ids), *det.finish()]:
                pass
        stride = max(1, len(feeds) // _MAX_CALIBRATION_FEEDS)
        return feeds[::stride]
