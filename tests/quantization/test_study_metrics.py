"""Known-answer tests of the study's metrics (quantization/study/metrics.py): the identity gives the ideal value, a
known perturbation gives the value worked out by hand. All fast (PESQ / STOI on one ~4 s clip)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kimia_edge.quantization.study import metrics as m


def test_token_metrics():
    assert m.flip_rate([1, 2, 3, 4], [1, 2, 3, 4]) == 0.0
    assert m.flip_rate([1, 2, 3, 4], [1, 2, 0, 4]) == 0.25
    with pytest.raises(ValueError):
        m.flip_rate([1, 2], [1])
    assert m.token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert m.token_agreement([1, 2, 3], [1, 2]) == pytest.approx(2 / 3)   # a missing token disagrees
    assert m.token_agreement([1, 2], [1, 2, 3, 4]) == 0.5
    assert m.token_agreement([], []) == 1.0
    assert m.agreement_length([1, 2, 3, 4], [1, 2, 3, 4]) == 4
    assert m.agreement_length([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert m.agreement_length([(1, 5), (2, 6)], [(1, 5), (2, 7)]) == 1  # (audio, text) pairs


def test_wer():
    pytest.importorskip("jiwer")
    assert m.wer("the cat sat on the mat", "the cat sat on the mat") == 0.0
    # one substitution (sat -> sit) and one deletion (the) over six reference words
    assert m.wer("the cat sat on the mat", "the cat sit on mat") == pytest.approx(2 / 6)
    assert m.wer("a b", "a b c d") == pytest.approx(1.0)  # two insertions over two words
    assert m.wer("", "") == 0.0 and m.wer("  ", "x") == 1.0


def test_cosine_snr_rel_l2():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 16))
    assert m.cosine(x, x) == pytest.approx(1.0)
    assert m.cosine(x, 3.0 * x) == pytest.approx(1.0)
    assert m.cosine(x, -x) == pytest.approx(-1.0)
    assert m.cosine(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])) == pytest.approx(0.0)
    assert m.cosine(np.zeros((2, 3)), np.zeros((2, 3))) == 1.0
    assert m.snr_db(x, x) == math.inf and m.rel_l2(x, x) == 0.0
    for target in (0.0, 20.0, 43.5):
        noise = rng.standard_normal(x.shape)
        noise *= math.sqrt(np.sum(x ** 2) / 10 ** (target / 10) / np.sum(noise ** 2))  # noise power set exactly
        assert m.snr_db(x, x + noise) == pytest.approx(target, abs=1e-9)
        assert m.rel_l2(x, x + noise) == pytest.approx(10 ** (-target / 20), rel=1e-9)


def test_kld_of_known_distributions():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    got = m.kld_rows(np.log(p)[None], np.log(q)[None] + 7.0)  # logits: any offset
    assert got[0] == pytest.approx(expected, rel=1e-12)
    x = np.random.default_rng(1).standard_normal((5, 100)).astype(np.float32)
    assert np.all(m.kld_rows(x, x) == 0.0)


def test_bootstrap_interval():
    assert m.bootstrap_ci([2.0] * 30) == (2.0, 2.0)
    v = np.random.default_rng(2).standard_normal(400)
    lo, hi = m.bootstrap_ci(v, n=2000, seed=3)
    assert lo < v.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 / math.sqrt(400), rel=0.15)  # the normal-theory half-width
    assert m.bootstrap_ci(v, seed=5) == m.bootstrap_ci(v, seed=5)  # seeded: reproducible


def test_head_quality_identity_and_known_perturbation():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((40, 32)).astype(np.float32) * 3
    q = m.head_quality(ref, ref.copy(), n_boot=200)
    assert q["positions"] == 40
    assert q["mean_kld"]["value"] == 0.0 and q["mean_kld"]["pm"] == 0.0 and q["max_kld"] == 0.0
    assert q["top1_agreement"]["value"] == 1.0 and q["rms_delta_p"]["value"] == 0.0
    assert all(v == 0.0 for v in q["delta_p_percentiles"].values())
    # two-token heads: ref p(top) = 0.8 at every position; the variant gives the top token 0.6 at the first half of
    # the positions and 0.3 (its top flips) at the other half
    def logits(p):
        return np.log(np.array([[pi, 1 - pi] for pi in p]))
    ref2 = logits([0.8] * 10)
    var2 = logits([0.6] * 5 + [0.3] * 5)
    q2 = m.head_quality(ref2, var2, n_boot=200)
    kl = lambda a, b: a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))  # noqa: E731
    assert q2["mean_kld"]["value"] == pytest.approx((kl(0.8, 0.6) + kl(0.8, 0.3)) / 2)
    assert q2["top1_agreement"]["value"] == pytest.approx(0.5)
    assert q2["mean_delta_p"]["value"] == pytest.approx((-0.2 - 0.5) / 2)
    assert q2["rms_delta_p"]["value"] == pytest.approx(math.sqrt((0.04 + 0.25) / 2))
    assert q2["delta_p_percentiles"]["p1"] == pytest.approx(-0.5) and q2["delta_p_percentiles"]["p99"] == pytest.approx(-0.2)
    assert q2["top1_agreement"]["ci_low"] < 0.5 < q2["top1_agreement"]["ci_high"]


def test_spectral_distances():
    rng = np.random.default_rng(4)
    mel = rng.standard_normal((30, 80))
    assert m.mel_l1(mel, mel) == 0.0 and m.mel_l1(mel, mel + 0.5) == pytest.approx(0.5)
    assert m.log_spectral_distance_log(mel, mel) == 0.0
    assert m.log_spectral_distance_log(mel, mel + 1.0) == pytest.approx(20 / math.log(10))  # 1 neper = 8.686 dB
    power = np.exp(mel)
    assert m.log_spectral_distance(power, power) == 0.0
    assert m.log_spectral_distance(power, power * 10.0, eps=0.0) == pytest.approx(10.0)  # x10 power = 10 dB


def test_multi_resolution_stft_distance():
    wav = np.random.default_rng(5).standard_normal(24000)
    same = m.multi_resolution_stft_distance(wav, wav)
    assert same == {"spectral_convergence": 0.0, "log_magnitude": 0.0, "total": 0.0}
    half = m.multi_resolution_stft_distance(wav, 0.5 * wav)  # a gain g: SC = |1 - g|, log-magnitude = |ln g|
    assert half["spectral_convergence"] == pytest.approx(0.5, rel=1e-9)
    assert half["log_magnitude"] == pytest.approx(math.log(2.0), rel=1e-6)
    noisy = m.multi_resolution_stft_distance(wav, wav + 0.1 * np.random.default_rng(6).standard_normal(24000))
    assert 0 < noisy["total"] < half["total"] * 2


def test_l2_is_the_euclidean_norm():
    assert m.l2(np.array([3.0, 4.0])) == 5.0
    x = np.random.default_rng(1).standard_normal((300, 513))
    assert m.l2(x) == pytest.approx(float(np.linalg.norm(x)), rel=1e-13)


def test_pesq_and_stoi_on_real_speech(shared_audio):
    pytest.importorskip("pesq")
    pytest.importorskip("pystoi")
    from kimia_edge.runtime.frontend import load_audio, to_16k_mono

    wav = to_16k_mono(*load_audio(shared_audio / "qa_example.wav"))[:16000 * 3].astype(np.float64)
    noise = np.random.default_rng(7).standard_normal(wav.size)
    noise *= math.sqrt(np.sum(wav ** 2) / np.sum(noise ** 2))  # 0 dB SNR white noise
    assert m.stoi(wav, wav, 16000) == pytest.approx(1.0, abs=1e-6)
    assert m.pesq_wb(wav, wav, 16000) > 4.5  # P.862.2 maps a perfect copy to 4.64
    degraded_stoi, degraded_pesq = m.stoi(wav, wav + noise, 16000), m.pesq_wb(wav, wav + noise, 16000)
    assert degraded_stoi < 0.9 and degraded_pesq < 2.0
    # resampling to 16 kHz inside pesq_wb: the same comparison at 24 kHz lands close to the 16 kHz one
    up, up_noisy = m.resample(wav, 16000, 24000), m.resample(wav + noise, 16000, 24000)
    assert m.pesq_wb(up, up_noisy, 24000) == pytest.approx(degraded_pesq, abs=0.3)
    assert m.pesq_wb(np.zeros(16000), np.zeros(16000), 16000) is None  # no utterance in silence
    assert m.pesq_wb(wav[:3200], wav[:3200], 16000) is None  # 0.2 s: shorter than PESQ's quarter second
