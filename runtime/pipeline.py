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
from kimia_edge.runtime.dit_config import DitConfig, StreamingConfig
from kimia_edge.runtime.frontend import check_audible, to_16k_mono
from kimia_edge.runtime.generation import GenerationConfig
from kimia_edge.runtime.llm_backend import LLMBackend
from kimia_edge.runtime.manifest import Artifact, BundleError, Manifest, load_bundle
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


VQ_PRECISIONS = ("fp32", "fp16")  # a flipped semantic id changes the LLM's input
DEFAULT_LLM_PREFERENCE = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16", "F32")  # smallest listed first


def _pick(manifest: Manifest, name: str, precision: str) -> Artifact:
    try:
        return manifest.artifact(name, precision)
    except BundleError:
        log.warning("%s: no %s variant in the bundle, using fp32", name, precision)
        return manifest.artifact(name, "fp32")


ONNX_GRAPHS = ("whisper_encoder", "vq_encoder", "dit_step", "vocoder")
ONNX_PRECISIONS = ("fp32", "fp16", "int8_dynamic", "int8_qdq")


def parse_precisions(spec: str) -> Dict[str, str]:
    """``"int8_dynamic"`` (every graph) or ``"fp32,dit_step=int8_dynamic"`` (a default, then per-graph choices)
    -> {graph: precision} for every ONNX graph."""
    chosen: Dict[str, str] = {}
    default = "fp32"
    for item in filter(None, (part.strip() for part in spec.split(","))):
        graph, _, precision = item.rpartition("=")
        if precision not in ONNX_PRECISIONS:
            raise ValueError(f"precision {precision!r}: expected one of {ONNX_PRECISIONS}")
        if graph and graph not in ONNX_GRAPHS:
            raise ValueError(f"precision for {graph!r}: no such graph; graphs are {ONNX_GRAPHS}")
        if graph:
            chosen[graph] = precision
        else:
            default = precision
    return {graph: chosen.get(graph, default) for graph in ONNX_GRAPHS}


