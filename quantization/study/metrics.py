"""The study's metrics: each compares a variant's output with the reference output for the same inputs and the same
noise. numpy (and scipy) only, no torch, so the runtime can reuse them; jiwer, pesq and pystoi (the ``study`` extra)
are imported where they are used.

Conventions: ``ref`` first, the variant second; errors are 0 for identical inputs, agreements 1, SNR ``inf``.

- tokens: :func:`flip_rate` (VQ semantic ids), :func:`token_agreement` (audio tokens of two runs, lengths may
  differ), :func:`agreement_length` (greedy steps until the first divergence), :func:`wer` (jiwer);
- tensors: :func:`cosine` (mean per-row cosine, e.g. per Whisper frame), :func:`snr_db`, :func:`rel_l2`;
- LLM logits, per head: :func:`kld_rows` (KL(P_ref || P_variant) per position, nats) and :func:`head_quality`:
  mean / median / p99 / max KLD, top-1 agreement (llama.cpp's "same top p": the two argmaxes equal), Δp (the
  variant's probability of the reference's top token minus the reference's, llama.cpp's Δp with the reference
  top token as "the correct token") as mean, RMS and percentiles, with bootstrap 95 % intervals (:func:`bootstrap_ci`);
- spectra: :func:`mel_l1`, :func:`log_spectral_distance` (dB, from power spectra) and
  :func:`log_spectral_distance_log` (from natural-log amplitude spectra such as the DiT's mel);
- waveforms: :func:`multi_resolution_stft_distance` (spectral convergence + log-magnitude L1, averaged over three
  STFT resolutions, as in Parallel WaveGAN / BigVGAN training losses), :func:`pesq_wb`, :func:`stoi`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

__all__ = ["flip_rate", "token_agreement", "agreement_length", "wer", "cosine", "snr_db", "rel_l2", "log_softmax64",
           "kld_rows", "bootstrap_ci", "head_quality", "DELTA_P_PERCENTILES", "mel_l1", "log_spectral_distance",
           "log_spectral_distance_log", "stft_magnitude", "STFT_RESOLUTIONS", "multi_resolution_stft_distance",
           "pesq_wb", "stoi", "resample", "l2"]

DB_PER_NEPER = 20.0 / math.log(10.0)  # an amplitude ratio of e, in dB


def l2(x: np.ndarray) -> float:
    """Euclidean (Frobenius) norm by numpy's pairwise summation: the same bits at any BLAS thread count
    (``np.linalg.norm`` of a whole array is a BLAS dot, whose threaded sum changes the last bits with
    OMP_NUM_THREADS, e.g. in a Ray worker)."""
    return float(np.sqrt(np.sum(np.square(np.asarray(x, dtype=np.float64)))))


def _pair(ref: np.ndarray, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    ref64, x64 = np.asarray(ref, dtype=np.float64), np.asarray(x, dtype=np.float64)
    if ref64.shape != x64.shape:
        raise ValueError(f"shape mismatch: reference {ref64.shape}, variant {x64.shape}")
    return ref64, x64


# ------------------------------------------------------------------------------------------------------ tokens
def flip_rate(ref_ids: Sequence[int], ids: Sequence[int]) -> float:
    """Fraction of positions whose id differs (same length required: the VQ encoder maps frames to ids 1:1)."""
    a, b = np.asarray(ref_ids), np.asarray(ids)
    if a.shape != b.shape:
        raise ValueError(f"flip rate: reference has {a.shape} ids, variant {b.shape}")
    return float(np.mean(a != b)) if a.size else 0.0


def token_agreement(ref_ids: Sequence[int], ids: Sequence[int]) -> float:
    """Position-wise agreement of two token sequences over the longer one (a missing token disagrees); 1.0 when both
    are empty."""
    a, b = np.asarray(ref_ids), np.asarray(ids)
    n = max(a.size, b.size)
    if n == 0:
        return 1.0
    m = min(a.size, b.size)
    return float(np.sum(a[:m] == b[:m]) / n)


def agreement_length(ref_ids: Sequence, ids: Sequence) -> int:
    """Number of leading positions where the two sequences agree (greedy steps until the first divergence)."""
    n = 0
    for a, b in zip(ref_ids, ids):
        if a != b:
            break
        n += 1
    return n


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate of ``hypothesis`` against ``reference`` (jiwer). An empty reference gives 0 if the hypothesis
    is empty too, else 1 (jiwer refuses an empty reference)."""
    import jiwer

    if not reference.split():
        return 0.0 if not hypothesis.split() else 1.0
    return float(jiwer.wer(reference, hypothesis))


