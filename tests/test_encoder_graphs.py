"""The tokenizer side as ONNX: Whisper encoder, VQ encoder (argmin in the runtime, fp32) and adaptor graphs, and
the torch-free OnnxAudioTokenizer, which must give the official token ids exactly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from kimia_edge.export.graphs import graph_spec
from kimia_edge.export.graphs.base import export_graph
from kimia_edge.export.reference.pipeline import GoldenPipeline
from kimia_edge.export.snapshot.make import GLM_TOKENIZER_SUBDIR, make_snapshot
from kimia_edge.runtime.audio_tokenizer import OnnxAudioTokenizer, nearest_codebook_rows
from kimia_edge.runtime.frontend import load_audio, to_16k_mono
from kimia_edge.runtime.sessions import open_file_session

FEATURE_TOL = 1e-4  # fp32 graph vs eager torch, Whisper last hidden state (MANIFEST threshold for features)


def _tokenizer(snapshot: Path, out: Path) -> OnnxAudioTokenizer:
    torch.set_num_threads(1)
    paths, cfgs, codebook = {}, {}, None
    for name in ("whisper_encoder", "vq_encoder"):
        spec = graph_spec(name)
        module = spec.build(snapshot)
        export_graph(spec, module, out / f"{name}.onnx")
        paths[name] = out / f"{name}.onnx"
        cfgs[name] = module.cfg
        codebook = spec.sidecar_arrays(module).get("vq_codebook", codebook)
    import dataclasses
    return OnnxAudioTokenizer(open_file_session(paths["vq_encoder"], 1), open_file_session(paths["whisper_encoder"], 1),
                              codebook, dataclasses.asdict(cfgs["vq_encoder"]), dataclasses.asdict(cfgs["whisper_encoder"]))


@pytest.fixture(scope="module")
def fixture_tokenizer(official_fixtures: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxAudioTokenizer:
    root = tmp_path_factory.mktemp("fixture_snap")
    (root / "whisper-large-v3").symlink_to(official_fixtures / "kimia_snapshot" / "whisper-large-v3")
    (root / GLM_TOKENIZER_SUBDIR).symlink_to(official_fixtures / "glm-4-voice-tokenizer")
    return _tokenizer(root, tmp_path_factory.mktemp("fixture_graphs"))


@pytest.mark.parametrize("wave", ["A", "B", "C"])  # C is 31 s: two 30 s segments
def test_ids_equal_the_official_fixture(fixture_tokenizer: OnnxAudioTokenizer, official_fixtures: Path, wave: str) -> None:
    audio = load_file(str(official_fixtures / "audio/waves_16k.safetensors"))[wave]
    expected = load_file(str(official_fixtures / "glm_vq/io.safetensors"))[f"single.{wave}.token_ids"].reshape(-1)
    np.testing.assert_array_equal(fixture_tokenizer.semantic_ids(audio), expected)


def test_whisper_features_match_the_official_segments(fixture_tokenizer: OnnxAudioTokenizer, official_fixtures: Path) -> None:
    io = load_file(str(official_fixtures / "whisper_lv3/io.safetensors"))
    (hidden,) = fixture_tokenizer.whisper.run({"mel": io["fp32.C.seg1.mel"][None]})
    np.testing.assert_allclose(hidden, io["fp32.C.seg1.last_hidden_state"], atol=FEATURE_TOL, rtol=0)


def test_runtime_tokenizer_equals_the_golden_pipeline_on_speech(shared_audio: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    snap = make_snapshot(tmp_path_factory.mktemp("enc") / "tiny", "tiny", seed=41)
    tok = _tokenizer(snap, tmp_path_factory.mktemp("enc_graphs"))
    clip = to_16k_mono(*load_audio(shared_audio / "asr_example_zh.wav"))
    ref = GoldenPipeline(snap).encode_audio(clip)
    got = tok.encode(clip)
    np.testing.assert_array_equal(got.semantic_ids, ref.semantic_ids)
    np.testing.assert_allclose(got.features, ref.features, atol=FEATURE_TOL, rtol=0)
    with pytest.raises(ValueError, match="mono 16 kHz"):
        tok.encode(np.zeros(0, np.float32))


def test_argmin_picks_the_nearest_row() -> None:
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((300, 16)).astype(np.float32)
    picks = rng.integers(0, 300, 50)
    hidden = codebook[picks] + 0.01 * rng.standard_normal((50, 16)).astype(np.float32)
    ids = nearest_codebook_rows(hidden, codebook, np.sum(codebook ** 2, axis=1))
    np.testing.assert_array_equal(ids, picks)


def test_adaptor_graph_parity(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path / "tiny", "tiny", seed=42, components=["llm"])
    spec = graph_spec("adaptor")
    result = export_graph(spec, spec.build(snap), tmp_path / "adaptor.onnx")
    assert result.fp32_error.max_abs < 1e-4
