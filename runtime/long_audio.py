"""Long recordings for transcription: split a clip into pieces that each fit the LLM's context, transcribe the
pieces one after another, join the text.

Splitting (``split_for_context``): fixed windows of at most ``max_seconds``; each piece ends at a pause near its
window end — found by ``pause_finder`` if one is given (a VAD: ``runtime/vad.py`` can be plugged in), else at the
quietest 20 ms frame of the last ``search_seconds`` — and the next piece starts ``overlap_seconds`` before that cut, so
a word the cut clips is heard whole by one of the two pieces. ``join_transcripts`` drops the text the overlap
repeats.

How long a piece may be (``max_piece_seconds``): the prompt of a piece takes a fixed number of positions plus 12.5 per
second of speech (``frontend.tokens_for_samples``), and the transcript needs one position per generated step: at
most ``max_steps`` if a cap is given, else a budget of ``TEXT_STEPS_PER_S`` per second of speech (far above the
speaking rate of any language) plus ``TEXT_STEPS_FIXED``.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .frontend import SAMPLE_RATE_HZ, SAMPLES_PER_TOKEN

__all__ = ["split_for_context", "quietest_point", "max_piece_seconds", "join_transcripts", "PauseFinder",
           "TEXT_STEPS_PER_S", "TEXT_STEPS_FIXED", "EmptyTranscriptError", "plan_pieces", "transcribe_pieces",
           "asr_prompt_overhead"]

# (samples_16k, lo, hi) -> a cut index in (lo, hi], or None to fall back to the quietest point
PauseFinder = Callable[[np.ndarray, int, int], Optional[int]]

TEXT_STEPS_PER_S = 8.0   # generated text positions budgeted per second of speech (speech runs at 2-5 tokens/s)
TEXT_STEPS_FIXED = 32    # and a fixed allowance (the end-of-text token, a short clip's whole answer)
_POSITIONS_PER_S = SAMPLE_RATE_HZ / SAMPLES_PER_TOKEN  # 12.5
_FRAME, _HOP = SAMPLE_RATE_HZ // 50, SAMPLE_RATE_HZ // 100  # 20 ms frames every 10 ms


class EmptyTranscriptError(ValueError):
    """Audible speech gave an empty transcript: reported, never passed off as a result."""


def quietest_point(samples: np.ndarray, lo: int, hi: int) -> int:
    """The centre of the 20 ms frame with the least energy in ``samples[lo:hi]`` (the latest of equal ones, so
    pieces stay long); ``hi`` if the range is shorter than a frame."""
    x = np.asarray(samples[lo:hi], dtype=np.float64)
    if x.size < _FRAME:
        return hi
    c = np.concatenate([[0.0], np.cumsum(x * x)])
    starts = np.arange(0, x.size - _FRAME + 1, _HOP)
    energy = c[starts + _FRAME] - c[starts]
    best = len(energy) - 1 - int(np.argmin(energy[::-1]))
    return lo + int(starts[best]) + _FRAME // 2


def split_for_context(samples_16k: np.ndarray, max_seconds: float, *, overlap_seconds: float = 0.5,
                      search_seconds: Optional[float] = None,
                      pause_finder: Optional[PauseFinder] = None) -> List[Tuple[int, int]]:
    """(start, end) sample ranges covering ``samples_16k`` in order, each at most ``max_seconds`` long; consecutive
    pieces overlap by ``overlap_seconds``. ``search_seconds`` (default min(5 s, a quarter window)): how far before
    the window end a cut is looked for. ValueError for a window too short to make progress."""
    n = int(len(samples_16k))
    window = int(max_seconds * SAMPLE_RATE_HZ)
    if window < SAMPLE_RATE_HZ:
        raise ValueError(f"max_seconds={max_seconds}: a piece must hold at least 1 s of speech")
    overlap = int(overlap_seconds * SAMPLE_RATE_HZ)
    if not 0 <= overlap <= window // 4:
        raise ValueError(f"overlap_seconds={overlap_seconds}: expected 0..{max_seconds / 4:g} (a quarter window)")
    search = int((min(5.0, max_seconds / 4) if search_seconds is None else search_seconds) * SAMPLE_RATE_HZ)
    search = max(1, min(search, window // 2))
    pieces: List[Tuple[int, int]] = []
    start = 0
    while True:
        if n - start <= window:
            pieces.append((start, n))
            return pieces
        lo, hi = start + window - search, start + window
        cut = pause_finder(samples_16k, lo, hi) if pause_finder is not None else None
        if cut is None or not lo < cut <= hi:
            cut = quietest_point(samples_16k, lo, hi)
        pieces.append((start, cut))
        start = cut - overlap  # > the previous start: cut >= start + window/2 and overlap <= window/4


def max_piece_seconds(n_ctx: int, prompt_overhead: int, max_steps: Optional[int] = None) -> float:
    """The longest piece whose prompt (``prompt_overhead`` + 12.5 positions/s) and transcript fit ``n_ctx``
    positions (see the module docstring). ValueError if not even a second fits."""
    room = n_ctx - prompt_overhead - 1  # one position of margin for the token count's rounding up
    budgeted = (room - TEXT_STEPS_FIXED) / (_POSITIONS_PER_S + TEXT_STEPS_PER_S)
    capped = (room - max_steps) / _POSITIONS_PER_S if max_steps is not None else 0.0
    seconds = max(budgeted, capped)
    if seconds < 1.0:
        raise ValueError(f"the LLM context of {n_ctx} positions leaves no room for a second of speech "
                         f"(prompt overhead {prompt_overhead}, max_steps {max_steps})")
    return math.floor(seconds * 10) / 10


def join_transcripts(texts: Sequence[str], max_overlap_chars: int = 40) -> str:
    """The pieces' texts in order, each without the longest start (>= 2 characters, at most ``max_overlap_chars``)
    that repeats the end of the text before it — what the overlap between pieces transcribed twice."""
    out = ""
    for text in texts:
        text = text.strip()
        if out and text:
            limit = min(max_overlap_chars, len(out), len(text))
            k = next((k for k in range(limit, 1, -1) if out.endswith(text[:k])), 0)
            text = text[k:].lstrip()
            if text:
                glued = text[0] in _CLOSING_PUNCTUATION or (_no_space_script(out[-1]) and _no_space_script(text[0]))
                sep = "" if glued else " "
                out += sep + text
        elif text:
            out = text
    return out


_CLOSING_PUNCTUATION = set(".,!?;:)]}'\"%…，。！？；：、）」』")


def _no_space_script(ch: str) -> bool:
    """Scripts written without spaces between words (CJK, kana)."""
    return "\u3040" <= ch <= "\u30ff" or "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"


def plan_pieces(pipe, clip_16k: np.ndarray, max_steps: Optional[int] = None,
                pause_finder: Optional[PauseFinder] = None) -> List[Tuple[int, int]]:
    """The pieces ``clip_16k`` (16 kHz mono) is transcribed in by ``pipe`` (a text-only ``Pipeline``): one if its
    LLM has no fixed context, else as many as ``split_for_context`` needs for that context."""
    n_ctx = getattr(pipe.c.backend, "n_ctx", None)
    if n_ctx is None:
        return [(0, len(clip_16k))]
    overhead = asr_prompt_overhead(pipe)
    return split_for_context(clip_16k, max_piece_seconds(n_ctx, overhead, max_steps), pause_finder=pause_finder)


def transcribe_pieces(pipe, clip_16k: np.ndarray, pieces: Sequence[Tuple[int, int]], config_for: Callable[[], object],
                      on_piece: Optional[Callable[[], object]] = None) -> str:
    """Transcribes each piece (``config_for()`` makes its GenerationConfig; ``on_piece()`` after each one, e.g. a
    progress bar's update) and joins the text. EmptyTranscriptError if the joined text is empty."""
    texts = []
    for start, end in pieces:
        texts.append(pipe.run(clip_16k[start:end], SAMPLE_RATE_HZ, "asr", config=config_for()).text)
        if on_piece is not None:
            on_piece()
    text = join_transcripts(texts)
    if not text.strip():
        raise EmptyTranscriptError(f"empty transcript of {len(clip_16k) / SAMPLE_RATE_HZ:.1f} s of audible audio "
                                   f"({len(pieces)} piece(s)): a step limit too small, or a model that says nothing")
    return text


def asr_prompt_overhead(pipe) -> int:
    """Prompt positions of an ASR turn besides the speech's own 12.5/s (measured on 1 s of low noise)."""
    from .frontend import tokens_for_samples
    from .pipeline import build_turn_prompt

    probe = (np.random.default_rng(0).standard_normal(SAMPLE_RATE_HZ) * 1e-3).astype(np.float32)
    return len(build_turn_prompt(pipe.c, "asr", probe, [], "text")) - tokens_for_samples(len(probe))