# ----------------------------------------------------------------------------------------------------- tensors
def cosine(ref: np.ndarray, x: np.ndarray) -> float:
    """Mean over rows (all axes but the last) of the cosine similarity along the last axis; a zero row counts 1 if
    both rows are zero, else 0."""
    a, b = _pair(ref, x)
    a, b = a.reshape(-1, a.shape[-1] if a.ndim else 1), b.reshape(-1, b.shape[-1] if b.ndim else 1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-300))
    return float(np.mean(cos)) if cos.size else 1.0


def snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    """10 log10(Σ ref² / Σ (x - ref)²) in dB; ``inf`` when identical."""
    a, b = _pair(ref, x)
    noise = float(np.sum((b - a) ** 2))
    signal = float(np.sum(a ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def rel_l2(ref: np.ndarray, x: np.ndarray) -> float:
    """||x - ref|| / ||ref|| (the exporter's error measure)."""
    a, b = _pair(ref, x)
    return float(l2(b - a) / max(l2(a), 1e-300))


# ---------------------------------------------------------------------------------------------------- logits
def log_softmax64(x: np.ndarray) -> np.ndarray:
    """log softmax along the last axis in float64."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kld_rows(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(logits)) per row, nats, float64; [P, V] x2 -> [P]. Identical rows give exactly 0."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logits: expected shape {ref_logits.shape}, got {logits.shape}")
    out = np.empty(ref_logits.shape[0], dtype=np.float64)
    for i in range(ref_logits.shape[0]):  # row by row: [V] float64 temporaries only (V is 152k-168k for real)
        lp, lq = log_softmax64(ref_logits[i]), log_softmax64(logits[i])
        out[i] = float(np.sum(np.exp(lp) * (lp - lq)))
    return out


def bootstrap_ci(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean, *, n: int = 1000,
                 level: float = 0.95, seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over ``values`` (resampled with replacement ``n`` times, seeded:
    the same values give the same interval). Constant values give a zero-width interval."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n, v.size))
    stats = np.array([stat(v[row]) for row in idx])
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(stats, [tail, 100.0 - tail])
    return float(lo), float(hi)


DELTA_P_PERCENTILES: Tuple[float, ...] = (1.0, 5.0, 10.0, 50.0, 90.0, 95.0, 99.0)


def _with_ci(values: np.ndarray, stat: Callable[[np.ndarray], float], seed: int, n_boot: int) -> Dict[str, float]:
    lo, hi = bootstrap_ci(values, stat, n=n_boot, seed=seed)
    return {"value": float(stat(values)), "ci_low": lo, "ci_high": hi, "pm": (hi - lo) / 2.0}


def head_quality(ref_logits: np.ndarray, logits: np.ndarray, *, n_boot: int = 1000, seed: int = 0
                 ) -> Dict[str, object]:
    """One head's quality over P positions ([P, V] logits each): KLD statistics, top-1 agreement and Δp, each
    summary with a bootstrap 95 % interval over positions (``pm`` = half its width). ``kld`` keeps the per-position
    values for histograms."""
    k = kld_rows(ref_logits, logits)
    ref_top = np.argmax(ref_logits, axis=-1)
    same = (ref_top == np.argmax(logits, axis=-1)).astype(np.float64)
    rows = np.arange(ref_top.size)
    p_ref = np.exp(log_softmax64(ref_logits)[rows, ref_top]) if ref_top.size else np.zeros(0)
    p_var = np.exp(np.stack([log_softmax64(logits[i])[ref_top[i]] for i in rows])) if ref_top.size else np.zeros(0)
    dp = p_var - p_ref
    rms = lambda v: float(np.sqrt(np.mean(v ** 2)))  # noqa: E731
    p99 = lambda v: float(np.percentile(v, 99.0))  # noqa: E731
    return {
        "positions": int(k.size),
        "mean_kld": _with_ci(k, np.mean, seed, n_boot),
        "median_kld": float(np.median(k)),
        "p99_kld": _with_ci(k, p99, seed + 1, n_boot),
        "max_kld": float(k.max(initial=0.0)),
        "top1_agreement": _with_ci(same, np.mean, seed + 2, n_boot),
        "mean_delta_p": _with_ci(dp, np.mean, seed + 3, n_boot),
        "rms_delta_p": _with_ci(dp, rms, seed + 4, n_boot),
        "delta_p_percentiles": {f"p{q:g}": float(np.percentile(dp, q)) for q in DELTA_P_PERCENTILES},
        "kld": [float(v) for v in k],
    }


# ---------------------------------------------------------------------------------------------------- spectra
def mel_l1(ref_mel: np.ndarray, mel: np.ndarray) -> float:
    """Mean absolute difference of two (log-)mel spectrograms."""
    a, b = _pair(ref_mel, mel)
    return float(np.mean(np.abs(b - a))) if a.size else 0.0


def log_spectral_distance(ref_power: np.ndarray, power: np.ndarray, eps: float = 1e-10) -> float:
    """LSD in dB from power spectrograms [frames, bins]: mean over frames of the RMS over bins of
    10 log10(P_ref / P)."""
    a, b = _pair(ref_power, power)
    d = 10.0 * (np.log10(a + eps) - np.log10(b + eps))
    return float(np.mean(np.sqrt(np.mean(d.reshape(-1, d.shape[-1]) ** 2, axis=-1))))


def log_spectral_distance_log(ref_log_amp: np.ndarray, log_amp: np.ndarray) -> float:
    """LSD in dB from natural-log amplitude spectrograms [frames, bins] (the DiT / vocoder mel): a difference of
    ``d`` nepers is ``d * 20 / ln 10`` dB."""
    a, b = _pair(ref_log_amp, log_amp)
    d = DB_PER_NEPER * (a - b)
    return float(np.mean(np.sqrt(np.mean(d.reshape(-1, d.shape[-1]) ** 2, axis=-1))))


# (n_fft, hop, window) — the three resolutions of Parallel WaveGAN's multi-resolution STFT loss
STFT_RESOLUTIONS: Tuple[Tuple[int, int, int], ...] = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))


def stft_magnitude(wav: np.ndarray, n_fft: int, hop: int, win: int) -> np.ndarray:
    """|STFT| [frames, n_fft/2+1] with a periodic Hann window of ``win`` samples centred in ``n_fft``, reflect
    padding of n_fft/2 on both sides (torch.stft(center=True) framing)."""
    x = np.asarray(wav, dtype=np.float64).reshape(-1)
    pad = n_fft // 2
    x = np.pad(x, pad, mode="reflect" if x.size > pad else "constant")
    window = np.zeros(n_fft)
    left = (n_fft - win) // 2
    window[left:left + win] = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(win) / win)
    frames = 1 + (x.size - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    return np.abs(np.fft.rfft(x[idx] * window, axis=-1))


def multi_resolution_stft_distance(ref_wav: np.ndarray, wav: np.ndarray,
                                   resolutions: Iterable[Tuple[int, int, int]] = STFT_RESOLUTIONS,
                                   eps: float = 1e-7) -> Dict[str, float]:
    """Mean over resolutions of the spectral convergence ||S_ref - S||_F / ||S_ref||_F and of the log-magnitude
    distance mean |ln S_ref - ln S|; ``total`` is their sum. A gain g on the same signal gives |1 - g| and |ln g|."""
    a, b = _pair(ref_wav, wav)
    sc, mag = [], []
    for n_fft, hop, win in resolutions:
        sa, sb = stft_magnitude(a, n_fft, hop, win), stft_magnitude(b, n_fft, hop, win)
        sc.append(l2(sa - sb) / max(l2(sa), 1e-300))
        mag.append(np.mean(np.abs(np.log(np.maximum(sa, eps)) - np.log(np.maximum(sb, eps)))))
    out = {"spectral_convergence": float(np.mean(sc)), "log_magnitude": float(np.mean(mag))}
    out["total"] = out["spectral_convergence"] + out["log_magnitude"]
    return out


# ------------------------------------------------------------------------------------------- speech quality
def resample(wav: np.ndarray, rate_hz: int, target_hz: int) -> np.ndarray:
    """Polyphase resampling (scipy), float64."""
    from scipy.signal import resample_poly

    x = np.asarray(wav, dtype=np.float64).reshape(-1)
    if rate_hz == target_hz:
        return x
    g = math.gcd(rate_hz, target_hz)
    return resample_poly(x, target_hz // g, rate_hz // g)


def pesq_wb(ref_wav: np.ndarray, wav: np.ndarray, rate_hz: int) -> Optional[float]:
    """Wide-band PESQ (ITU-T P.862.2, MOS-LQO 1.0 to 4.64) of ``wav`` against ``ref_wav``, both resampled to 16 kHz.
    None when PESQ finds no utterance (silence, or shorter than about a quarter second)."""
    from pesq import pesq
    from pesq.cypesq import BufferTooShortError, NoUtterancesError

    a, b = resample(ref_wav, rate_hz, 16000), resample(wav, rate_hz, 16000)
    if not np.any(a) or not np.any(b):  # pesq normalises by the peak: all zeros would divide by zero
        return None
    try:
        return float(pesq(16000, a, b, "wb"))
    except (NoUtterancesError, BufferTooShortError):
        return None


def stoi(ref_wav: np.ndarray, wav: np.ndarray, rate_hz: int, extended: bool = False) -> float:
    """Short-time objective intelligibility (pystoi; 0 to 1, 1 for identical speech)."""
    from pystoi import stoi as _stoi

    a, b = np.asarray(ref_wav, dtype=np.float64).reshape(-1), np.asarray(wav, dtype=np.float64).reshape(-1)
    return float(_stoi(a, b, rate_hz, extended=extended))
