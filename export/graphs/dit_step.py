"""The flow-matching DiT, one network evaluation, as an ONNX graph; the Euler loop, the KV window and the chunk
schedule stay on the host (runtime/detokenizer.py), written once for every backend.

Inputs: x_t [1, T, 80] normalised mel, t_int [1] int64 (floor(t*1000)), tokens [1, T] int64 (50 Hz semantic
ids), positions [1, T] int64 (absolute frame positions), prefix_k / prefix_v [depth, 1, heads, P, head_dim] (the
cached post-RoPE K/V of earlier frames), prefix_len [1] int64 (how many of the P slots are valid, counted from
the start; the rest are masked out of the attention).
The graph reads tokens once per aligned group of GRAPH_TOKEN_FRAMES (4) frames (tokens[:, ::4]): the adaLN
condition and modulation are computed per 12.5 Hz token and copied to its 4 frames (DiT.step ``token_frames``),
exact for the detokenizer's x4-repeated ids and ~1/4 fewer FLOPs than per frame. Same input names and shapes as
before (an older per-frame graph and this one are interchangeable for such tokens); runtime/dit_onnx.py checks the
grouping on every call.
Outputs: velocity [1, T, 80], k / v of this chunk [depth, 1, heads, T, head_dim] (post-RoPE, what the host caches).

Prefix design: P is a dynamic axis from ``MIN_PREFIX`` slots to the 900-frame window, plus ``prefix_len``.
- Not a fixed 900-slot padded window: every early chunk (the first ~8 of an utterance, i.e. the first 18 s,
  including the one that sets first-audio latency) would attend to 900 keys instead of 0..780, and the host
  would feed 2 x 133 MB of K/V per call at full size (16 layers x 18 heads x 900 x 128 x fp32) instead of what
  is there. Once the window is full (steady state) both designs do the same work.
- Not a P that may be 0: torch.export specialises sizes 0 and 1, and a zero-length dimension is what TensorRT
  optimisation profiles handle worst. The first chunk (no cache yet) passes MIN_PREFIX zero slots with
  prefix_len 0; ``runtime/dit_onnx.py`` does that padding.
- TensorRT profile: P min = MIN_PREFIX, opt = max = the window (the steady state); T min 4, opt 168 (official
  30 tokens + 12 look-ahead, x4), max 512 (room for chunk growth).
The valid-length input (rather than a [1, P] bool mask) keeps the runtime's feed to one scalar and lets a
fixed-window runtime (e.g. a static-shape engine) reuse the same graph with P = 900 and prefix_len < 900.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from kimia_edge.export.graphs.base import CalibrationContext, ErrorStats, GraphSpec
from kimia_edge.export.reference.dit import DiT
from kimia_edge.export.reference.loaders import load_dit
from kimia_edge.runtime.detokenizer import StreamingDetokenizer
from kimia_edge.runtime.dit_config import TIMESTEP_SCALE
from kimia_edge.runtime.spec.streaming import GRAPH_TOKEN_FRAMES
from kimia_edge.runtime.spec.streaming import MIN_PREFIX_SLOTS as MIN_PREFIX
from kimia_edge.runtime.spec.streaming import StreamingConfig, frames_profile
from kimia_edge.runtime.spec.manifest import ShapeProfile

# Calibration: up to 8 chunks spread over the speech, 6 evaluations spread over each chunk's Euler steps and its
# priming pass = 48 feeds; at most 8 distinct prefixes are held (2.1 GB at full size with a full window).
_CALIBRATION_CHUNKS = 8
_CALIBRATION_CALLS_PER_CHUNK = 6
# Parity cases by chunk frames -> (prefix slots, valid slots): a first chunk (no prefix: MIN_PREFIX masked slots),
# a mid-utterance chunk against a padded prefix, a short final chunk; other lengths get 64 of 64 valid.
_PARITY_PREFIX = {168: (MIN_PREFIX, 0), 120: (300, 293), 60: (96, 89)}
_DEFAULT_PREFIX = (64, 64)
_MAX_START_POSITION = 2000  # example chunks start anywhere in the first half of the 4096 RoPE positions


class FusableTanhGelu(torch.nn.Module):
    """GELU, tanh approximation, as (x·0.5)·(1 + tanh(√(2/π)·(x + 0.044715·x³))): nn.GELU(approximate="tanh")'s
    function up to fp32 rounding, in the operand order ONNX Runtime's FastGeluFusion matches — one FastGelu kernel
    that also takes fc1's bias, where the exporter's form of nn.GELU, x·(0.5·(1 + tanh(…))), stays 8 elementwise
    nodes and a bias Add per block (bench/ort_fusions.py, docs/benchmarks.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 0.5) * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def export_form(dit: DiT) -> DiT:
    """The DiT as exported: new module objects sharing ``dit``'s parameter and buffer tensors (nothing copied), the
    MLP activations as FusableTanhGelu. ``dit`` itself stays the reference."""
    shared = {id(t): t for t in (*dit.parameters(), *dit.buffers())}
    out = copy.deepcopy(dit, memo=shared)
    for block in out.blocks:
        block.mlp.act = FusableTanhGelu()
    return out


