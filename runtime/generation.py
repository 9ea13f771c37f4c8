"""Generation loop of Kimi-Audio (reference §2.6, official ``KimiAudio._generate_loop``): one text id and one audio
id per 12.5 Hz step, both fed back.

Per step i (0-based):
- sample the text id then the audio id (that order: one shared RNG) from the last logits; ``recent`` = that stream's
  ids of steps < i (None at i = 0);
- text: once the text stream has emitted ``text_eos`` every later text id is forced to ``text_blank``; the EOS
  itself is fed back once; text ids before the EOS are the output text;
- audio: forced to ``text_blank`` while ``i < audio_delay_tokens`` (the audio stream lags the text by 6 steps;
  kimia.py hard-codes 6 and ignores config ``kimia_mimo_audiodelaytokens``) and always in "text" mode;
- stop: "text" mode when the text stream finished; "both" mode when the audio id is ``msg_end`` or ``media_end``
  (text may be blank-filling by then); otherwise after ``max_new_tokens`` steps.
- output: text ids < kimia_token_offset; audio ids of steps >= delay that are >= the offset, minus the offset.

The loop is a generator of :class:`GenerationStep` events, so text can be streamed to the caller and audio tokens
handed to the detokenizer as they come.

Exact savings (``GenerationConfig.skip_unused_heads``, on by default; not in the official loop): a stream whose
next id is forced (audio in "text" mode and during the delay; text after its EOS) is not sampled, and the backend is
told it does not need that head (``need_text`` / ``need_audio``, runtime/llm_backend.py): a text-only turn never
runs the audio branch, and once the text has ended the trunk's head is not computed. The random stream stays the
same as without the savings: a skipped stream whose sampler would have drawn consumes its one uniform (the sampler
draws exactly one per sampled token), so seeded runs give identical tokens either way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional

import numpy as np

from .frontend import SAMPLE_RATE_HZ, SAMPLES_PER_TOKEN
from .llm_backend import LLMBackend, accepts_head_flags, step_heads
from .prompt import Prompt
from .sampler import GREEDY_TEMPERATURE, SamplerParams, sample_token
from .special_tokens import SpecialTokens

__all__ = ["GenerationConfig", "GenerationStep", "GenerationResult", "generate_steps", "generate", "ContextFullError",
           "context_steps",
           "IncrementalTextDecoder", "AUDIO_DELAY_TOKENS", "MAX_TOTAL_TOKENS_BOTH", "MAX_TOTAL_TOKENS_TEXT"]

# kimia.py: `self.kimia_text_audiodelaytokens = 6` (hard-coded; config.json's kimia_mimo_audiodelaytokens unused).
AUDIO_DELAY_TOKENS = 6
# kimia.py generate(): "both" -> max_new = int(12.5 * 120) - L (120 s of 12.5 Hz speech).
MAX_TOTAL_TOKENS_BOTH = 1500
# kimia.py generate(): "text" with max_new_tokens == -1 -> max_new = 7500 - L.
MAX_TOTAL_TOKENS_TEXT = 7500


@dataclass(frozen=True)
class GenerationConfig:
    """Loop settings; defaults = official ``KimiAudio.generate`` defaults (greedy both streams).

    max_new_tokens: "text" mode only (-1 = MAX_TOTAL_TOKENS_TEXT - L); "both" mode always uses
    ``max_total_tokens_both - L`` as the official code does. seed: numpy Generator seed for the sampler.
    """

    output_type: str = "text"
    text: SamplerParams = field(default_factory=lambda: SamplerParams(0.0, 5, 1.0, 16))
    audio: SamplerParams = field(default_factory=lambda: SamplerParams(0.0, 5, 1.0, 64))
    audio_delay_tokens: int = AUDIO_DELAY_TOKENS
    max_new_tokens: int = -1
    max_total_tokens_both: int = MAX_TOTAL_TOKENS_BOTH
    max_total_tokens_text: int = MAX_TOTAL_TOKENS_TEXT
    seed: Optional[int] = None
    # Not official: an extra cap on loop iterations in both modes (None = the official budgets only). Random-weight
    # test models rarely emit a stop token; this bounds demos and tests.
    step_limit: Optional[int] = None
    # Not official: skip the heads (and the sampling) of streams whose next id is forced; exact (module docstring).
    skip_unused_heads: bool = True

    def validate(self) -> None:
        """Raises ValueError naming the bad field."""
        if self.output_type not in ("text", "both"):
            raise ValueError(f"GenerationConfig.output_type={self.output_type!r}: expected 'text' or 'both'")
        if self.audio_delay_tokens < 0:
            raise ValueError(f"GenerationConfig.audio_delay_tokens={self.audio_delay_tokens}: expected >= 0")
        if self.max_new_tokens < -1:
            raise ValueError(f"GenerationConfig.max_new_tokens={self.max_new_tokens}: expected -1 or >= 0")
        if self.step_limit is not None and self.step_limit < 0:
            raise ValueError(f"GenerationConfig.step_limit={self.step_limit}: expected None or >= 0")
        self.text.validate()
        self.audio.validate()

    def max_steps(self, prompt_len: int) -> int:
        """Number of loop iterations allowed for a prompt of ``prompt_len`` positions (may be <= 0: no step)."""
        if self.output_type == "both":
            budget = self.max_total_tokens_both - prompt_len
        elif self.max_new_tokens == -1:
            budget = self.max_total_tokens_text - prompt_len
        else:
            budget = self.max_new_tokens
        return budget if self.step_limit is None else min(budget, self.step_limit)


@dataclass(frozen=True)
class GenerationStep:
    """One loop step. text_id / audio_id: what was fed back (after forcing). text_token: the id added to the output
    text (None if forced blank, EOS, or an audio-range id). audio_token: semantic id (id - offset) added to the output
    audio, or None. stop: set on the last step ("text_eos", "audio_eos"; "max_tokens" on the final step by budget,
    "context_full" when the LLM's context ended the turn first)."""

    index: int
    text_id: int
    audio_id: int
    text_token: Optional[int]
    audio_token: Optional[int]
    stop: Optional[str] = None


@dataclass(frozen=True)
class GenerationResult:
    """text_ids: output text ids; audio_tokens: semantic ids [M] for the detokenizer; text: decoded (if a decoder was
    given); steps: loop iterations run; stop: why it ended ("text_eos", "audio_eos", "max_tokens")."""

    text_ids: List[int]
    audio_tokens: np.ndarray
    text: Optional[str]
    steps: int
    stop: str


def _prefill(backend: LLMBackend, prompt: Prompt, need_audio: bool, flags: bool):
    args = (prompt.audio_ids, prompt.text_ids, prompt.stacked_features(), prompt.continuous_mask)
    if flags:
        return backend.prefill(*args, need_text=True, need_audio=need_audio)  # type: ignore[call-arg]
    return backend.prefill(*args)


def _needed(logits: Optional[np.ndarray], head: str) -> np.ndarray:
    if logits is None or np.asarray(logits).size == 0:
        raise ValueError(f"the backend returned no {head} logits where the loop samples them "
                         f"(a text_only backend cannot run output_type='both')")
    return logits


def _skip_draw(params: SamplerParams, rng: np.random.Generator) -> None:
    """Consumes what sample_token would have drawn for a stream that is not sampled (one uniform when sampling)."""
    if params.temperature > GREEDY_TEMPERATURE:
        rng.random()


class ContextFullError(ValueError):
    """The prompt (the clip plus the conversation's history) does not fit the LLM's context."""


def context_steps(backend: LLMBackend, prompt_len: int) -> Optional[int]:
    """Steps the backend's context leaves after a prompt of ``prompt_len`` positions (None: the backend has no fixed
    context). Raises ContextFullError, with the numbers, if the prompt alone does not fit."""
    n_ctx = getattr(backend, "n_ctx", None)
    if n_ctx is None:
        return None
    if prompt_len >= n_ctx:
        per_s = SAMPLE_RATE_HZ / SAMPLES_PER_TOKEN  # 12.5 prompt positions per second of speech
        raise ContextFullError(f"the prompt needs {prompt_len} positions but the LLM context holds {n_ctx}: about "
                               f"{(prompt_len - n_ctx) / per_s:.0f} s of speech too many ({per_s:g} positions per "
                               "second, history included); send a shorter clip or start a new conversation")
    return n_ctx - prompt_len


def generate_steps(backend: LLMBackend, prompt: Prompt, tokens: SpecialTokens, token_offset: int,
                   config: GenerationConfig) -> Iterator[GenerationStep]:
    """Resets ``backend``, prefills ``prompt`` and yields one :class:`GenerationStep` per iteration."""
    config.validate()
    rng = np.random.default_rng(config.seed)
    max_steps = config.max_steps(len(prompt))
    room = context_steps(backend, len(prompt))
    context_bound = room is not None and room < max_steps
    if context_bound:
        max_steps = room
    backend.reset()
    if max_steps <= 0:
        return
    skip = config.skip_unused_heads
    flags = skip and accepts_head_flags(backend)
    text_mode = config.output_type == "text"

    def audio_forced(i: int) -> bool:
        return i < config.audio_delay_tokens or text_mode

    text_logits, audio_logits = _prefill(backend, prompt, not audio_forced(0), flags)
    text_hist = np.zeros(max_steps, dtype=np.int64)
    audio_hist = np.zeros(max_steps, dtype=np.int64)
    text_done = False
    audio_stops = set(tokens.audio_stop_ids)
    for i in range(max_steps):
        if i > 0:
            if skip:
                text_logits, audio_logits = step_heads(backend, int(audio_hist[i - 1]), int(text_hist[i - 1]),
                                                       need_text=not text_done, need_audio=not audio_forced(i),
                                                       flags=flags)
            else:
                text_logits, audio_logits = backend.step(int(audio_hist[i - 1]), int(text_hist[i - 1]))
        recent_t = text_hist[:i] if i > 0 else None
        recent_a = audio_hist[:i] if i > 0 else None
        if skip and text_done:
            _skip_draw(config.text, rng)
            t = tokens.text_blank
        else:
            t = sample_token(_needed(text_logits, "text"), config.text, rng, recent_t)
        if skip and audio_forced(i):
            _skip_draw(config.audio, rng)
            a = tokens.text_blank
        else:
            a = sample_token(_needed(audio_logits, "audio"), config.audio, rng, recent_a)
        text_token = None
        if text_done:
            t = tokens.text_blank
        elif t == tokens.text_eos:
            text_done = True
        elif t < token_offset:
            text_token = t
        audio_token = None
        if audio_forced(i):
            a = tokens.text_blank
        elif a >= token_offset:
            audio_token = a - token_offset
        text_hist[i], audio_hist[i] = t, a
        stop = None
        if text_mode and text_done:
            stop = "text_eos"
        elif config.output_type == "both" and a in audio_stops:
            stop = "audio_eos"
        elif i == max_steps - 1:
            stop = "context_full" if context_bound else "max_tokens"
        yield GenerationStep(i, t, a, text_token, audio_token, stop)
        if stop is not None:
            return


def generate(backend: LLMBackend, prompt: Prompt, tokens: SpecialTokens, token_offset: int,
             config: GenerationConfig, decode_text: Optional[Callable[[List[int]], str]] = None,
             on_step: Optional[Callable[[GenerationStep], None]] = None) -> GenerationResult:
    """Runs the loop to the end; ``on_step`` sees every step as it happens (streaming)."""
    text_ids: List[int] = []
    audio: List[int] = []
    steps, stop = 0, "max_tokens"
    for ev in generate_steps(backend, prompt, tokens, token_offset, config):
        if on_step is not None:
            on_step(ev)
        if ev.text_token is not None:
            text_ids.append(ev.text_token)
        if ev.audio_token is not None:
            audio.append(ev.audio_token)
        steps, stop = ev.index + 1, ev.stop or stop
    text = decode_text(text_ids) if decode_text is not None else None
    return GenerationResult(text_ids, np.asarray(audio, dtype=np.int64), text, steps, stop)


class IncrementalTextDecoder:
    """Turns a stream of text ids into UTF-8-safe text pieces: bytes of a character split across tokens are held
    back until complete. ``decode_bytes``: ids -> bytes (e.g. TextTokenizer.decode_bytes)."""

    def __init__(self, decode_bytes: Callable[[List[int]], bytes]) -> None:
        self._decode_bytes = decode_bytes
        self._pending = b""

    def push(self, token_id: int) -> str:
        """Adds one id; returns the newly complete text (may be "")."""
        self._pending += self._decode_bytes([token_id])
        for cut in range(len(self._pending), max(len(self._pending) - 4, -1), -1):
            try:
                text = self._pending[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self._pending = self._pending[cut:]
            return text
        text = self._pending.decode("utf-8", errors="replace")  # not a split character: genuinely invalid bytes
        self._pending = b""
        return text

    def flush(self) -> str:
        """Returns whatever is held back (invalid bytes replaced)."""
        text, self._pending = self._pending.decode("utf-8", errors="replace"), b""
        return text
