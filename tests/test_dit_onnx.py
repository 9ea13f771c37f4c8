"""The DiT-step ONNX graph driven by the host Euler loop (runtime/detokenizer.py) reproduces the golden streaming
detokenizer: same tokens and noise -> same mel and waveform, over many chunks with look-ahead, a KV window that
overflows its 900 frames, and a smaller first chunk; and, with the ONNX vocoder, the official code's recorded
waveform. Uses the official-fixture DiT (hidden 96, depth 2, 3 heads, vocabulary 100) and vocoder; each graph is
exported once per test session."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kimia_edge.export.graphs.base import export_graph
from kimia_edge.export.graphs.dit_step import GRAPH_TOKEN_FRAMES, MIN_PREFIX, DitStepGraph, FusableTanhGelu, grouped_ids
from kimia_edge.export.graphs.vocoder import VocoderGraph
from kimia_edge.export.reference.dit import TorchDitStep
from kimia_edge.runtime.detokenizer import StreamingDetokenizer
from kimia_edge.runtime.spec.streaming import StreamingConfig
from kimia_edge.runtime.dit_onnx import OnnxDitStep, OnnxVocoder
from kimia_edge.runtime.sessions import open_file_session

# ONNX fp32 vs eager torch fp32, measured here (1 thread): one step <= 3.6e-6 on velocity and K/V (export parity
# 7.7e-6); streamed de-normalised mel (std 3.46) <= 1.0e-5 after 11 chunks, waves <= 1.3e-5; vs the official s75
# run: mel 6.2e-6, wave 1.0e-5. Limits: ~5x the measured error, and MANIFEST.md §10's thresholds for mels / waves.
STEP_TOL = 2e-5
MEL_TOL = 1e-4
WAV_TOL = 5e-5
N_OFFICIAL_CHUNKS = 3
# adaLN per token (torch DiT.step token_frames=4) vs per frame, same inputs: the same rows from a GEMM with 1/4 of the
# rows, so equal up to fp32 rounding; measured <= 1.2e-6 on outputs of magnitude ~5 (ulp 4.8e-7 at 4), i.e. a few
# ulps. Limit: 8 ulps of the output's largest magnitude.
PER_TOKEN_ULPS = 8


@pytest.fixture(scope="session")
def graphs(official_fixtures: Path, tmp_path_factory: pytest.TempPathFactory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dit_onnx")
    snap = official_fixtures / "kimia_snapshot"
    dit_spec, voc_spec = DitStepGraph(), VocoderGraph()
    dit, voc = dit_spec.build(snap), voc_spec.build(snap)
    dit_export = export_graph(dit_spec, dit, out / "dit_step.onnx")
    export_graph(voc_spec, voc, out / "vocoder.onnx")
    yield {
        "cfg": dit.cfg, "module": dit.reference, "export": dit_export, "torch_step": TorchDitStep(dit.reference),
        "dit_session": open_file_session(out / "dit_step.onnx", threads=1), "torch_vocoder": _torch_vocoder(voc),
        "onnx_vocoder": OnnxVocoder(open_file_session(out / "vocoder.onnx", threads=1)),
    }
    torch.set_num_threads(previous)


def _onnx_step(graphs) -> OnnxDitStep:
    cfg = graphs["cfg"]
    return OnnxDitStep(graphs["dit_session"], cfg.depth, cfg.num_heads, cfg.head_dim)


def _torch_vocoder(module):
    def vocode(mel: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(mel.T[None], np.float32)))[0, 0].numpy()
    return vocode


def _run(step, vocoder, cfg, streaming: StreamingConfig, tokens: np.ndarray, noise):
    det = StreamingDetokenizer(step, vocoder, streaming, cfg, noise=noise)
    return [*det.push(tokens), *det.finish()]


# ---- the graph alone ---------------------------------------------------------------------------------------------
def test_export_parity_within_tolerance(graphs) -> None:
    """export_graph measured the graph at T = 168 / 120 / 60 with 0 / 293 of 300 / 89 of 96 valid prefix slots."""
    spec, result = DitStepGraph(), graphs["export"]
    assert len(spec.parity_lengths) >= 2
    assert result.fp32_error.within(spec.fp32_tolerance), result.fp32_error


@pytest.mark.parametrize("frames, prefix", [(50, 0), (168, 0), (120, 300), (37, 895)])
def test_step_equals_reference_with_exact_prefix(graphs, frames: int, prefix: int) -> None:
    """Graph with a padded prefix (garbage in the masked slots) == the reference step on the exact, unpadded prefix
    (None when empty): the mask really hides the padding, and the empty-prefix stand-in changes nothing."""
    cfg, module = graphs["cfg"], graphs["module"]
    rng = np.random.default_rng(frames + prefix)
    slots = max(prefix + 5, MIN_PREFIX)  # <= the 900-slot profile maximum
    kv = lambda: rng.standard_normal((cfg.depth, 1, cfg.num_heads, slots, cfg.head_dim), dtype=np.float32)
    pk, pv = kv(), kv()
    x = rng.standard_normal((1, frames, cfg.input_size), dtype=np.float32)
    t_int = np.array([345], np.int64)
    tokens = grouped_ids(torch.from_numpy(rng.integers(0, cfg.semantic_vocab_size, (1, frames))), frames).numpy()
    positions = np.arange(prefix + 17, prefix + 17 + frames)[None]
    got = graphs["dit_session"].run({"x_t": x, "t_int": t_int, "tokens": tokens, "positions": positions,
                                     "prefix_k": pk, "prefix_v": pv, "prefix_len": np.array([prefix], np.int64)})
    exact = (lambda a: torch.from_numpy(np.ascontiguousarray(a[:, :, :, :prefix]))) if prefix else (lambda a: None)
    with torch.inference_mode():
        ref = module.step(torch.from_numpy(x), torch.from_numpy(t_int), torch.from_numpy(tokens),
                          torch.from_numpy(positions), exact(pk), exact(pv))
    for name, g, r in zip(("velocity", "k", "v"), got, ref):
        np.testing.assert_allclose(g, r.numpy(), atol=STEP_TOL, rtol=0, err_msg=name)


def test_per_token_adaln_equals_the_reference_at_every_euler_step(graphs) -> None:
    """The exported step computes the adaLN condition once per 12.5 Hz token (4 frames). At every evaluation of the
    official schedule (29 Euler steps + priming, 3 chunks: first, window filling, final with a partial prefix), on
    the inputs the state machine really makes, the graph and the torch per-token step equal the per-frame reference:
    torch per-token within PER_TOKEN_ULPS ulps (fp32 rounding), the graph within STEP_TOL (ONNX vs torch)."""
    cfg, module = graphs["cfg"], graphs["module"]
    onnx_step, reference = _onnx_step(graphs), graphs["torch_step"]
    calls = []

    def checking_step(x_t, t_int, tokens, positions, prefix_k, prefix_v):
        ref = reference(x_t, t_int, tokens, positions, prefix_k, prefix_v)
        got = onnx_step(x_t, t_int, tokens, positions, prefix_k, prefix_v)
        n = prefix_k.shape[3]
        prefix = (lambda a: torch.from_numpy(np.ascontiguousarray(a))) if n else (lambda a: None)
        with torch.inference_mode():
            per_token = module.step(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (x_t, t_int, tokens, positions)),
                                    prefix(prefix_k), prefix(prefix_v), token_frames=GRAPH_TOKEN_FRAMES)
        for name, g, t, r in zip(("velocity", "k", "v"), got, per_token, ref):
            ulp = np.spacing(np.float32(np.abs(r).max()))
            np.testing.assert_allclose(t.numpy(), r, atol=PER_TOKEN_ULPS * ulp, rtol=0, err_msg=f"torch {name}")
            np.testing.assert_allclose(g, r, atol=STEP_TOL, rtol=0, err_msg=f"graph {name}")
        calls.append((int(t_int[0]), tokens.shape[1], n))
        return ref

    tokens = np.random.default_rng(5).integers(0, cfg.semantic_vocab_size, 75)  # chunks of 30, 30, 15 tokens
    chunks = _run(checking_step, graphs["torch_vocoder"], cfg, StreamingConfig(), tokens, np.random.default_rng(6))
    assert len(chunks) == 3
    assert len(calls) == 3 * 29 + 2  # every Euler evaluation of every chunk, and the two priming passes
    assert {c[0] for c in calls} >= {0, 999}
    # (frames, prefix frames): chunk 0 and its priming, chunk 1 (48 look-ahead + 120) and its priming, final 48 + 60
    assert sorted({(frames, prefix) for _, frames, prefix in calls}) == [(72, 0), (108, 192), (120, 0), (120, 72),
                                                                         (168, 72)]


def test_fusable_gelu_is_the_tanh_gelu() -> None:
    x = torch.linspace(-8, 8, 10001)
    ref = torch.nn.functional.gelu(x, approximate="tanh")
    assert (FusableTanhGelu()(x) - ref).abs().max().item() <= 4 * np.spacing(np.float32(8))


def test_ort_fuses_the_gelus(graphs, tmp_path: Path) -> None:
    """ONNX Runtime's CPU optimisation turns every block's MLP activation (and fc1's bias) into one FastGelu; the
    LayerNorms are exported as LayerNormalization (docs/benchmarks.md lists what fires and what does not)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(graphs["export"].path), sess_options=so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    depth = graphs["cfg"].depth
    assert ops.count("FastGelu") == depth and "Tanh" not in ops
    assert ops.count("LayerNormalization") + ops.count("SkipLayerNormalization") == 2 * depth + 1


def test_graph_refuses_tokens_not_grouped_by_token(graphs) -> None:
    """The graph reads one id per 4 frames; ids that change inside a group would be silently wrong, so the runtime
    step refuses them."""
    cfg = graphs["cfg"]
    empty = np.zeros((cfg.depth, 1, cfg.num_heads, 0, cfg.head_dim), np.float32)
    x = np.zeros((1, 8, cfg.input_size), np.float32)
    tokens = np.array([[3, 3, 3, 3, 5, 5, 5, 6]])
    with pytest.raises(ValueError, match="changes at frame 7"):
        _onnx_step(graphs)(x, np.array([0]), tokens, np.arange(8)[None], empty, empty)
    tokens[0, 7] = 5  # grouped (and a partial last group is fine)
    _onnx_step(graphs)(x[:, :6], np.array([0]), tokens[:, :6], np.arange(6)[None], empty, empty)


# ---- streaming: the host Euler loop over the graph vs the same loop over the torch reference -------------------
def test_many_chunks_with_kv_window_overflow(graphs) -> None:
    cfg = graphs["cfg"]
    tokens = np.random.default_rng(0).integers(0, cfg.semantic_vocab_size, 330)  # 11 chunks; 900-frame window fills at chunk 8
    streaming = StreamingConfig(ode_time_points=3)  # 2 Euler steps + priming per chunk keeps this fast; same state machine
    onnx_step = _onnx_step(graphs)
    ref = _run(graphs["torch_step"], graphs["torch_vocoder"], cfg, streaming, tokens, np.random.default_rng(7))
    got = _run(onnx_step, graphs["torch_vocoder"], cfg, streaming, tokens, np.random.default_rng(7))
    assert len(got) == len(ref) == 11
    assert max(c.prefix_frames for c in ref) == streaming.max_kv_cache_frames  # the window really overflowed
    assert any(c.prefix_frames == streaming.max_kv_cache_frames for c in ref[:-1])  # ... before look-ahead chunks
    for g, r in zip(got, ref):
        assert (g.start_position, g.prefix_frames) == (r.start_position, r.prefix_frames)
        np.testing.assert_allclose(g.mel, r.mel, atol=MEL_TOL, rtol=0)
        np.testing.assert_allclose(g.wav, r.wav, atol=WAV_TOL, rtol=0)
    # the hot path made each chunk's prefix graph-ready once, not once per evaluation
    assert onnx_step.prefix_copies <= len(got)


def test_official_schedule_and_onnx_vocoder_end_to_end(graphs) -> None:
    """Official schedule (30-token chunks, 12 look-ahead, 29 Euler steps + priming), ONNX DiT + ONNX vocoder vs
    the golden pipeline's pair (same state machine on the torch DiT and torch vocoder)."""
    cfg = graphs["cfg"]
    tokens = np.random.default_rng(1).integers(0, cfg.semantic_vocab_size, 75)  # 3 chunks: 30, 30, 15
    ref = _run(graphs["torch_step"], graphs["torch_vocoder"], cfg, StreamingConfig(), tokens, np.random.default_rng(3))
    got = _run(_onnx_step(graphs), graphs["onnx_vocoder"], cfg, StreamingConfig(), tokens, np.random.default_rng(3))
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g.mel, r.mel, atol=MEL_TOL, rtol=0)
    got_wav, ref_wav = np.concatenate([c.wav for c in got]), np.concatenate([c.wav for c in ref])
    assert got_wav.shape == ref_wav.shape == (75 * 4 * 480,)
    np.testing.assert_allclose(got_wav, ref_wav, atol=WAV_TOL, rtol=0)