class DitStepModule(torch.nn.Module):
    """Wraps DiT.step with a valid-length input instead of a boolean mask, the condition per token
    (``token_frames`` = GRAPH_TOKEN_FRAMES) and the fusable GELU form. ``reference``: the DiT as given (golden path)."""

    def __init__(self, dit: DiT) -> None:
        super().__init__()
        self.dit = export_form(dit)
        self.__dict__["reference"] = dit  # not a submodule: its tensors are dit's, registered once
        self.cfg = dit.cfg

    def forward(self, x_t: torch.Tensor, t_int: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                prefix_k: torch.Tensor, prefix_v: torch.Tensor, prefix_len: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slots = torch.arange(prefix_k.shape[3], device=x_t.device)
        mask = (slots < prefix_len)[None, :]
        return self.dit.step(x_t, t_int, tokens, positions, prefix_k, prefix_v, prefix_mask=mask,
                             token_frames=GRAPH_TOKEN_FRAMES)


class DitStepGraph(GraphSpec):
    name = "dit_step"
    dynamic_axes = {
        "x_t": {1: "frames"}, "tokens": {1: "frames"}, "positions": {1: "frames"},
        "prefix_k": {3: "prefix"}, "prefix_v": {3: "prefix"},
        "velocity": {1: "frames"}, "k": {3: "frames"}, "v": {3: "frames"},
    }
    parity_lengths = tuple(_PARITY_PREFIX)  # chunk frames; prefixes in _PARITY_PREFIX
    fp32_tolerance = ErrorStats(max_abs=1e-4, rel_l2=1e-5)

    def build(self, snapshot: Path) -> torch.nn.Module:
        return DitStepModule(load_dit(snapshot)).eval()

    def example_inputs(self, module: torch.nn.Module, length: int, seed: int) -> Tuple[torch.Tensor, ...]:
        cfg = module.cfg
        g = torch.Generator().manual_seed(seed)
        prefix, valid = _PARITY_PREFIX.get(length, _DEFAULT_PREFIX)
        start = int(torch.randint(0, _MAX_START_POSITION, (1,), generator=g))
        kv_shape = (cfg.depth, 1, cfg.num_heads, prefix, cfg.head_dim)
        return (
            torch.randn(1, length, cfg.input_size, generator=g),
            torch.randint(0, TIMESTEP_SCALE, (1,), generator=g),  # t_int in [0, 1000)
            grouped_ids(torch.randint(0, cfg.semantic_vocab_size, (1, -(-length // GRAPH_TOKEN_FRAMES)), generator=g),
                        length),
            torch.arange(start + prefix, start + prefix + length)[None],
            torch.randn(kv_shape, generator=g),
            torch.randn(kv_shape, generator=g),
            torch.tensor([valid]),
        )

    def profiles(self, module: torch.nn.Module) -> Dict[str, ShapeProfile]:
        cfg, streaming = module.cfg, StreamingConfig()
        window = streaming.max_kv_cache_frames
        low, opt, high = frames_profile(streaming, self.name)
        frames = lambda *rest: ShapeProfile((1, low, *rest), (1, opt, *rest), (1, high, *rest))  # noqa: E731
        kv = ShapeProfile(*((cfg.depth, 1, cfg.num_heads, p, cfg.head_dim) for p in (MIN_PREFIX, window, window)))
        fixed = ShapeProfile((1,), (1,), (1,))
        return {
            "x_t": frames(cfg.input_size), "tokens": frames(), "positions": frames(),
            "prefix_k": kv, "prefix_v": kv, "t_int": fixed, "prefix_len": fixed,
        }

    def calibration_feeds(self, module: torch.nn.Module, context: CalibrationContext) -> List[Dict[str, np.ndarray]]:
        """The step inputs the golden streaming detokenizer really produces from the semantic tokens of real speech:
        up to _CALIBRATION_CHUNKS chunks spread over all clips (first chunk, window filling, full window), and in
        each up to _CALIBRATION_CALLS_PER_CHUNK evaluations spread from t_int 0 to the priming pass."""
        from kimia_edge.runtime.dit_onnx import pad_prefix

        pipe = context.pipeline()
        cfg, streaming = module.cfg, pipe.streaming
        token_ids = [pipe.encode_audio(clip).semantic_ids for clip in context.speech_16k]
        total = sum(_chunk_count(streaming, len(ids)) for ids in token_ids)
        if total == 0:
            return []
        keep_chunks = set(np.linspace(0, total - 1, min(total, _CALIBRATION_CHUNKS)).round().astype(int).tolist())
        keep_calls = set(np.linspace(0, streaming.ode_time_points - 1, _CALIBRATION_CALLS_PER_CHUNK)
                         .round().astype(int).tolist())
        feeds: List[Dict[str, np.ndarray]] = []
        state = {"chunk": -1, "call": 0, "prefix": None, "padded": None}

        def recording_step(x_t, t_int, tokens, positions, prefix_k, prefix_v):
            if prefix_k is not state["prefix"]:          # a new chunk: the state machine swaps its cache arrays
                state.update(chunk=state["chunk"] + 1, call=0, prefix=prefix_k, padded=None)
            if state["chunk"] in keep_chunks and state["call"] in keep_calls:
                if state["padded"] is None:              # one graph-ready copy per chunk, shared by its feeds
                    state["padded"] = pad_prefix(prefix_k, prefix_v, cfg.depth, cfg.num_heads, cfg.head_dim)
                pk, pv, n = state["padded"]
                feeds.append({"x_t": np.array(x_t, np.float32), "t_int": np.asarray(t_int, np.int64).reshape(1),
                              "tokens": np.array(tokens, np.int64), "positions": np.array(positions, np.int64),
                              "prefix_k": pk, "prefix_v": pv, "prefix_len": np.array([n], np.int64)})
            state["call"] += 1
            return pipe.dit_step(x_t, t_int, tokens, positions, prefix_k, prefix_v)

        for i, ids in enumerate(token_ids):
            det = StreamingDetokenizer(recording_step, pipe.vocode, streaming, pipe.dit_config,
                                       noise=np.random.default_rng(i))
            for _ in [*det.push(ids), *det.finish()]:
                pass
        state.update(prefix=None, padded=None)
        return feeds


def grouped_ids(ids: torch.Tensor, frames: int) -> torch.Tensor:
    """[1, N] token ids -> [1, frames] frame ids, each id repeated GRAPH_TOKEN_FRAMES times (as the detokenizer
    upsamples), the last group cut to ``frames``."""
    return ids.repeat_interleave(GRAPH_TOKEN_FRAMES, dim=1)[:, :frames]


def _chunk_count(streaming: StreamingConfig, tokens: int) -> int:
    """Chunks the streaming detokenizer runs for ``tokens`` ids pushed at once and finished."""
    index = 0
    while tokens > streaming.chunk_tokens_at(index):
        tokens -= streaming.chunk_tokens_at(index)
        index += 1
    return index + (1 if tokens else 0)
