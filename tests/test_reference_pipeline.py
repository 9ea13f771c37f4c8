"""The golden pipeline end to end on a generated tiny snapshot and a real speech clip: speech in, text and
24 kHz speech out, with the rates the model defines."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kimia_edge.cli import main
from kimia_edge.export.reference.pipeline import GoldenPipeline
from kimia_edge.export.snapshot.audio_encoders import find_glm_tokenizer
from kimia_edge.export.snapshot.make import make_snapshot
from kimia_edge.runtime.frontend import load_audio, to_16k_mono, tokens_for_samples
from kimia_edge.runtime.tasks import generation_config

SAMPLES_PER_TOKEN_24K = 480 * 4  # 4 mel frames per 12.5 Hz token, 480 samples per frame


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_snapshot(tmp_path_factory.mktemp("ref") / "tiny", "tiny", seed=5)


@pytest.fixture(scope="module")
def pipe(snapshot: Path) -> GoldenPipeline:
    return GoldenPipeline(snapshot)


@pytest.fixture(scope="module")
def clip(shared_audio: Path) -> np.ndarray:
    samples, sr = load_audio(shared_audio / "qa_example.wav")
    return to_16k_mono(samples, sr)


def test_audio_encoding_rates(pipe: GoldenPipeline, clip: np.ndarray) -> None:
    enc = pipe.encode_audio(clip)
    n = tokens_for_samples(len(clip))
    assert enc.semantic_ids.shape == (n,)
    assert enc.features.shape == (n, 4 * pipe.whisper.cfg.d_model)
    assert enc.semantic_ids.min() >= 0 and enc.semantic_ids.max() < pipe.llm.config.vocab_size - pipe.token_offset


def test_chat_gives_text_and_speech_at_the_model_rates(pipe: GoldenPipeline, clip: np.ndarray) -> None:
    cfg = generation_config("chat", seed=1, step_limit=50)
    result = pipe.run("chat", clip, seed=1, config=cfg)
    assert result.steps == 50 and result.stop == "max_tokens"
    assert len(result.audio_tokens) > 30  # the audio stream starts after the 6-step delay
    assert result.wav.shape == (len(result.audio_tokens) * SAMPLES_PER_TOKEN_24K,)
    assert result.sample_rate_hz == 24_000 and np.isfinite(result.wav).all() and np.abs(result.wav).max() > 1e-3
    assert result.text  # the text head answered with BPE words
    again = pipe.run("chat", clip, seed=1, config=cfg)
    assert again.text == result.text and np.array_equal(again.wav, result.wav)  # seeded: reproducible


def test_asr_and_qa_answer_in_text_only(pipe: GoldenPipeline, clip: np.ndarray) -> None:
    for task in ("asr", "qa"):
        result = pipe.run(task, clip, config=generation_config(task, step_limit=12))
        assert result.wav.size == 0 and len(result.audio_tokens) == 0
        assert result.steps <= 12


def test_multi_turn_history_lengthens_the_prompt(pipe: GoldenPipeline, clip: np.ndarray) -> None:
    seen = []
    history = [{"role": "user", "message_type": "audio", "content": clip[:16000]},
               {"role": "assistant", "message_type": "text", "content": "The weather is sunny."}]
    pipe.run("qa", clip, history=history, config=generation_config("qa", step_limit=2), on_step=seen.append)
    assert pipe.backend.position > len(pipe.text_tokenizer.encode("The weather is sunny.")) + 2 * 12
    assert len(seen) == 2


def test_missing_glm_tokenizer_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="GLM-4-Voice tokenizer not found"):
        find_glm_tokenizer(tmp_path, None)


def test_cli_reference_run_writes_24k_wav(snapshot: Path, shared_audio: Path, tmp_path: Path) -> None:
    out = tmp_path / "answer.wav"
    code = main(["reference", "run", "--snapshot", str(snapshot), "--input", str(shared_audio / "qa_example.wav"),
                 "--task", "chat", "--output", str(out), "--max-steps", "40", "--seed", "3"])
    assert code == 0
    info = sf.info(out)
    assert info.samplerate == 24_000 and info.frames % SAMPLES_PER_TOKEN_24K == 0 and info.frames > 0
