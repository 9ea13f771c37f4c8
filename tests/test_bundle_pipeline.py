"""The runtime as users run it: a bundle exported from a tiny snapshot, opened by Pipeline.from_bundle (ONNX
encoders, llama.cpp LLM, ONNX DiT step + vocoder, rings) — speech in, text and 24 kHz speech out; the waveform
for the same audio tokens and noise equals the golden pipeline's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kimia_edge.export.reference.pipeline import GoldenPipeline
from kimia_edge.runtime.frontend import load_audio
from kimia_edge.runtime.spec.manifest import BundleError
from kimia_edge.runtime.pipeline import Pipeline, PipelineOptions
from kimia_edge.runtime.streaming import AudioEvent, TextEvent
from kimia_edge.runtime.tasks import generation_config

WAV_TOL = 5e-4  # fp32 ONNX DiT (30 Euler evaluations) + vocoder vs eager torch, per sample


@pytest.fixture(scope="module")
def exported(tiny_snapshot: Path, tiny_bundle: Path):
    return tiny_snapshot, tiny_bundle


@pytest.fixture(scope="module")
def pipeline(exported) -> Pipeline:
    return Pipeline.from_bundle(exported[1], PipelineOptions(threads=2))


def test_chat_streams_text_then_speech(pipeline: Pipeline, shared_audio: Path) -> None:
    samples, sr = load_audio(shared_audio / "qa_example.wav")
    chat = pipeline.conversation()
    events = list(chat.turn(samples, sr, "chat", config=generation_config("chat", 3, step_limit=70), seed=3))
    assert any(isinstance(e, TextEvent) for e in events)
    audio = np.concatenate([e.samples for e in events if isinstance(e, AudioEvent)])
    m = chat.last.metrics
    assert audio.size == m.output_audio_s * 24_000 and audio.size % 1920 == 0 and audio.size > 0
    assert m.first_audio_s < m.prefill_s + m.encode_s + 70 / max(m.llm_steps_per_s, 1e-9) + 60
    assert m.providers["dit_step"].startswith("CPUExecutionProvider") and "llama.cpp Q8_0" == m.providers["llm"][:14]
    assert m.rings["audio"]["dropped"] == 0 and m.rings["tokens"]["total_read"] == 70 - 6


def test_same_tokens_and_noise_give_the_golden_waveform(exported, pipeline: Pipeline) -> None:
    snap, _ = exported
    golden = GoldenPipeline(snap)
    tokens = np.random.default_rng(9).integers(0, 512, 80)  # 3 chunks + final
    ref = golden.synthesize(tokens, np.random.default_rng(4))
    det = pipeline.c.make_detokenizer(np.random.default_rng(4))
    got = np.concatenate([c.wav for c in [*det.push(tokens), *det.finish()]])
    assert got.shape == ref.shape == (80 * 1920,)
    np.testing.assert_allclose(got, ref, atol=WAV_TOL, rtol=0)


def test_missing_llm_precision_is_named(exported) -> None:
    with pytest.raises(BundleError, match="no LLM at 'Q4_K_M'"):
        Pipeline.from_bundle(exported[1], PipelineOptions(llm_precision="Q4_K_M"))


def test_text_only_pipeline_transcribes_like_the_full_one_and_refuses_speech(exported, pipeline: Pipeline,
                                                                            shared_audio: Path) -> None:
    samples, sr = load_audio(shared_audio / "qa_example.wav")
    config = generation_config("asr", 0, step_limit=24)
    text_only = Pipeline.from_bundle(exported[1], PipelineOptions(threads=2, text_only=True))
    assert set(text_only.c.providers) == {"whisper_encoder", "vq_encoder", "llm"}
    assert text_only.run(samples, sr, "asr", config=config).text == pipeline.run(samples, sr, "asr", config=config).text
    with pytest.raises(ValueError, match="opened text_only"):
        next(text_only.conversation().turn(samples, sr, "chat"))
