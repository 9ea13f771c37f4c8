"""The torch-free pipeline users run: speech in, text and speech out, from a bundle.

    pipe = Pipeline.from_bundle("bundle/", PipelineOptions(llm_precision="Q4_K_M"))
    chat = pipe.conversation()
    for event in chat.turn(samples, sample_rate_hz, task="chat"):
        ...                       # TextEvent(text) while the LLM runs, AudioEvent(samples) as speech is ready
    print(chat.last.metrics.table())

A ``Pipeline`` holds the loaded networks and is shared; a ``Conversation`` holds one conversation's history and its
last result, so one loaded pipeline serves several conversations (one turn at a time: the LLM backend has one KV
state). The components (audio tokenizer, LLM backend, detokenizer networks) are injected, so the same classes run
the ONNX / llama.cpp artifacts of a bundle or, in parity tests, the PyTorch reference.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from kimia_edge.runtime.detokenizer import NoiseSource, StreamingDetokenizer
from kimia_edge.runtime.frontend import SAMPLE_RATE_HZ, SAMPLES_PER_TOKEN, check_audible, to_16k_mono
from kimia_edge.runtime.generation import GenerationConfig, IncrementalTextDecoder, context_steps
from kimia_edge.runtime.history import ANSWER_RESERVE_STEPS, TrimResult, trim_history
from kimia_edge.runtime.llm_backend import LLMBackend
from kimia_edge.runtime.metrics import RunMetrics
from kimia_edge.runtime.on_demand import OnDemand
from kimia_edge.runtime.prompt import AudioEncoding, Prompt, build_prompt
from kimia_edge.runtime.sessions import DEVICES
from kimia_edge.runtime.special_tokens import SpecialTokens
from kimia_edge.runtime.spec.graphs import (GRAPHS, LLM_ADAPTOR, LLM_AUDIO, LLM_TRUNK, RUNTIME_GRAPHS,
                                            TEXT_ONLY_SKIPPED_GRAPHS, TEXT_TOKENIZER, VQ_CODEBOOK)
from kimia_edge.runtime.spec.manifest import Artifact, BundleError, Manifest
from kimia_edge.runtime.spec.precisions import (DEFAULT_PRECISION_SPEC, LLM_PREFERENCE, onnx_precision,
                                                parse_precision_spec, precision_applies)
from kimia_edge.runtime.spec.streaming import StreamingConfig, check_schedule_fits, schedule_overrides
from kimia_edge.runtime.streaming import (AudioEvent, Event, HistoryTrimmedEvent, StreamingTurn, TextEvent,
                                          text_tokens_heard)
from kimia_edge.runtime.tasks import TASK_TABLE, generation_config, task_messages
from kimia_edge.runtime.text_tokenizer import TextTokenizer

log = logging.getLogger(__name__)

INPUT_SAMPLE_RATE_HZ = 16_000  # both audio encoders take 16 kHz (reference §1)
PIPELINED_GRAPHS = ("dit_step", "vocoder")  # the sessions that run at once with pipelined_synthesis


@dataclass(frozen=True)
class PipelineOptions:
    """How to open a bundle; the same object for every CLI verb and the Python API.

    ``precision``: ONNX variant for every graph or per graph (``"fp32,dit_step=int8_dynamic"``); None = the
    registry's default for the device. A graph without the variant falls back to fp32, logged.
    ``llm_precision``: GGUF variant (default: the smallest one the bundle has). ``device``: auto | cpu | cuda |
    tensorrt. ``threads``: per ONNX session and for llama.cpp (None: their defaults). ``n_gpu_layers``: LLM layers on
    the GPU (untested on GPU). ``streaming``: overrides of the bundle's streaming schedule, e.g.
    ``{"first_chunk_tokens": 10}``. ``text_only``: open neither the DiT, the vocoder nor the LLM's audio branch (asr,
    qa). ``cache_dir``: verification stamps and TensorRT engines (default ``~/.cache/kimia-edge``). ``prepack``:
    let ONNX Runtime and llama.cpp repack the weights when they open (a slower start and a private copy of the
    weights, for faster ONNX Runtime synthesis; False starts in seconds and computes on the memory-mapped files: see
    ``runtime/sessions.open_session`` and ``LlamaCppBackend``'s ``repack``). ``n_ctx``: LLM context in positions (12.5 per second of speech,
    history included; None: the backend's default, 4096), at most the model's context length; a conversation trims
    its oldest history to stay inside it. ``low_memory``: the audio encoders are opened for each turn's encoding and
    freed right after it, the DiT and vocoder are opened only when a turn answers with speech and freed when it ends
    and ONNX Runtime's CPU arena is off, so activations are returned after every run (same output; each turn pays
    the opening time, best with ``prepack=False``; a bundle file that ONNX Runtime cannot open is then reported by
    the turn that opens it, not at load). ``schedule``: the named chunk schedule (``official`` 30/30, ``first10``
    10 then 30, ``growing`` 10 -> 20 -> 30; runtime/spec/streaming.py SCHEDULES), applied before ``streaming``.
    ``pipelined_synthesis``: the vocoder of chunk k runs on its own thread while the DiT runs chunk k+1
    (runtime/synthesis_pipeline.py; same samples as the serial path).
    """

    precision: Optional[str] = None
    llm_precision: Optional[str] = None
    device: str = "auto"
    threads: Optional[int] = None
    n_gpu_layers: int = 0
    streaming: Mapping[str, Any] = field(default_factory=dict)
    text_only: bool = False
    cache_dir: Optional[Path] = None
    prepack: bool = True
    n_ctx: Optional[int] = None
    low_memory: bool = False
    schedule: str = "official"
    pipelined_synthesis: bool = False

    def __post_init__(self) -> None:
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))

    def validate(self) -> None:
        """Raises ValueError naming the option that is wrong."""
        if self.device not in DEVICES:
            raise ValueError(f"device: expected one of {DEVICES}, got {self.device!r}")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise ValueError(f"threads: expected 1..1024, got {self.threads}")
        if self.n_gpu_layers < 0:
            raise ValueError(f"n_gpu_layers: expected >= 0, got {self.n_gpu_layers}")
        if self.n_ctx is not None and self.n_ctx < 16:
            raise ValueError(f"n_ctx: expected None or >= 16 positions, got {self.n_ctx}")
        parse_precision_spec(self.precision_spec)
        schedule_overrides(self.schedule)
        unknown = sorted(set(self.streaming) - {f.name for f in dataclasses.fields(StreamingConfig)})
        if unknown:
            raise ValueError(f"streaming: unknown field(s) {unknown}")

    def session_threads(self, graph: str) -> Optional[int]:
        """Intra-op threads of ``graph``'s ONNX session. Pipelined, the DiT step and the vocoder run at once, so each
        gets half the threads (``threads`` or the machine's cores), at least one: two full pools on the same cores
        make each wait at its barriers for threads the other holds (docs/benchmarks.md)."""
        if not self.pipelined_synthesis or graph not in PIPELINED_GRAPHS:
            return self.threads
        return max(1, (self.threads or os.cpu_count() or 2) // 2)

    @property
    def precision_spec(self) -> str:
        return self.precision or DEFAULT_PRECISION_SPEC["gpu" if self.device in ("cuda", "tensorrt") else "cpu"]

    def streaming_config(self, bundle_default: StreamingConfig) -> StreamingConfig:
        """The bundle's schedule with the named ``schedule`` and then ``streaming`` applied, validated."""
        cfg = dataclasses.replace(bundle_default, **{**schedule_overrides(self.schedule), **dict(self.streaming)})
        cfg.validate()
        return cfg


def _nothing() -> None:
    pass


@dataclass
class Components:
    """Everything a turn needs. ``make_detokenizer(noise)`` returns a fresh streaming detokenizer.
    ``release_encoders()`` is called once a turn's prompt is encoded, ``release_speech()`` when the turn is over (both
    free the sessions in low-memory mode, do nothing otherwise). ``parts``: the bundle parts opened on demand, by
    name (``encoders``, ``speech``)."""

    encode_audio: Callable[[np.ndarray], AudioEncoding]
    backend: LLMBackend
    make_detokenizer: Callable[[NoiseSource], StreamingDetokenizer]
    tokens: SpecialTokens
    text_tokenizer: TextTokenizer
    token_offset: int
    output_sample_rate_hz: int
    providers: Dict[str, str] = field(default_factory=dict)
    release_encoders: Callable[[], None] = _nothing
    release_speech: Callable[[], None] = _nothing
    parts: Dict[str, OnDemand] = field(default_factory=dict)
    pipelined_synthesis: bool = False  # turns run the vocoder beside the DiT (runtime/synthesis_pipeline.py)


def _pick(manifest: Manifest, name: str, precision: str) -> Artifact:
    try:
        return manifest.artifact(name, precision)
    except BundleError:
        log.warning("%s: no %s variant in the bundle, using fp32", name, precision)
        return manifest.artifact(name, "fp32")


def choose_artifacts(manifest: Manifest, options: PipelineOptions) -> Dict[str, Artifact]:
    """The artifacts ``options`` open, by role (graph names, ``vq_codebook``, ``text_tokenizer``, ``llm_*``)."""
    chosen = parse_precision_spec(options.precision_spec, RUNTIME_GRAPHS)
    for graph, precision in chosen.items():
        allowed = GRAPHS[graph].precisions
        if allowed is not None and precision not in allowed:
            log.info("%s: %s is not used (allowed: %s), using fp32", graph, precision, allowed)
            chosen[graph] = "fp32"
        elif not precision_applies(precision, graph):
            log.info("%s: %s is not used (made of %s only), using fp32", graph, precision,
                     onnx_precision(precision).graphs)
            chosen[graph] = "fp32"
    if options.text_only:
        for graph in TEXT_ONLY_SKIPPED_GRAPHS:
            del chosen[graph]
    out = {name: _pick(manifest, name, p) for name, p in chosen.items()}
    have = [a.precision for a in manifest.artifacts if a.name == LLM_TRUNK]
    llm_precision = options.llm_precision or next((p for p in LLM_PREFERENCE if p in have), None)
    if llm_precision not in have:
        raise BundleError(f"bundle has no LLM at {llm_precision!r}; it has {sorted(have)}")
    out[LLM_TRUNK] = manifest.artifact(LLM_TRUNK, llm_precision)
    if not options.text_only:
        out[LLM_AUDIO] = manifest.artifact(LLM_AUDIO, llm_precision)
    if any(a.name == LLM_ADAPTOR for a in manifest.artifacts):
        out[LLM_ADAPTOR] = manifest.artifact(LLM_ADAPTOR)
    out[VQ_CODEBOOK] = manifest.artifact(VQ_CODEBOOK)
    out[TEXT_TOKENIZER] = manifest.artifact(TEXT_TOKENIZER)
    return out


def check_bundle_agrees(manifest: Manifest, artifacts: Mapping[str, Artifact], streaming: StreamingConfig,
                        llm_token_offset: int, llm_vocab_size: int) -> None:
    """What two artifacts both state must agree; BundleError names both values.

    - the token offset of the manifest and of the LLM GGUF;
    - the streaming schedule and the frames the DiT step and vocoder graphs were profiled for;
    - every special id inside the LLM's vocabulary."""
    model = manifest.model
    if model.token_offset != llm_token_offset:
        raise BundleError(f"token offset: the manifest says {model.token_offset}, the LLM GGUF "
                          f"{artifacts[LLM_TRUNK].path} says {llm_token_offset}")
    if "dit_step" in artifacts and "vocoder" in artifacts:  # x_t [1, T, 80], mel [1, 80, T]
        dit = artifacts["dit_step"].profiles.get(GRAPHS["dit_step"].inputs[0])
        voc = artifacts["vocoder"].profiles.get(GRAPHS["vocoder"].inputs[0])
        if dit is not None and voc is not None:
            try:
                check_schedule_fits(streaming, dit.max[1], voc.max[2])
            except ValueError as e:
                raise BundleError(str(e)) from None
    outside = {name: i for name, i in dataclasses.asdict(model.special_tokens).items() if not 0 <= i < llm_vocab_size}
    if outside:
        raise BundleError(f"special ids {outside} lie outside the LLM's vocabulary of {llm_vocab_size} "
                          f"({artifacts[LLM_TRUNK].path})")


def components_from_bundle(bundle: Path, options: PipelineOptions = PipelineOptions()) -> Components:
    """Opens the artifacts of a bundle that ``options`` choose, after checking only those (see runtime/bundle.py)."""
    from kimia_edge.runtime.audio_tokenizer import OnnxAudioTokenizer
    from kimia_edge.runtime.bundle import ensure_usable, read_manifest
    from kimia_edge.runtime.dit_onnx import OnnxDitStep, OnnxVocoder
    from kimia_edge.runtime.llm_llamacpp import LlamaCppBackend
    from kimia_edge.runtime.sessions import Session, open_session

    options.validate()
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    model = manifest.model
    artifacts = choose_artifacts(manifest, options)
    streaming = options.streaming_config(model.streaming)
    ensure_usable(bundle, manifest, artifacts.values(), options.cache_dir)

    providers: Dict[str, str] = {}

    def open_graph(name: str) -> Session:
        session = open_session(bundle, artifacts[name], device=options.device, threads=options.session_threads(name),
                               cache_dir=options.cache_dir, prepack=options.prepack, arena=not options.low_memory)
        providers[name] = f"{session.provider} ({artifacts[name].precision})"
        return session

    # memory-mapped: the codebook's pages are the file's, not a copy on the heap
    codebook = np.load(bundle / artifacts[VQ_CODEBOOK].path, allow_pickle=False, mmap_mode="r")
    encoders = OnDemand("audio encoders", lambda: OnnxAudioTokenizer(
        whisper=open_graph("whisper_encoder"), vq=open_graph("vq_encoder"), codebook=codebook,
        vq_config=model.vq_encoder, whisper_config=model.whisper_encoder))
    parts = {"encoders": encoders}
    make_detokenizer = _no_speech_output
    if not options.text_only:
        dit = model.dit
        speech = parts["speech"] = OnDemand("DiT and vocoder", lambda: (
            OnnxDitStep(open_graph("dit_step"), dit.depth, dit.num_heads, dit.head_dim),
            OnnxVocoder(open_graph("vocoder"))))
        make_detokenizer = lambda noise: StreamingDetokenizer(*speech.get(), streaming, dit, noise=noise)  # noqa: E731
    if not options.low_memory:  # everything opens now, and stays open
        for part in parts.values():
            part.get()
    adaptor = artifacts.get(LLM_ADAPTOR)
    backend = LlamaCppBackend(bundle / artifacts[LLM_TRUNK].path,
                              bundle / artifacts[LLM_AUDIO].path if LLM_AUDIO in artifacts else None,
                              bundle / adaptor.path if adaptor else None,
                              n_threads=options.threads, n_gpu_layers=options.n_gpu_layers, text_only=options.text_only,
                              repack=options.prepack,
                              **({"n_ctx": options.n_ctx} if options.n_ctx else {}))
    check_bundle_agrees(manifest, artifacts, streaming, backend.info.token_offset, backend.info.vocab_size)

    text_dir = bundle / Path(artifacts[TEXT_TOKENIZER].path).parent
    llm_precision = artifacts[LLM_TRUNK].precision
    providers["llm"] = f"llama.cpp {llm_precision}" + (
        f", {options.n_gpu_layers} layers on GPU" if options.n_gpu_layers else " (CPU)")
    release = {name: (part.release if options.low_memory else _nothing) for name, part in parts.items()}
    return Components(
        encode_audio=lambda clip: encoders.get().encode(clip), backend=backend, make_detokenizer=make_detokenizer,
        tokens=model.special_tokens, text_tokenizer=TextTokenizer.from_snapshot(text_dir),
        token_offset=model.token_offset, output_sample_rate_hz=model.output_sample_rate_hz, providers=providers,
        release_encoders=release["encoders"], release_speech=release.get("speech", _nothing), parts=parts,
        pipelined_synthesis=options.pipelined_synthesis,
    )


def _no_speech_output(noise: NoiseSource) -> StreamingDetokenizer:
    raise ValueError("this pipeline was opened text_only (no DiT, vocoder or audio branch): it runs the text tasks "
                     f"{tuple(t for t, v in TASK_TABLE.items() if v.output_type == 'text')}, not speech output")


def turn_noise(seed: Optional[int]) -> np.random.Generator:
    """The detokenizer's noise for a turn sampled with ``seed`` (None: fresh entropy). Offset by one so that the
    noise is not the sampler's own stream."""
    return np.random.default_rng(None if seed is None else seed + 1)


def build_turn_prompt(c: Components, task: str, clip_16k: np.ndarray, history: List[Dict[str, Any]],
                      output_type: str, encoded: Optional[Dict[int, AudioEncoding]] = None) -> Prompt:
    """The prompt of one turn of ``task`` on ``clip_16k`` [S] (16 kHz mono) after ``history``; every audio message is
    encoded once (the same clip object twice in the messages is encoded once; ``encoded``, keyed by ``id(clip)``,
    carries the encodings over several calls on the same messages, e.g. while trimming the history)."""
    encoded = {} if encoded is None else encoded

    def tokenize_audio(content: Any) -> AudioEncoding:
        if id(content) not in encoded:
            encoded[id(content)] = c.encode_audio(np.asarray(content, dtype=np.float32))
        return encoded[id(content)]

    return build_prompt(task_messages(task, clip_16k, history), output_type, c.tokens, c.token_offset,
                        c.text_tokenizer.encode, tokenize_audio)


def fit_prompt(c: Components, task: str, clip_16k: np.ndarray, history: List[Dict[str, Any]],
               config: GenerationConfig) -> Tuple[Prompt, TrimResult]:
    """The turn's prompt after the history trimmed (runtime/history.py) so that the answer keeps
    ``min(config.max_steps(prompt), ANSWER_RESERVE_STEPS)`` steps of the backend's context. Raises ContextFullError
    (before any LLM work) if the clip alone, with no history, does not fit the context."""
    encoded: Dict[int, AudioEncoding] = {}
    n_ctx = getattr(c.backend, "n_ctx", None)
    last: List[Any] = [None, None]  # the messages last tried and their prompt

    def fits(kept: List[Dict[str, Any]]) -> bool:
        last[:] = [kept, build_turn_prompt(c, task, clip_16k, kept, config.output_type, encoded)]
        room = min(config.max_steps(len(last[1])), ANSWER_RESERVE_STEPS)
        return n_ctx is None or len(last[1]) + max(room, 1) <= n_ctx

    trim = trim_history(history, fits)
    prompt = last[1] if last[0] is trim.history else build_turn_prompt(c, task, clip_16k, trim.history,
                                                                        config.output_type, encoded)
    context_steps(c.backend, len(prompt))  # a prompt the context cannot hold fails here, in the caller's thread
    return prompt, trim


def _trim_reason(trim: TrimResult, backend: LLMBackend) -> str:
    """One sentence for the user about a trimmed history."""
    parts = [f"{n} {what}" for n, what in ((trim.dropped_audio, "earlier recording(s) of your speech"),
                                          (trim.dropped_turns, "oldest turn(s)")) if n]
    return (f"the conversation no longer fits the model's context of {getattr(backend, 'n_ctx', '?')} positions: "
            f"dropped {' and '.join(parts)}")


class Pipeline:
    """The loaded networks of one bundle (or of the reference), shared by every conversation."""

    @classmethod
    def from_bundle(cls, bundle: Path, options: Optional[PipelineOptions] = None) -> "Pipeline":
        """A pipeline over a bundle's artifacts, opened as ``options`` say (defaults: ``PipelineOptions()``)."""
        return cls(components_from_bundle(bundle, options or PipelineOptions()))

    def __init__(self, components: Components) -> None:
        self.c = components
        self._turn_lock = threading.Lock()  # one turn at a time: the LLM backend holds one KV state

    def conversation(self, keep_history: bool = True) -> "Conversation":
        """A new conversation over this pipeline (``keep_history``: earlier turns are part of later prompts)."""
        return Conversation(self, keep_history)

    def run(self, samples: np.ndarray, sample_rate_hz: int, task: str = "chat", **kwargs: Any) -> "TurnResult":
        """One turn with no history: text and the concatenated speech."""
        return self.conversation(keep_history=False).run(samples, sample_rate_hz, task, **kwargs)


@dataclass
class TurnResult:
    """text: the decoded answer / transcript; wav: [S] float32 at ``sample_rate_hz`` (empty for text tasks)."""

    text: str
    wav: np.ndarray
    sample_rate_hz: int
    metrics: Optional[RunMetrics]


class Conversation:
    """One conversation over a shared pipeline: its history, and its last turn's text and metrics (``last``)."""

    def __init__(self, pipeline: Pipeline, keep_history: bool = True) -> None:
        self.pipeline, self.keep_history = pipeline, keep_history
        self.history: List[Dict[str, Any]] = []
        self.last: Optional[TurnResult] = None
        self._running: Optional[StreamingTurn] = None
        # the last turn's (text ids, per-audio-token text counts, output type): truncate_last's alignment
        self._alignment: Optional[Tuple[List[int], List[int], str]] = None

    def turn(self, samples: np.ndarray, sample_rate_hz: int, task: str = "chat", *,
             config: Optional[GenerationConfig] = None, seed: Optional[int] = None) -> Iterator[Event]:
        """Streams one turn on the user clip ``samples`` [S] or [S, C] at ``sample_rate_hz`` (resampled to 16 kHz,
        mixed to mono). With ``keep_history`` the clip and the text answer join the history of later turns; ``last``
        holds the text and metrics once the iteration ends (its ``wav`` stays empty: the speech was streamed).

        If the prompt would leave the answer too little of the LLM's context, the oldest history is dropped first
        (user audio, then whole turns: runtime/history.py) and the first event is a ``HistoryTrimmedEvent``; a clip
        that does not fit even alone raises ContextFullError before any LLM work. A turn ended early — ``cancel()``,
        or the caller closing the iterator — still joins the history with the text generated so far (see
        ``truncate_last`` for cutting it to what was played)."""
        if task not in TASK_TABLE:
            raise ValueError(f"task must be one of {tuple(TASK_TABLE)}, got {task!r}")
        c = self.pipeline.c
        check_audible(samples)
        clip = to_16k_mono(np.asarray(samples, dtype=np.float32), sample_rate_hz)
        config = config or generation_config(task, seed)
        with self.pipeline._turn_lock:
            try:
                yield from self._locked_turn(c, clip, task, config, seed)
            finally:  # low-memory mode: the DiT and vocoder are freed once the turn's detokenizer is gone
                c.release_speech()

    def _locked_turn(self, c: Components, clip: np.ndarray, task: str, config: GenerationConfig,
                     seed: Optional[int]) -> Iterator[Event]:
        start = time.perf_counter()
        speech = config.output_type == "both"
        if speech and c.make_detokenizer is _no_speech_output:  # a text-only pipeline refuses before any work
            _no_speech_output(turn_noise(seed))
        try:
            prompt, trim = fit_prompt(c, task, clip, self.history, config)
        finally:  # low-memory mode: the encoders are freed as soon as the prompt is encoded
            c.release_encoders()
        # opened after the encoders are gone: in low-memory mode the two are never in memory together
        detokenizer = c.make_detokenizer(turn_noise(seed)) if speech else None
        encode_s = time.perf_counter() - start
        streaming = StreamingTurn(c.backend, prompt, c.tokens, c.token_offset, config,
                                  c.text_tokenizer.decode_bytes, detokenizer, pipelined=c.pipelined_synthesis)
        if trim.trimmed:
            self.history = trim.history
            log.info("history trimmed: %d turns and %d user audio dropped", trim.dropped_turns, trim.dropped_audio)
        text: List[str] = []
        events = iter(streaming)
        self._running = streaming
        ended = False  # True once the iteration ended normally, was cancelled, or was closed by the caller
        try:
            if trim.trimmed:
                yield HistoryTrimmedEvent(trim.dropped_turns, trim.dropped_audio, _trim_reason(trim, c.backend))
            for event in events:
                if isinstance(event, TextEvent):
                    text.append(event.text)
                yield event
            ended = True
        except GeneratorExit:
            ended = True
            raise
        finally:  # closing this generator (or dropping it) cancels the turn and joins its threads
            events.close()
            self._running = None
            if ended:
                self._record(streaming, clip, "".join(text), encode_s, config.output_type)

    def _record(self, streaming: StreamingTurn, clip: np.ndarray, answer: str, encode_s: float,
                output_type: str) -> None:
        c = self.pipeline.c
        metrics = RunMetrics.of(streaming.stats, len(clip) / INPUT_SAMPLE_RATE_HZ, encode_s, c.output_sample_rate_hz,
                                c.providers)
        self.last = TurnResult(answer, np.zeros(0, np.float32), c.output_sample_rate_hz, metrics)
        self._alignment = (list(streaming.text_ids), list(streaming.audio_text_counts), output_type)
        if self.keep_history:  # a cancelled turn keeps the text generated before the cancel
            self.history = self.history + [{"role": "user", "message_type": "audio", "content": clip},
                                           {"role": "assistant", "message_type": "text", "content": answer}]

    def truncate_last(self, played_samples: int) -> str:
        """Cuts the last turn's answer to what the user heard (barge-in) and returns the kept text.

        ``played_samples``: samples of the turn's speech (at ``output_sample_rate_hz``) the speaker actually
        consumed. The text kept is what the LLM had generated when it produced the last audio token heard
        (``streaming.text_tokens_heard``: a token counts once its first sample was played; 1920 samples per token at
        24 kHz); 0 samples keeps no text. Updates ``last.text`` and, with ``keep_history``, the last assistant
        message (the user's clip stays). ValueError if no turn ran yet or the last one had no speech output."""
        if self.last is None or self._alignment is None:
            raise ValueError("truncate_last: no turn has run in this conversation")
        text_ids, counts, output_type = self._alignment
        if output_type != "both":
            raise ValueError("truncate_last: the last turn answered with text only; there is no played speech to "
                             "truncate to")
        c = self.pipeline.c
        per_token = round(c.output_sample_rate_hz * SAMPLES_PER_TOKEN / SAMPLE_RATE_HZ)  # 24 kHz / 12.5 Hz = 1920
        keep = text_tokens_heard(counts, int(played_samples), per_token)
        decoder = IncrementalTextDecoder(c.text_tokenizer.decode_bytes)
        kept = "".join(decoder.push(t) for t in text_ids[:keep])  # a character split at the cut is dropped
        self.last.text = kept
        if self.keep_history and self.history and self.history[-1].get("role") == "assistant":
            self.history[-1] = {**self.history[-1], "content": kept}
        return kept

    def cancel(self) -> None:
        """Cancels the running turn, if any (thread-safe): its iteration ends early, ``last.metrics.stop`` says
        "cancelled"."""
        running = self._running
        if running is not None:
            running.cancel()

    def run(self, samples: np.ndarray, sample_rate_hz: int, task: str = "chat", **kwargs: Any) -> TurnResult:
        """The whole turn at once: text and the concatenated speech."""
        audio = [e.samples for e in self.turn(samples, sample_rate_hz, task, **kwargs) if isinstance(e, AudioEvent)]
        assert self.last is not None
        self.last.wav = np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32)
        return self.last

    def reset(self) -> None:
        """Forgets the history."""
        self.history, self.last, self._alignment = [], None, None
