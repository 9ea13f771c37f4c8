"""The numpy streaming detokenizer state machine, plugged with the torch reference DiT, against the official
``detokenize_audio`` fixture runs; schedule, stitching arithmetic, KV window and position reset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kimia_edge.export.checkpoint import load_strict
from kimia_edge.export.reference.dit import TorchDitStep, build_dit
from kimia_edge.export.snapshot.detokenizer import read_detokenizer
from kimia_edge.runtime.detokenizer import (
    StreamingDetokenizer,
    euler_time_grid,
    hamming_window_periodic,
)
from kimia_edge.runtime.spec.streaming import StreamingConfig

# MANIFEST.md §10 "suggested parity thresholds for an fp32 re-implementation": 1e-4 abs on mels, 5e-5 on waves.
MEL_ATOL = 1e-4
WAV_ATOL = 5e-5
RUNS = {"s75": 30, "s75_ode5": 5}          # run -> ode_step (time points) of the fixture
N_CHUNKS = 3
FRAME = 480
UP = 4
# Periodic Hamming: w[n] + w[n + N/2] = 2 * 0.54 (reference doc §3.3).
OVERLAP_GAIN = 1.08


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # timings and fp32 rounding as measured


@pytest.fixture(scope="module")
def dit(official_fixtures: Path):
    cfg, sd = read_detokenizer(official_fixtures / "kimia_snapshot")
    model = build_dit(cfg).eval()
    load_strict(model, sd, source="official-fixtures/kimia_snapshot/audio_detokenizer/model.pt")
    return cfg, TorchDitStep(model)


@pytest.fixture(scope="module")
def io(official_fixtures: Path):
    from safetensors.numpy import load_file

    return load_file(official_fixtures / "dit" / "forward_and_stream_fp32.safetensors")


@pytest.fixture(scope="module")
def trace(official_fixtures: Path):
    return json.loads((official_fixtures / "dit" / "trace.json").read_text())["streaming"]


class Recorder:
    """Wraps a real dit_step and records each call's schedule (t_int, n_q, positions, n_k) and priming K."""

    def __init__(self, step):
        self.step = step
        self.calls = []
        self.outputs = []

    def __call__(self, x, t_int, tokens, positions, prefix_k, prefix_v):
        self.calls.append({"t_int": int(t_int[0]), "n_q": int(x.shape[1]), "pos0": int(positions[0, 0]),
                           "pos1": int(positions[0, -1]), "n_k": int(prefix_k.shape[3] + x.shape[1])})
        out = self.step(x, t_int, tokens, positions, prefix_k, prefix_v)
        self.outputs.append(out)
        return out


def replay_vocoder(io, run: str):
    """Replays the official vocoder's recorded output for the recorded input mel (official numbers, not a model of
    ours): the mel fed must match the recorded ``vocoder_in_mel`` within the mel tolerance."""
    table = [(io[f"{run}.chunk{i:02d}.vocoder_in_mel"], io[f"{run}.chunk{i:02d}.vocoder_out_wav"][0])
             for i in range(N_CHUNKS)]

    def vocoder(mel: np.ndarray) -> np.ndarray:
        for ref_in, ref_out in table:
            if ref_in.shape == mel.shape and np.abs(ref_in - mel).max() <= MEL_ATOL:
                return ref_out
        raise AssertionError(f"no recorded vocoder call for a mel of shape {mel.shape}")

    return vocoder


def recorded_noise(io, run: str):
    noises = iter([io[f"{run}.chunk{i:02d}.noise"] for i in range(N_CHUNKS)])
    return lambda n: next(noises)


def run_all(det: StreamingDetokenizer, tokens) -> list:
    return list(det.push(tokens)) + list(det.finish())


# ---- end-to-end parity ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run", sorted(RUNS))
def test_streaming_matches_official_run(dit, io, trace, run):
    cfg, step = dit
    rec = Recorder(step)
    det = StreamingDetokenizer(rec, replay_vocoder(io, run), StreamingConfig(ode_time_points=RUNS[run]), cfg,
                               noise=recorded_noise(io, run))
    chunks = run_all(det, io[f"{run}.tokens"][0])
    assert len(chunks) == N_CHUNKS
    for i, c in enumerate(chunks):
        p = f"{run}.chunk{i:02d}"
        err_mel = np.abs(c.mel - io[f"{p}.mel"]).max()
        err_in = np.abs(c.vocoder_in_mel - io[f"{p}.vocoder_in_mel"]).max()
        err_wav = np.abs(c.wav - io[f"{p}.out_wav"][0]).max()
        assert err_mel <= MEL_ATOL and err_in <= MEL_ATOL, (i, err_mel, err_in)
        assert c.wav.shape == io[f"{p}.out_wav"][0].shape and err_wav <= WAV_ATOL, (i, err_wav)
    wav = np.concatenate([c.wav for c in chunks])
    assert wav.shape[0] == trace[run]["final_wav_samples"]
    assert np.abs(wav - io[f"{run}.wav"][0]).max() <= WAV_ATOL
    # Network-call schedule = the official one (t_int, query frames, positions, key frames), call for call.
    assert rec.calls == trace[run]["net_calls"]
    for c, ref in zip(chunks, trace[run]["chunks"]):
        assert c.start_position == ref["start_position_id"]
        assert c.mel.shape[0] == ref["mel_frames_out"] and c.vocoder_in_mel.shape[0] == ref["vocoder_in_frames"]
        assert c.wav.shape[0] == ref["emitted_samples"]