def test_smaller_first_chunk(graphs) -> None:
    cfg = graphs["cfg"]
    tokens = np.random.default_rng(2).integers(0, cfg.semantic_vocab_size, 50)
    streaming = StreamingConfig(first_chunk_tokens=10, ode_time_points=4)
    ref = _run(graphs["torch_step"], graphs["torch_vocoder"], cfg, streaming, tokens, np.random.default_rng(4))
    got = _run(_onnx_step(graphs), graphs["onnx_vocoder"], cfg, streaming, tokens, np.random.default_rng(4))
    assert [len(c.wav) for c in got] == [len(c.wav) for c in ref] and len(ref[0].wav) < 30 * 4 * 480 // 2
    np.testing.assert_allclose(np.concatenate([c.wav for c in got]), np.concatenate([c.wav for c in ref]),
                               atol=WAV_TOL, rtol=0)


def test_onnx_path_reproduces_the_official_stream(graphs, official_fixtures: Path) -> None:
    """ONNX DiT + ONNX vocoder on the official run s75 (its tokens and its recorded noise) == the waveform the
    official kimia.py ``detokenize_audio`` produced (MANIFEST.md §2b)."""
    from safetensors.numpy import load_file

    io = load_file(official_fixtures / "dit" / "forward_and_stream_fp32.safetensors")
    noises = iter([io[f"s75.chunk{i:02d}.noise"] for i in range(N_OFFICIAL_CHUNKS)])
    chunks = _run(_onnx_step(graphs), graphs["onnx_vocoder"], graphs["cfg"], StreamingConfig(), io["s75.tokens"][0],
                  lambda n: next(noises))
    assert len(chunks) == N_OFFICIAL_CHUNKS
    for i, c in enumerate(chunks):
        np.testing.assert_allclose(c.mel, io[f"s75.chunk{i:02d}.mel"], atol=MEL_TOL, rtol=0)
    np.testing.assert_allclose(np.concatenate([c.wav for c in chunks]), io["s75.wav"][0], atol=WAV_TOL, rtol=0)


