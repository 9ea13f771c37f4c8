"""One streaming turn: the generation loop on its own thread, the detokenizer + vocoder on another, the C++ rings
between them (architecture §3). Text comes back as events while the LLM runs; speech comes back in chunks as
soon as the detokenizer has emitted them, long before the answer is finished.

    generation thread --audio tokens--> [TokenRing] --> synthesis thread --samples--> [AudioRing] --> caller / sink
           \\--text pieces / step events--> event queue --> caller

Threads hand results through rings and one event queue that also forwards exceptions (never by polling a
shared dict); every ring is closed on the way out, so nobody waits forever.

A turn can be cancelled at any moment (``cancel()``, from any thread, or by closing the event iterator): the
generation thread stops before its next LLM step, the synthesis thread before its next network call, both rings
close, both threads are joined, and the iteration ends with ``stats.stop == "cancelled"``.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Union

import numpy as np

from kimia_edge.runtime.detokenizer import Interrupted, StreamingDetokenizer, WaveChunk
from kimia_edge.runtime.generation import GenerationConfig, GenerationStep, IncrementalTextDecoder, generate_steps
from kimia_edge.runtime.llm_backend import LLMBackend
from kimia_edge.runtime.prompt import Prompt
from kimia_edge.runtime.rings import AudioRing, RingClosedError, TokenRing
from kimia_edge.runtime.special_tokens import SpecialTokens
from kimia_edge.runtime.synthesis_pipeline import SynthesisPipeline

TOKEN_RING_CAPACITY = 4096  # 5.5 min of 12.5 Hz tokens: the LLM never waits for the detokenizer
_AUDIO_READ_SAMPLES = 4800  # 0.2 s at 24 kHz per read by the consumer
_SYNTH_READ_TOKENS = 64


@dataclass
class TextEvent:
    text: str  # the new piece of decoded text


@dataclass
class AudioEvent:
    samples: np.ndarray  # [n] float32 at the vocoder's rate


@dataclass
class HistoryTrimmedEvent:
    """First event of a turn whose prompt would not have left the answer room in the LLM's context: the oldest
    history was dropped (runtime/history.py). dropped_turns: whole turns removed; dropped_audio: user audio messages
    replaced by nothing; reason: one sentence with the numbers, for the user."""

    dropped_turns: int
    dropped_audio: int
    reason: str


@dataclass
class TurnStats:
    """Timings in seconds from the start of the turn; counters from the rings."""

    prefill_s: float = 0.0
    first_text_s: Optional[float] = None
    first_audio_s: Optional[float] = None
    llm_steps: int = 0
    llm_seconds: float = 0.0
    synth_seconds: float = 0.0  # time spent in the detokenizer + vocoder
    audio_samples: int = 0
    stop: str = ""
    rings: Dict[str, Dict[str, int]] = field(default_factory=dict)

    @property
    def llm_steps_per_s(self) -> float:
        return self.llm_steps / self.llm_seconds if self.llm_seconds else 0.0


Event = Union[TextEvent, AudioEvent, HistoryTrimmedEvent]
_DONE = object()


def text_tokens_heard(audio_text_counts: List[int], played_samples: int, samples_per_token: int) -> int:
    """Text tokens to keep when ``played_samples`` of a turn's speech were played (barge-in).

    The detokenizer's output is one continuous timeline: the first chunk emits half its samples and holds the rest
    back for the cross-fade with the next chunk, which emits them (cross-faded) first, so sample ``s`` of the turn's
    speech always belongs to audio token ``s // samples_per_token`` (24 kHz / 12.5 Hz = 1920). A token counts as heard
    once its first sample was played: tokens heard = ceil(played / samples_per_token), at most the tokens written.
    The text kept is what the LLM had generated at the step of the last token heard, ``audio_text_counts[heard - 1]``
    (the text stream leads the speech by the audio delay, so this includes the ~6 steps of text the speech was about
    to say); nothing played keeps no text."""
    if played_samples < 0 or samples_per_token <= 0:
        raise ValueError(f"played_samples: expected >= 0 (and samples_per_token > 0), got {played_samples}, "
                         f"{samples_per_token}")
    heard = min(len(audio_text_counts), -(-played_samples // samples_per_token))
    return audio_text_counts[heard - 1] if heard else 0


class StreamingTurn:
    """Runs one turn; iterate it (once) for events. ``stats`` is complete once iteration ends."""

    def __init__(self, backend: LLMBackend, prompt: Prompt, tokens: SpecialTokens, token_offset: int,
                 config: GenerationConfig, decode_bytes: Callable[[List[int]], bytes],
                 detokenizer: Optional[StreamingDetokenizer], audio_capacity_samples: int = 24_000 * 60,
                 pipelined: bool = False) -> None:
        self.backend, self.prompt, self.tokens, self.token_offset = backend, prompt, tokens, token_offset
        self.config = config
        self.decoder = IncrementalTextDecoder(decode_bytes)
        self.detokenizer = detokenizer if config.output_type == "both" else None
        self.pipelined = pipelined  # vocoder of chunk k beside the DiT of chunk k+1 (runtime/synthesis_pipeline.py)
        self.token_ring = TokenRing(TOKEN_RING_CAPACITY, "block")
        # 'block': the synthesis thread waits for a slow consumer rather than dropping speech
        self.audio_ring = AudioRing(audio_capacity_samples, "block")
        self.events: "queue.Queue[object]" = queue.Queue()
        self.stats = TurnStats()
        self.text_ids: List[int] = []
        # per audio token written to the token ring: len(text_ids) at the LLM step that produced it (truncation)
        self.audio_text_counts: List[int] = []
        self._t0 = 0.0
        self._threads: List[threading.Thread] = []
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Stops the turn as soon as possible (thread-safe; idempotent). The iteration then ends without error."""
        self._cancel.set()
        self.token_ring.close()
        self.audio_ring.close()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def threads_alive(self) -> int:
        """Worker threads still running (0 once the iteration has ended, however it ended)."""
        return sum(t.is_alive() for t in self._threads)

    # ---- threads -------------------------------------------------------------------------------------------
    def _generate(self) -> None:
        try:
            start = time.perf_counter()
            first = True
            steps = generate_steps(self.backend, self.prompt, self.tokens, self.token_offset, self.config)
            for step in steps:
                if first:
                    self.stats.prefill_s = time.perf_counter() - self._t0
                    start, first = time.perf_counter(), False
                self._on_step(step)
                if self._cancel.is_set():  # between two LLM steps
                    steps.close()
                    break
            self.stats.llm_seconds = time.perf_counter() - start
            tail = self.decoder.flush()
            if tail and not self._cancel.is_set():
                self.events.put(TextEvent(tail))
        except RingClosedError:
            if not self._cancel.is_set():
                self.events.put(RuntimeError("the token ring was closed while the LLM was still running"))
        except BaseException as exc:  # forwarded to the caller, who re-raises it
            self.events.put(exc)
        finally:
            self.token_ring.close()
            self.events.put(_DONE)

    def _on_step(self, step: GenerationStep) -> None:
        self.stats.llm_steps = step.index + 1
        self.stats.stop = step.stop or self.stats.stop
        if step.text_token is not None:
            self.text_ids.append(step.text_token)
            piece = self.decoder.push(step.text_token)
            if piece:
                if self.stats.first_text_s is None:
                    self.stats.first_text_s = time.perf_counter() - self._t0
                self.events.put(TextEvent(piece))
        if step.audio_token is not None and self.detokenizer is not None:
            self.audio_text_counts.append(len(self.text_ids))
            self.token_ring.write(np.array([step.audio_token], dtype=np.int32))

    def _synthesize(self) -> None:
        det = self.detokenizer
        pipe = SynthesisPipeline(det, self._write_chunk) if self.pipelined else None
        push = pipe.push if pipe else lambda ids: self._write_chunks(det.push(ids))
        finish = pipe.finish if pipe else lambda: self._write_chunks(det.finish())
        buf = np.empty(_SYNTH_READ_TOKENS, dtype=np.int32)
        try:
            while self.token_ring.wait_readable(1):  # False only once closed and drained
                n = self.token_ring.read_into_nowait(buf[: min(len(buf), self.token_ring.available)])
                self._timed(lambda: push(buf[:n].astype(np.int64)))
            if not self._cancel.is_set():
                self._timed(finish)
        except (Interrupted, RingClosedError):
            if not self._cancel.is_set():
                self.events.put(RuntimeError("synthesis stopped: its ring was closed while the turn was running"))
        except BaseException as exc:
            self.events.put(exc)
        finally:
            if pipe is not None:
                pipe.close()
            self.audio_ring.close()

    def _timed(self, work: Callable[[], None]) -> None:
        """Runs ``work`` and adds its wall time to ``stats.synth_seconds`` (pipelined: the DiT, plus the wait for
        the last vocoder call at the end)."""
        start = time.perf_counter()
        work()
        self.stats.synth_seconds += time.perf_counter() - start

    def _write_chunks(self, chunks: Iterator[WaveChunk]) -> None:
        for chunk in chunks:
            self._write_chunk(chunk)

    def _write_chunk(self, chunk: WaveChunk) -> None:
        """Hands a chunk's samples to the consumer (the synthesis thread, or the vocoder worker when pipelined)."""
        if self.stats.first_audio_s is None and len(chunk.wav):
            self.stats.first_audio_s = time.perf_counter() - self._t0
        self.audio_ring.write(np.ascontiguousarray(chunk.wav, dtype=np.float32))
        self.stats.audio_samples += len(chunk.wav)

    # ---- consumer ------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Event]:
        if self._threads:
            raise RuntimeError("a StreamingTurn runs once; build a new one for the next turn")
        self._t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._generate, name="kimia-generate", daemon=True)]
        if self.detokenizer is not None:
            self.detokenizer.reset()
            self.detokenizer.interrupt = self._cancel
            self._threads.append(threading.Thread(target=self._synthesize, name="kimia-synthesize", daemon=True))
        else:
            self.audio_ring.close()
        for t in self._threads:
            t.start()
        try:
            yield from self._events()
        finally:  # normal end, an error, cancel(), or the caller closing / dropping this iterator
            if self.threads_alive:
                self.cancel()
            for t in self._threads:
                t.join()
            if self._cancel.is_set():
                self.stats.stop = "cancelled"
            self.stats.rings = {"tokens": self.token_ring.stats(), "audio": self.audio_ring.stats()}

    def _events(self) -> Iterator[Event]:
        out = np.empty(_AUDIO_READ_SAMPLES, dtype=np.float32)
        generation_done = False
        error: Optional[BaseException] = None
        while not self._cancel.is_set():
            try:
                while True:
                    item = self.events.get_nowait()
                    if item is _DONE:
                        generation_done = True
                    elif isinstance(item, BaseException):
                        error = error or item
                    else:
                        yield item  # type: ignore[misc]
            except queue.Empty:
                pass
            if error is not None:
                self._abort()
                raise error
            # wake on audio, or every 20 ms for text events; reads only what is there (no false underruns)
            if self.audio_ring.wait_readable(1, timeout=0.02):
                n = self.audio_ring.read_into_nowait(out[: min(len(out), self.audio_ring.available)])
                yield AudioEvent(out[:n].copy())
            elif generation_done and self.audio_ring.closed and self.audio_ring.available == 0:
                break
        for t in self._threads:
            t.join()
        while not self.events.empty():  # a late error from the synthesis thread
            item = self.events.get_nowait()
            if isinstance(item, BaseException):
                raise item

    def _abort(self) -> None:
        self.token_ring.close()
        self.audio_ring.close()