def test_streaming_with_the_real_bigvgan(dit, io, official_fixtures: Path):
    """End to end with our BigVGAN reference (not the replayed official vocoder output)."""
    try:
        from kimia_edge.export.reference.bigvgan import build_bigvgan
        from kimia_edge.export.snapshot.vocoder import read_vocoder
    except ImportError as e:       # another engineer's module
        pytest.skip(f"BigVGAN reference not importable: {e}")
    vcfg, vsd = read_vocoder(official_fixtures / "kimia_snapshot")
    model = build_bigvgan(vcfg).eval()
    load_strict(model, vsd, source="official-fixtures/kimia_snapshot/vocoder/model.pt")

    def vocoder(mel: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(mel).T[None]).reshape(-1).numpy()

    cfg, step = dit
    det = StreamingDetokenizer(step, vocoder, StreamingConfig(), cfg, noise=recorded_noise(io, "s75"))
    wav = np.concatenate([c.wav for c in run_all(det, io["s75.tokens"][0])])
    assert np.abs(wav - io["s75.wav"][0]).max() <= WAV_ATOL


# ---- numeric building blocks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("points", [5, 30])
def test_euler_grid_matches_torchdyn_walk_over_torch_linspace(points, trace):
    t, dt = euler_time_grid(points)
    span = torch.linspace(0, 1, points)
    # torchdyn _fixed_odeint: t += dt; dt = t_span[k+1] - t (float32 tensors)
    tt, ddt, ref_t, ref_dt = span[0], span[1] - span[0], [], []
    for k in range(1, points):
        ref_t.append(float(tt))
        ref_dt.append(float(ddt))
        tt = tt + ddt
        if k < points - 1:
            ddt = span[k + 1] - tt
    # <= 1 float32 ulp (torch's vectorised linspace lanes round a few entries differently)
    np.testing.assert_allclose(t, ref_t, rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(dt, ref_dt, rtol=0, atol=1.2e-7)
    run = "s75" if points == 30 else "s75_ode5"
    official = [c["t_int"] for c in trace[run]["net_calls"][:points - 1]]
    assert [int(np.float32(x) * np.float32(1000)) for x in t] == official


@pytest.mark.parametrize("length", [2, 9, 34560, 40320])
def test_hamming_window_matches_torch(length):
    np.testing.assert_allclose(hamming_window_periodic(length), torch.hamming_window(length).numpy(), atol=1e-6)
    if length % 2 == 0:
        w = hamming_window_periodic(length)
        np.testing.assert_allclose(w[: length // 2] + w[length // 2:], OVERLAP_GAIN, atol=1e-6)


# ---- stitching arithmetic, schedule variants, KV window and reset (tiny real DiT, cheap ODE) -------------------------
def constant_vocoder(mel: np.ndarray) -> np.ndarray:
    """A deterministic stand-in signal source (not a model of the vocoder): every sample = 1."""
    return np.ones(mel.shape[0] * FRAME, dtype=np.float32)


def test_stitching_sample_counts_and_overlap_gain(dit):
    cfg, step = dit
    det = StreamingDetokenizer(step, constant_vocoder, StreamingConfig(ode_time_points=2), cfg,
                               noise=np.random.default_rng(0))
    tokens = np.random.default_rng(1).integers(0, 100, 30 * 5 + 7)
    chunks = run_all(det, tokens)
    # chunk 0: 120 frames in, 72 out, half emitted; chunks 1..: 120 out; alternating holdback 84 / 36 frames.
    assert [c.mel.shape[0] for c in chunks] == [72, 120, 120, 120, 120, 76]
    assert [c.vocoder_in_mel.shape[0] for c in chunks] == [72, 156, 204, 156, 204, 112]
    assert [c.wav.shape[0] for c in chunks] == [17280, 34560, 80640, 34560, 80640, 53760]
    assert sum(c.wav.shape[0] for c in chunks) == tokens.size * UP * FRAME
    first = chunks[0].wav
    assert np.all(first == 1.0)
    for c in chunks[1:-1]:          # cross-faded first half of each non-final emission, then plain samples
        half = c.wav.shape[0] // 2
        np.testing.assert_allclose(c.wav[:half], OVERLAP_GAIN, atol=1e-6)
        assert np.all(c.wav[half:] == 1.0)
    assert np.all(chunks[-1].wav == 1.0)                     # final chunk: no cross-fade


def test_kv_window_and_position_reset_over_4096_frames(dit):
    """l1070 geometry (MANIFEST §2b): 36 chunks; from chunk 8 on the cache holds 900 frames; after chunk 32
    (start 3792 + 120, + 2·120 > 4096) positions and cache reset; chunk 33 starts at 0 with an empty cache."""
    cfg, step = dit
    rec = Recorder(step)
    det = StreamingDetokenizer(rec, constant_vocoder, StreamingConfig(ode_time_points=2), cfg,
                               noise=np.random.default_rng(2))
    tokens = np.random.default_rng(3).integers(0, 100, 1070)
    chunks = []
    for c in det.push(tokens):
        chunks.append(c)
        # the cache ends with the priming K of this chunk, and holds at most 900 frames
        primed_k = rec.outputs[-1][1]
        if not c.positions_reset:
            assert det.kv_frames == min(900, c.prefix_frames + c.mel.shape[0])
            np.testing.assert_array_equal(det._prefix_k[:, :, :, -c.mel.shape[0]:], primed_k)
        else:
            assert det.kv_frames == 0 and det.start_position == 0
    chunks += list(det.finish())
    assert len(chunks) == 36
    starts = [c.start_position for c in chunks]
    assert starts[:3] == [0, 72, 192] and starts[32] == 3792 and starts[33] == 0 and starts[35] == 240
    assert [c.positions_reset for c in chunks].count(True) == 1 and chunks[32].positions_reset
    prefix = [c.prefix_frames for c in chunks]
    assert prefix[:8] == [0, 72, 192, 312, 432, 552, 672, 792]
    assert all(p == 900 for p in prefix[8:33]) and prefix[33:] == [0, 120, 240]   # carried look-ahead: 120 out
    # absolute positions beyond the window: chunk 20's calls run at positions 2352..2519 with 900 + 168 keys
    calls_20 = [r for r in rec.calls if r["pos0"] == starts[20]]
    assert calls_20[0]["pos1"] == starts[20] + 167 and calls_20[0]["n_k"] == 900 + 168
    assert max(r["pos1"] for r in rec.calls) < 4096
    assert sum(c.wav.shape[0] for c in chunks) == 1070 * UP * FRAME


def test_small_first_chunk_and_growth(dit):
    cfg, step = dit
    scfg = StreamingConfig(first_chunk_tokens=10, chunk_tokens=20, chunk_growth_tokens=10, max_chunk_tokens=40,
                           ode_time_points=3)
    det = StreamingDetokenizer(step, constant_vocoder, scfg, cfg, noise=np.random.default_rng(4))
    tokens = np.random.default_rng(5).integers(0, 100, 150)
    (first,) = list(det.push(tokens[:11]))
    # 10 tokens = 40 frames: 5 tokens (20 frames) withheld, 20 frames out, half of them emitted at once
    assert first.mel.shape[0] == 20 and first.wav.shape[0] == 20 * FRAME // 2
    rest = list(det.push(tokens[11:])) + list(det.finish())
    chunks = [first] + rest
    # consumed tokens per chunk: 10, 20, 30, 40, 40, then the final 10
    assert [c.mel.shape[0] for c in chunks] == [20, 20 + 80 - 48, 120, 160, 160, 40 + 48]
    assert sum(c.wav.shape[0] for c in chunks) == tokens.size * UP * FRAME
    assert np.all(np.isfinite(np.concatenate([c.wav for c in chunks])))


def test_push_granularity_does_not_change_the_output(dit):
    cfg, step = dit
    tokens = np.random.default_rng(6).integers(0, 100, 95)
    outs = []
    for pieces in ([tokens], np.array_split(tokens, 95), np.array_split(tokens, 4)):
        det = StreamingDetokenizer(step, constant_vocoder, StreamingConfig(ode_time_points=3), cfg,
                                   noise=np.random.default_rng(7))
        chunks = [c for p in pieces for c in det.push(p)] + list(det.finish())
        outs.append(np.concatenate([c.mel for c in chunks]))
        # finish() resets: a second utterance on the same object starts from position 0
        assert det.start_position == 0 and det.kv_frames == 0
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_short_utterance_is_one_final_chunk_and_errors_are_clear(dit):
    cfg, step = dit
    det = StreamingDetokenizer(step, constant_vocoder, StreamingConfig(ode_time_points=2), cfg,
                               noise=np.random.default_rng(8))
    assert list(det.push([1, 2, 3] * 10)) == []               # exactly one chunk's worth: might be the last one
    (only,) = list(det.finish())
    assert only.is_final and only.wav.shape[0] == 30 * UP * FRAME
    with pytest.raises(ValueError, match="tokens"):
        list(det.push([cfg.semantic_vocab_size]))
    bad = StreamingDetokenizer(step, constant_vocoder, StreamingConfig(ode_time_points=2), cfg,
                               noise=lambda n: np.zeros((n, 79), np.float32))
    with pytest.raises(ValueError, match="noise"):
        list(bad.push(np.zeros(31, np.int64)))
    with pytest.raises(ValueError, match="max_positions"):
        StreamingDetokenizer(step, constant_vocoder, StreamingConfig(max_positions=8192), cfg)