# ---- calibration inputs ------------------------------------------------------------------------------------------
def test_calibration_feeds_are_real_step_inputs(tmp_path: Path, shared_audio: Path) -> None:
    """The int8 calibration feeds are recorded from the golden detokenizer on real speech: valid graph inputs that
    span the first chunk (empty prefix) and later ones, from t_int 0 to the priming pass, and that the export
    wrapper evaluates exactly as the golden step on the unpadded prefix."""
    from kimia_edge.export.graphs.base import CalibrationContext
    from kimia_edge.export.snapshot.make import make_snapshot
    from kimia_edge.runtime.frontend import load_audio, to_16k_mono

    snap = make_snapshot(tmp_path / "snap", "tiny", seed=5)
    spec = DitStepGraph()
    module = spec.build(snap)
    context = CalibrationContext(snap, [to_16k_mono(*load_audio(shared_audio / "qa_example.wav"))])
    feeds = spec.calibration_feeds(module, context)
    assert 2 <= len(feeds) <= 48
    assert all(set(f) == set(spec.input_names) for f in feeds)
    assert {int(f["t_int"][0]) for f in feeds} >= {0, 999}
    lengths = [int(f["prefix_len"][0]) for f in feeds]
    assert lengths[0] == 0 and feeds[0]["prefix_k"].shape[3] == MIN_PREFIX and max(lengths) > 0
    golden = context.pipeline().dit_step
    for f in (feeds[0], feeds[-1]):
        n = int(f["prefix_len"][0])
        with torch.inference_mode():
            got = module(*(torch.from_numpy(f[name]) for name in spec.input_names))
        ref = golden(f["x_t"], f["t_int"], f["tokens"], f["positions"], f["prefix_k"][:, :, :, :n], f["prefix_v"][:, :, :, :n])
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g.numpy(), r, atol=STEP_TOL, rtol=0)
