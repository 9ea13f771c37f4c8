"""The DiT-step ONNX graph driven by the host Euler loop (runtime/detokenizer.py) reproduces the golden streaming
detokenizer: same tokens and noise -> same mel and waveform, over many chunks with look-ahead, a KV window that
overflows its 900 frames, and a smaller first chunk. Uses the official-fixture DiT and vocoder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kimia_edge.export.graphs.base import export_graph
from kimia_edge.export.graphs.dit_step import DitStepGraph
from kimia_edge.export.graphs.vocoder import VocoderGraph
from kimia_edge.export.reference.dit import TorchDitStep
from kimia_edge.runtime.detokenizer import StreamingDetokenizer
from kimia_edge.runtime.dit_config import StreamingConfig
from kimia_edge.runtime.dit_onnx import OnnxDitStep, OnnxVocoder
from kimia_edge.runtime.sessions import open_file_session

MEL_TOL = 2e-4  # de-normalised mel (std 3.46): fp32 graph vs eager torch, accumulated over the Euler steps
WAV_TOL = 5e-5  # the MANIFEST's threshold for waves


@pytest.fixture(scope="module")
def graphs(official_fixtures: Path, tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dit_onnx")
    snap = official_fixtures / "kimia_snapshot"
    dit_spec, voc_spec = DitStepGraph(), VocoderGraph()
    dit, voc = dit_spec.build(snap), voc_spec.build(snap)
    export_graph(dit_spec, dit, out / "dit_step.onnx")
    export_graph(voc_spec, voc, out / "vocoder.onnx")
    cfg = dit.cfg
    onnx_step = OnnxDitStep(open_file_session(out / "dit_step.onnx", threads=1), cfg.depth, cfg.num_heads, cfg.head_dim)
    return cfg, TorchDitStep(dit.dit), onnx_step, voc, OnnxVocoder(open_file_session(out / "vocoder.onnx", threads=1))


def _run(step, vocoder, cfg, streaming: StreamingConfig, tokens: np.ndarray, seed: int):
    det = StreamingDetokenizer(step, vocoder, streaming, cfg, noise=np.random.default_rng(seed))
    return [*det.push(tokens), *det.finish()]


def _torch_vocoder(module):
    def vocode(mel: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(mel.T[None], np.float32)))[0, 0].numpy()
    return vocode


def test_many_chunks_with_kv_window_overflow(graphs) -> None:
    cfg, torch_step, onnx_step, voc, _ = graphs
    tokens = np.random.default_rng(0).integers(0, cfg.semantic_vocab_size, 330)  # 11 chunks; 900-frame window fills at chunk 8
    streaming = StreamingConfig(ode_time_points=3)  # 2 Euler steps + priming per chunk keeps this fast; same state machine
    ref = _run(torch_step, _torch_vocoder(voc), cfg, streaming, tokens, seed=7)
    got = _run(onnx_step, _torch_vocoder(voc), cfg, streaming, tokens, seed=7)
    assert len(got) == len(ref) == 11
    assert max(c.prefix_frames for c in ref) == streaming.max_kv_cache_frames  # the window really overflowed
    for g, r in zip(got, ref):
        assert g.start_position == r.start_position
        np.testing.assert_allclose(g.mel, r.mel, atol=MEL_TOL, rtol=0)
        np.testing.assert_allclose(g.wav, r.wav, atol=WAV_TOL * 10, rtol=0)


def test_official_schedule_and_onnx_vocoder_end_to_end(graphs) -> None:
    cfg, torch_step, onnx_step, voc, onnx_voc = graphs
    tokens = np.random.default_rng(1).integers(0, cfg.semantic_vocab_size, 75)  # 3 chunks: 30, 30, 15
    ref = np.concatenate([c.wav for c in _run(torch_step, _torch_vocoder(voc), cfg, StreamingConfig(), tokens, 3)])
    got = np.concatenate([c.wav for c in _run(onnx_step, onnx_voc, cfg, StreamingConfig(), tokens, 3)])
    assert got.shape == ref.shape == (75 * 4 * 480,)
    np.testing.assert_allclose(got, ref, atol=WAV_TOL * 10, rtol=0)


def test_smaller_first_chunk(graphs) -> None:
    cfg, torch_step, onnx_step, voc, onnx_voc = graphs
    tokens = np.random.default_rng(2).integers(0, cfg.semantic_vocab_size, 50)
    streaming = StreamingConfig(first_chunk_tokens=10, ode_time_points=4)
    ref = _run(torch_step, _torch_vocoder(voc), cfg, streaming, tokens, 4)
    got = _run(onnx_step, onnx_voc, cfg, streaming, tokens, 4)
    assert [len(c.wav) for c in got] == [len(c.wav) for c in ref] and len(ref[0].wav) < 30 * 4 * 480 // 2
    np.testing.assert_allclose(np.concatenate([c.wav for c in got]), np.concatenate([c.wav for c in ref]),
                               atol=WAV_TOL * 10, rtol=0)