def components_from_bundle(bundle: Path, *, precision: str = "fp32", llm_precision: Optional[str] = None,
                           device: str = "auto", threads: Optional[int] = None, n_gpu_layers: int = 0,
                           streaming: Optional[StreamingConfig] = None, cache_dir: Optional[Path] = None,
                           text_only: bool = False) -> Components:
    """Opens the artifacts of a verified bundle.

    ``precision``: ONNX variant (fp32 | fp16 | int8_dynamic | int8_qdq) for every graph, or per graph as
    :func:`parse_precisions` reads it (on CPU: ``"fp32,dit_step=int8_dynamic"``); a graph without the variant falls
    back to fp32, logged. ``llm_precision``: GGUF variant (default: the smallest one the bundle has).
    ``text_only``: for the text tasks (asr, qa) — the LLM's audio branch, the DiT and the vocoder are not opened
    (at full size ~7 GB of fp32 graphs and a fifth of the LLM not in memory)."""
    from kimia_edge.runtime.audio_tokenizer import OnnxAudioTokenizer
    from kimia_edge.runtime.dit_onnx import OnnxDitStep, OnnxVocoder
    from kimia_edge.runtime.llm_llamacpp import LlamaCppBackend
    from kimia_edge.runtime.sessions import open_session

    bundle = Path(bundle)
    manifest = load_bundle(bundle)
    model = manifest.model
    # int8 flipped 2-62 of 177 ids on real speech (tests/test_encoder_graphs.py): the VQ encoder stays at fp32/fp16
    chosen = parse_precisions(precision)
    if chosen["vq_encoder"] not in VQ_PRECISIONS:
        log.info("vq_encoder: %s is not used (it flips semantic ids), using fp32", chosen["vq_encoder"])
        chosen["vq_encoder"] = "fp32"
    if text_only:
        del chosen["dit_step"], chosen["vocoder"]
    sessions = {name: open_session(bundle, _pick(manifest, name, p), device=device, threads=threads, cache_dir=cache_dir)
                for name, p in chosen.items()}
    codebook = np.load(bundle / manifest.artifact("vq_codebook").path)
    tokenizer = OnnxAudioTokenizer(sessions["vq_encoder"], sessions["whisper_encoder"], codebook,
                                   model["vq_encoder"], model["whisper_encoder"])

    have = {a.precision for a in manifest.artifacts if a.name == "llm_trunk"}
    if llm_precision is None:
        llm_precision = next((p for p in DEFAULT_LLM_PREFERENCE if p in have), None)
    if llm_precision not in have:
        raise BundleError(f"bundle has no LLM at {llm_precision!r}; it has {sorted(have)}")
    adaptor = [a for a in manifest.artifacts if a.name == "llm_adaptor"]
    backend = LlamaCppBackend(bundle / manifest.artifact("llm_trunk", llm_precision).path,
                              None if text_only else bundle / manifest.artifact("llm_audio", llm_precision).path,
                              bundle / adaptor[0].path if adaptor else None,
                              n_threads=threads, n_gpu_layers=n_gpu_layers, text_only=text_only)

    dit = DitConfig(**model["dit"])
    dit.validate()
    streaming = streaming or StreamingConfig.from_dict(model["streaming"])
    make_detokenizer = _no_speech_output
    if not text_only:
        dit_step = OnnxDitStep(sessions["dit_step"], dit.depth, dit.num_heads, dit.head_dim)
        vocoder = OnnxVocoder(sessions["vocoder"])
        make_detokenizer = lambda noise: StreamingDetokenizer(dit_step, vocoder, streaming, dit, noise=noise)
    text_dir = bundle / manifest.artifact("text_tokenizer").path.split("/")[0]
    providers = {name: f"{s.provider} ({_pick(manifest, name, chosen[name]).precision})" for name, s in sessions.items()}
    providers["llm"] = f"llama.cpp {llm_precision}" + (f", {n_gpu_layers} layers on GPU" if n_gpu_layers else " (CPU)")
    return Components(
        encode_audio=tokenizer.encode, backend=backend,
        make_detokenizer=make_detokenizer,
        tokens=SpecialTokens.from_snapshot(text_dir), text_tokenizer=TextTokenizer.from_snapshot(text_dir),
        token_offset=int(model["llm"]["kimia_token_offset"]),
        output_sample_rate_hz=int(model["vocoder"]["sampling_rate"]), providers=providers,
    )


def _no_speech_output(noise: NoiseSource) -> StreamingDetokenizer:
    raise ValueError("this pipeline was opened text_only (no DiT, vocoder or audio branch): it runs the text tasks "
                     f"{tuple(t for t, v in TASK_TABLE.items() if v.output_type == 'text')}, not speech output")


class Pipeline:
    @classmethod
    def from_bundle(cls, bundle: Path, **options: Any) -> "Pipeline":
        """A pipeline over a bundle's artifacts; ``options`` as :func:`components_from_bundle`."""
        return cls(components_from_bundle(bundle, **options))

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
        check_audible(samples)
        clip = to_16k_mono(np.asarray(samples, dtype=np.float32), sample_rate_hz)
        config = config or generation_config(task, seed)
        noise = np.random.default_rng(None if seed is None else seed + 1)
        detokenizer = self.c.make_detokenizer(noise) if config.output_type == "both" else None  # before any work
        encoded: Dict[int, AudioEncoding] = {}

        def tokenize_audio(content: Any) -> AudioEncoding:
            if id(content) not in encoded:
                encoded[id(content)] = self.c.encode_audio(np.asarray(content, dtype=np.float32))
            return encoded[id(content)]

        prompt = build_prompt(task_messages(task, clip, self.history), config.output_type, self.c.tokens,
                              self.c.token_offset, self.c.text_tokenizer.encode, tokenize_audio)
        encode_s = time.perf_counter() - start
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
