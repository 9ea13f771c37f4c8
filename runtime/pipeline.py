"""The torch-free pipeline users run: speech in, text and speech out, from a bundle.

    pipe = Pipeline.from_bundle("bundle/")
    for event in pipe.turn(samples, sample_rate_hz, task="chat"):
        ...                       # TextEvent(text) while the LLM runs, AudioEvent(samples) as speech is ready
    print(pipe.last_metrics.table())

The components (audio tokenizer, LLM backend, detokenizer networks) are injected, so the same class runs the
ONNX / llama.cpp artifacts of a bundle or, in parity tests, the PyTorch reference.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from kimia_edge.runtime.detokenizer import NoiseSource, StreamingDetokenizer
from kimia_edge.runtime.frontend import to_16k_mono
from kimia_edge.runtime.generation import GenerationConfig
from kimia_edge.runtime.llm_backend import LLMBackend
from kimia_edge.runtime.metrics import RunMetrics
from kimia_edge.runtime.prompt import AudioEncoding, build_prompt
from kimia_edge.runtime.special_tokens import SpecialTokens
from kimia_edge.runtime.streaming import AudioEvent, Event, StreamingTurn, TextEvent
from kimia_edge.runtime.tasks import TASK_TABLE, generation_config, task_messages
from kimia_edge.runtime.text_tokenizer import TextTokenizer

log = logging.getLogger(__name__)

INPUT_SAMPLE_RATE_HZ = 16_000  # both audio encoders take 16 kHz (reference §1)


@dataclass
class Components:
    """Everything a turn needs. ``make_detokenizer(noise)`` returns a fresh streaming detokenizer."""

    encode_audio: Callable[[np.ndarray], AudioEncoding]
    backend: LLMBackend
    make_detokenizer: Callable[[NoiseSource], StreamingDetokenizer]
    tokens: SpecialTokens
    text_tokenizer: TextTokenizer
    token_offset: int
    output_sample_rate_hz: int
    providers: Dict[str, str] = field(default_factory=dict)


class Pipeline:
    def __init__(self, components: Components) -> None:
        self.c = components
        self.history: List[Dict[str, Any]] = []
        self.last_metrics: Optional[RunMetrics] = None
        self.last_text: str = ""

    def turn(self, samples: np.ndarray, sample_rate_hz: int, task: str = "chat", *,
             config: Optional[GenerationConfig] = None, seed: Optional[int] = None,
             keep_history: bool = False) -> Iterator[Event]:
        """Streams one turn on the user clip ``samples`` [S] or [S, C] at ``sample_rate_hz`` (resampled to 16 kHz,
        mixed to mono). With ``keep_history`` the clip and the text answer join the history of later turns."""
        if task not in TASK_TABLE:
            raise ValueError(f"task must be one of {tuple(TASK_TABLE)}, got {task!r}")
        start = time.perf_counter()
        clip = to_16k_mono(np.asarray(samples, dtype=np.float32), sample_rate_hz)
        config = config or generation_config(task, seed)
        encoded: Dict[int, AudioEncoding] = {}

        def tokenize_audio(content: Any) -> AudioEncoding:
            if id(content) not in encoded:
                encoded[id(content)] = self.c.encode_audio(np.asarray(content, dtype=np.float32))
            return encoded[id(content)]

        prompt = build_prompt(task_messages(task, clip, self.history), config.output_type, self.c.tokens,
                              self.c.token_offset, self.c.text_tokenizer.encode, tokenize_audio)
        encode_s = time.perf_counter() - start
        noise = np.random.default_rng(None if seed is None else seed + 1)
        detokenizer = self.c.make_detokenizer(noise) if config.output_type == "both" else None
        streaming = StreamingTurn(self.c.backend, prompt, self.c.tokens, self.c.token_offset, config,
                                  self.c.text_tokenizer.decode_bytes, detokenizer)
        text: List[str] = []
        for event in streaming:
            if isinstance(event, TextEvent):
                text.append(event.text)
            yield event
        self.last_text = "".join(text)
        self.last_metrics = RunMetrics.of(streaming.stats, len(clip) / INPUT_SAMPLE_RATE_HZ, encode_s,
                                          self.c.output_sample_rate_hz, self.c.providers)
        if keep_history:
            self.history += [{"role": "user", "message_type": "audio", "content": clip},
                             {"role": "assistant", "message_type": "text", "content": self.last_text}]

    def run(self, samples: np.ndarray, sample_rate_hz: int, task: str = "chat", **kwargs: Any) -> "TurnResult":
        """The whole turn at once: text and the concatenated speech."""
        audio = [e.samples for e in self.turn(samples, sample_rate_hz, task, **kwargs) if isinstance(e, AudioEvent)]
        wav = np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32)
        return TurnResult(self.last_text, wav, self.c.output_sample_rate_hz, self.last_metrics)

    def reset(self) -> None:
        """Forgets the conversation history."""
        self.history = []


@dataclass
class TurnResult:
    text: str
    wav: np.ndarray
    sample_rate_hz: int
    metrics: Optional[RunMetrics]
