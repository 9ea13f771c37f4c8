"""The golden pipeline: the whole Kimi-Audio chain on the PyTorch reference modules, loaded from a snapshot.

Speech in (16 kHz) → GLM-4-Voice VQ ids + Whisper features (runtime/audio_tokenizer.py on the torch encoders) →
prompt (runtime/prompt.py) → generation loop (runtime/generation.py) on the torch LLM → text, and in "chat" the
audio tokens → streaming detokenizer (runtime/detokenizer.py) on the torch DiT and BigVGAN → 24 kHz speech. The
host logic and state machines are the runtime's own; only the networks are torch here. Every exported artifact is
measured against this.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from kimia_edge.export.reference.dit import TorchDitStep
from kimia_edge.export.reference.glm_vq import vq_ids_fn
from kimia_edge.export.reference.llm_backend import TorchLLMBackend
from kimia_edge.export.reference.loaders import load_dit, load_llm, load_vocoder, load_vq_encoder, load_whisper_encoder
from kimia_edge.export.reference.whisper_encoder import whisper_fn
from kimia_edge.export.snapshot.audio_encoders import find_glm_tokenizer
from kimia_edge.runtime.audio_tokenizer import AudioTokenizer
from kimia_edge.runtime.detokenizer import NoiseSource, StreamingDetokenizer
from kimia_edge.runtime.spec.streaming import StreamingConfig
from kimia_edge.runtime.generation import GenerationConfig, GenerationStep, generate
from kimia_edge.runtime.pipeline import Components, build_turn_prompt, turn_noise
from kimia_edge.runtime.prompt import AudioEncoding
from kimia_edge.runtime.special_tokens import SpecialTokens
from kimia_edge.runtime.tasks import TASK_TABLE, generation_config
from kimia_edge.runtime.text_tokenizer import TextTokenizer

log = logging.getLogger(__name__)


@dataclass
class ReferenceResult:
    """text: decoded answer / transcript; text_ids: its ids; audio_tokens: [M] semantic ids (chat);
    wav: [S] float32 at ``sample_rate_hz`` (chat; empty otherwise); steps / stop: the loop's count and reason."""

    text: str
    text_ids: List[int]
    audio_tokens: np.ndarray
    wav: np.ndarray
    sample_rate_hz: int
    steps: int
    stop: str


class GoldenPipeline:
    """The reference chain in fp32 (default) or the snapshot's own dtype for the LLM (``llm_dtype``)."""

    def __init__(self, snapshot: Path, glm_tokenizer: Optional[Path] = None,
                 llm_dtype: torch.dtype = torch.float32, streaming: Optional[StreamingConfig] = None) -> None:
        snapshot = Path(snapshot)
        self.snapshot = snapshot
        self.vq = load_vq_encoder(find_glm_tokenizer(snapshot, glm_tokenizer))
        self.whisper = load_whisper_encoder(snapshot)
        # the runtime's tokenizer host logic with the torch encoders plugged in
        self.audio_tokenizer = AudioTokenizer(vq_ids_fn(self.vq), whisper_fn(self.whisper), self.vq.cfg,
                                              self.whisper.cfg)
        self.llm = load_llm(snapshot, dtype=llm_dtype)
        self.backend = TorchLLMBackend(self.llm)
        self.tokens = SpecialTokens.from_snapshot(snapshot)
        self.text_tokenizer = TextTokenizer.from_snapshot(snapshot)
        self.token_offset = self.llm.config.kimia_token_offset
        dit = load_dit(snapshot)
        self.dit_config = dit.cfg
        self.dit_step = TorchDitStep(dit)
        self.vocoder_module = load_vocoder(snapshot).folded_copy().eval()
        self.sample_rate_hz = self.vocoder_module.cfg.sampling_rate
        self.streaming = streaming or StreamingConfig()

    # ---- the networks, as the runtime's state machines want them ------------------------------------------------
    @torch.inference_mode()
    def encode_audio(self, samples_16k: np.ndarray) -> AudioEncoding:
        """[S] 16 kHz mono -> semantic ids [N] (12.5 Hz) and Whisper features [N, 4*d_model] float32."""
        return self.audio_tokenizer.encode(samples_16k)

    @torch.inference_mode()
    def vocode(self, mel: np.ndarray) -> np.ndarray:
        """[T, 80] de-normalised mel -> [T * hop] float32 samples."""
        x = torch.from_numpy(np.ascontiguousarray(mel.T, dtype=np.float32))[None]
        return self.vocoder_module(x)[0, 0].numpy()

    def detokenizer(self, noise: NoiseSource = None) -> StreamingDetokenizer:
        return StreamingDetokenizer(self.dit_step, self.vocode, self.streaming, self.dit_config, noise=noise)

    # ---- tasks ------------------------------------------------------------------------------------------------
    def synthesize(self, audio_tokens: np.ndarray, noise: NoiseSource = None) -> np.ndarray:
        """Semantic ids [M] -> [480*4*M] samples, through the streaming detokenizer (official chunking)."""
        det = self.detokenizer(noise)
        pieces = [c.wav for c in det.push(np.asarray(audio_tokens, dtype=np.int64))]
        pieces += [c.wav for c in det.finish()]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    def components(self) -> Components:
        """The reference networks as the runtime Pipeline takes them (the golden pipeline is this factory plus a
        sequential driver of the same prompt, loop and detokenizer)."""
        return Components(self.encode_audio, self.backend, self.detokenizer, self.tokens, self.text_tokenizer,
                          self.token_offset, self.sample_rate_hz, providers={"llm": "torch reference"})

    def run(self, task: str, samples_16k: np.ndarray, *, seed: Optional[int] = None,
            config: Optional[GenerationConfig] = None, history: Sequence[Dict[str, Any]] = (),
            on_step: Optional[Callable[[GenerationStep], None]] = None) -> ReferenceResult:
        """One turn of ``task`` ("asr", "qa", "chat") on the user clip ``samples_16k`` after ``history``, run
        sequentially: the whole generation loop, then the whole synthesis (the runtime overlaps them on threads)."""
        config = config or generation_config(task, seed)
        prompt = build_turn_prompt(self.components(), task, samples_16k, list(history), TASK_TABLE[task].output_type)
        with torch.inference_mode():
            result = generate(self.backend, prompt, self.tokens, self.token_offset, config,
                              decode_text=lambda ids: self.text_tokenizer.decode(ids, skip_unknown=True), on_step=on_step)
        wav = np.zeros(0, dtype=np.float32)
        if TASK_TABLE[task].output_type == "both" and len(result.audio_tokens):
            wav = self.synthesize(result.audio_tokens, turn_noise(seed))
        log.info("%s: %d steps (%s), %d text ids, %d audio tokens", task, result.steps, result.stop,
                 len(result.text_ids), len(result.audio_tokens))
        return ReferenceResult(result.text or "", result.text_ids, result.audio_tokens, wav, self.sample_rate_hz,
                               result.steps, result.stop)
