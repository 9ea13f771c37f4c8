"""The streaming schedule of the detokenizer and the chunk geometry derived from it (torch-free).

``StreamingConfig`` holds the chunked streaming constants. Defaults are the official ones (kimia.py
``detokenize_audio``, detokenizer/__init__.py ``get_audio_detokenizer`` / ``PrefixStreamingFlowMatchingDetokenizer``);
the first-chunk size and chunk growth are our parameters (the official code fixes both).

The geometry functions below are the one place that says how many frames the DiT step and the vocoder see per
call: the runtime's streaming detokenizer runs that schedule, the exporter writes the graphs' TensorRT profiles
from it, and the bundle loader checks a schedule against the profiles a bundle was exported with.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["StreamingConfig", "SCHEDULES", "schedule_overrides",
           "MIN_PREFIX_SLOTS", "MIN_CHUNK_FRAMES", "GRAPH_TOKEN_FRAMES", "GRAPH_MAX_FRAMES", "dit_frames_max",
           "vocoder_frames_max", "frames_profile", "check_schedule_fits"]

# kimia.py KimiAudio.detokenize_audio: chunk_size = 30 ("hard-coded right now"), first_chunk_size = 30,
# upsample_factor=4 (12.5 Hz tokens -> 50 Hz frames), detokenize_streaming(ode_step=30) default.
_CHUNK_TOKENS = 30
_FIRST_CHUNK_TOKENS = 30
_UPSAMPLE_FACTOR = 4
_ODE_TIME_POINTS = 30
# detokenizer/__init__.py get_audio_detokenizer: look_ahead_tokens=12, max_kv_cache_tokens=900 (frames, the
# StreamingSemanticFMWrapper default passed through); PrefixStreamingFlowMatchingDetokenizer.__init__:
# max_pos_size = 4096, frame_size = 480 ("how many samples in a frame").
_LOOK_AHEAD_TOKENS = 12
_MAX_KV_CACHE_FRAMES = 900
_MAX_POSITIONS = 4096
_FRAME_SIZE_SAMPLES = 480


@dataclass(frozen=True)
class StreamingConfig:
    """Chunk schedule of the streaming detokenizer. Token counts are 12.5 Hz semantic tokens, frames are 50 Hz mel
    frames (one token = ``upsample_factor`` frames), samples are 24 kHz waveform samples.

    Chunk sizes count *consumed* tokens, as in kimia.py: chunk 0 takes ``first_chunk_tokens``, chunk 1
    ``chunk_tokens``, and every later chunk ``chunk_growth_tokens`` more than the previous one, capped at
    ``max_chunk_tokens`` (growth 0 = the official fixed size).
    """

    chunk_tokens: int = _CHUNK_TOKENS
    first_chunk_tokens: int = _FIRST_CHUNK_TOKENS
    chunk_growth_tokens: int = 0
    max_chunk_tokens: Optional[int] = None
    look_ahead_tokens: int = _LOOK_AHEAD_TOKENS
    upsample_factor: int = _UPSAMPLE_FACTOR
    ode_time_points: int = _ODE_TIME_POINTS
    max_kv_cache_frames: int = _MAX_KV_CACHE_FRAMES
    max_positions: int = _MAX_POSITIONS
    frame_size_samples: int = _FRAME_SIZE_SAMPLES

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StreamingConfig":
        """Builds and validates from a plain dict (e.g. the bundle manifest); absent keys take the official
        defaults, unknown keys raise."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"streaming config: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
        cfg = cls(**dict(data))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- derived ------------------------------------------------------------------------------------------------
    @property
    def euler_steps(self) -> int:
        """Euler evaluations per chunk: ode_time_points - 1 (torchdyn over linspace(0, 1, ode_time_points))."""
        return self.ode_time_points - 1

    @property
    def look_ahead_frames(self) -> int:
        return self.look_ahead_tokens * self.upsample_factor

    def chunk_tokens_at(self, index: int) -> int:
        """Tokens consumed by chunk ``index`` (0-based)."""
        if index < 0:
            raise ValueError(f"index: expected >= 0, got {index}")
        if index == 0:
            return self.first_chunk_tokens
        size = self.chunk_tokens + (index - 1) * self.chunk_growth_tokens
        if self.max_chunk_tokens is not None:
            size = min(size, self.max_chunk_tokens)
        return size

    def validate(self) -> None:
        """Raises ValueError naming the field when the fields do not fit together."""
        for name in ("chunk_tokens", "first_chunk_tokens", "upsample_factor", "max_kv_cache_frames",
                     "max_positions", "frame_size_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        if self.look_ahead_tokens < 0:
            raise ValueError(f"look_ahead_tokens: expected >= 0, got {self.look_ahead_tokens}")
        if self.chunk_growth_tokens < 0:
            raise ValueError(f"chunk_growth_tokens: expected >= 0, got {self.chunk_growth_tokens}")
        if self.max_chunk_tokens is not None and self.max_chunk_tokens < self.chunk_tokens:
            raise ValueError(f"max_chunk_tokens: expected >= chunk_tokens {self.chunk_tokens}, "
                             f"got {self.max_chunk_tokens}")
        if self.ode_time_points < 2:
            raise ValueError(f"ode_time_points: expected >= 2 (one Euler step needs two time points), "
                             f"got {self.ode_time_points}")
        # Largest chunk the DiT sees: carried look-ahead + the largest consumed chunk; it must fit the positions.
        if self.chunk_growth_tokens and self.max_chunk_tokens is None:
            raise ValueError("max_chunk_tokens: expected a cap when chunk_growth_tokens > 0, got None")
        frames = dit_frames_max(self)
        if frames > self.max_positions:
            raise ValueError(f"max_positions: expected >= the largest chunk ({frames} frames incl. look-ahead), "
                             f"got {self.max_positions}")


# ---- named schedules -----------------------------------------------------------------------------------------------
# Overrides of the official schedule by name (PipelineOptions.schedule, ``--schedule``):
# - official: 30-token chunks from the first one (kimia.py);
# - first10: a 10-token first chunk, then the official 30 (earlier first audio; the listener may wait at chunk 1);
# - growing: 10 -> 20 -> 30 tokens, then 30: the first chunk as small as first10's, and the step to the official
#   size split in two, so the second chunk (due while the first one's short audio plays) costs 100 DiT frames instead
#   of first10's 140; from the third chunk on it is the official schedule (same profile, same per-chunk work). +10
#   per chunk keeps the extra cost (the 12 look-ahead tokens recomputed, one priming pass per chunk) to one chunk.
#   Measured against the others in docs/benchmarks.md ("Synthesis pipelining and chunk schedules").
SCHEDULES: Dict[str, Dict[str, int]] = {
    "official": {},
    "first10": {"first_chunk_tokens": 10},
    "growing": {"first_chunk_tokens": 10, "chunk_tokens": 20, "chunk_growth_tokens": 10, "max_chunk_tokens": 30},
}


def schedule_overrides(name: str) -> Dict[str, int]:
    """The ``StreamingConfig`` fields that schedule ``name`` sets (ValueError naming the known ones)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)}, got {name!r}")
    return dict(SCHEDULES[name])


# ---- chunk geometry ------------------------------------------------------------------------------------------------
# The DiT step graph's prefix axis never has fewer than MIN_PREFIX_SLOTS slots: torch.export specialises sizes 0 and 1,
# so "no prefix" (the first chunk) is two masked slots (export/graphs/dit_step.py, runtime/dit_onnx.py).
MIN_PREFIX_SLOTS = 2
# Smallest chunk a graph is exported for (a final chunk of one token = 4 frames).
MIN_CHUNK_FRAMES = 4
# The DiT step graph takes one semantic id per frame but reads only every GRAPH_TOKEN_FRAMES-th (frames 0, 4, 8, ...
# of the call): the detokenizer repeats each 12.5 Hz id x4 in aligned groups, so the adaLN condition is computed once
# per token (export/graphs/dit_step.py). runtime/dit_onnx.py refuses tokens that are not grouped so.
GRAPH_TOKEN_FRAMES = _UPSAMPLE_FACTOR
# Largest frames per call the DiT step and vocoder graphs are exported and profiled for: room for chunk growth
# beyond the official 168 / 252 (a larger schedule is refused on load, see check_schedule_fits).
GRAPH_MAX_FRAMES = 512


def dit_frames_max(config: StreamingConfig) -> int:
    """Most 50 Hz frames one DiT step call sees under ``config``: the largest consumed chunk plus the carried
    look-ahead (official: (30 + 12) x 4 = 168)."""
    biggest = max(config.first_chunk_tokens, config.chunk_tokens, config.max_chunk_tokens or 0)
    return (biggest + config.look_ahead_tokens) * config.upsample_factor


def dit_frames_typical(config: StreamingConfig) -> int:
    """Frames of a steady-state chunk (the TensorRT profile's opt): chunk + look-ahead."""
    return (config.chunk_tokens + config.look_ahead_tokens) * config.upsample_factor


def vocoder_frames_max(config: StreamingConfig) -> int:
    """Most mel frames one vocoder call sees: a chunk's mel plus the half of the previous chunk's mel held back for
    the cross-fade (official: 168 + 84 = 252)."""
    frames = dit_frames_max(config)
    return frames + math.ceil(frames / 2)


def frames_profile(config: StreamingConfig, graph: str) -> Tuple[int, int, int]:
    """(min, opt, max) frames per call for ``graph`` ("dit_step" or "vocoder"): what the exporter writes as the
    TensorRT profile. max is GRAPH_MAX_FRAMES, raised if ``config`` needs more."""
    if graph == "dit_step":
        opt, need = dit_frames_typical(config), dit_frames_max(config)
    elif graph == "vocoder":
        opt, need = dit_frames_typical(config) * 3 // 2, vocoder_frames_max(config)
    else:
        raise ValueError(f"graph: expected 'dit_step' or 'vocoder', got {graph!r}")
    return MIN_CHUNK_FRAMES, opt, max(GRAPH_MAX_FRAMES, need)


def check_schedule_fits(config: StreamingConfig, dit_max_frames: int, vocoder_max_frames: int) -> None:
    """Raises ValueError naming both numbers when ``config`` would feed a graph more frames than its profile's max."""
    for graph, need, have in (("dit_step", dit_frames_max(config), dit_max_frames),
                              ("vocoder", vocoder_frames_max(config), vocoder_max_frames)):
        if need > have:
            raise ValueError(f"streaming schedule needs {need} frames per {graph} call (first chunk "
                             f"{config.first_chunk_tokens}, chunk {config.chunk_tokens}, max chunk "
                             f"{config.max_chunk_tokens}, look-ahead {config.look_ahead_tokens} tokens) but the bundle's "
                             f"{graph} profile allows at most {have}")
