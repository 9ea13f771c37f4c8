"""Audio front end shared by both audio tokenizers (torch-free: numpy, scipy, soundfile).

Everything here reproduces the official Kimi-Audio / GLM-4-Voice input path:

- ``load_audio`` + ``to_16k_mono``: file -> float32 mono at 16 kHz (the official code uses ``librosa.load(sr=16000)``,
  i.e. a channel mean and a soxr resampler; here the channel mean and ``scipy.signal.resample_poly``).

Rules for audio handed over as arrays (``to_mono``, ``to_16k_mono``, ``check_audible``, hence every turn):

- **Sample type**: floating point, full scale = 1.0. Integer PCM is refused, never guessed at: convert it with
  ``pcm_to_float32`` (int16 / 32768, int32 / 2**31, uint8 (x - 128) / 128: the scaling soundfile and librosa use),
  because a raw int16 clip cast to float would be 32768 times too loud.
- **Channel axis**: ``[S]`` mono or ``[S, C]`` frames x channels (the soundfile / sounddevice layout), channels on
  the last axis, 1..MAX_CHANNELS of them. A ``[C, S]`` channels-first array has more "channels" than that and is
  refused with a hint to transpose it, instead of being averaged across time.
- **Files**: ``load_audio`` reads any format libsndfile reads; a file whose header declares more audio than it
  holds (a truncated WAV / AIFF) is read up to where it ends, with a warning naming both lengths.
- ``log_mel``: the Whisper log-mel spectrogram (kimia_infer/models/tokenizer/whisper_Lv3/whisper.py
  ``log_mel_spectrogram``; identical math in HF ``WhisperFeatureExtractor`` used by GLM-4-Voice).
- ``mel_filter_bank``: librosa's Slaney mel filter bank, so nothing depends on ``mel_filters.npz`` at run time.
- ``segment_30s`` / ``tokens_for_samples``: the 30 s segmentation and the 12.5 Hz token count of both branches
  (whisper.py ``tokenize_waveform``; GLM-4-Voice speech_tokenizer/utils.py ``extract_speech_token``).
- ``pad_batch_longest``: the padding of ``WhisperFeatureExtractor(padding="longest", pad_to_multiple_of=...)``.
"""
from __future__ import annotations

import logging
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, List, Optional, Sequence, Tuple, Union

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "SAMPLE_RATE_HZ",
    "N_FFT",
    "HOP_LENGTH",
    "CHUNK_LENGTH_S",
    "N_SAMPLES",
    "N_FRAMES",
    "SAMPLES_PER_TOKEN",
    "LOG_MEL_CLAMP",
    "LOG_MEL_DYNAMIC_RANGE",
    "LOG_MEL_OFFSET",
    "LOG_MEL_SCALE",
    "AudioFileError",
    "load_audio",
    "read_audio",
    "pcm_to_float32",
    "to_mono",
    "to_16k_mono",
    "mel_filter_bank",
    "log_mel",
    "pad_or_trim",
    "segment_30s",
    "tokens_for_samples",
    "pad_batch_longest",
]

# ---- constants (whisper.py "hard-coded audio hyperparameters"; same values in preprocessor_config.json) ----------
SAMPLE_RATE_HZ = 16_000                      # whisper.py SAMPLE_RATE; librosa.load(sr=16000) in prompt_manager.py
N_FFT = 400                                  # whisper.py N_FFT (25 ms window)
HOP_LENGTH = 160                             # whisper.py HOP_LENGTH (10 ms hop -> 100 Hz mel frames)
CHUNK_LENGTH_S = 30                          # whisper.py CHUNK_LENGTH; segment length of both tokenizers
N_SAMPLES = CHUNK_LENGTH_S * SAMPLE_RATE_HZ  # 480 000 samples per 30 s segment
N_FRAMES = N_SAMPLES // HOP_LENGTH           # 3000 mel frames per padded segment
# 1280 samples per 12.5 Hz token = hop 160 x conv2 stride 2 x pooling 4 (whisper.py token_len "160 * 8";
# utils.py stride = conv1.stride * conv2.stride * pooling_kernel_size * hop_length).
SAMPLES_PER_TOKEN = 1280

# log-mel post-processing (whisper.py log_mel_spectrogram)
LOG_MEL_CLAMP = 1e-10        # torch.clamp(mel_spec, min=1e-10) before log10
LOG_MEL_DYNAMIC_RANGE = 8.0  # log_spec = max(log_spec, log_spec.max() - 8.0)
LOG_MEL_OFFSET = 4.0         # (log_spec + 4.0) / 4.0
LOG_MEL_SCALE = 4.0

# Slaney mel scale (librosa.hz_to_mel with htk=False): linear below 1 kHz, logarithmic above.
_SLANEY_F_SP_HZ = 200.0 / 3.0        # Hz per mel in the linear region
_SLANEY_MIN_LOG_HZ = 1000.0          # start of the log region
_SLANEY_LOGSTEP = math.log(6.4) / 27.0


class AudioFileError(ValueError):
    """An audio file cannot be read or holds no samples. The message names the path."""


# ---- file I/O and resampling --------------------------------------------------------------------------------------
def load_audio(path: Union[str, Path]) -> Tuple[np.ndarray, int]:
    """Reads an audio file with soundfile and mixes it down to mono (channel mean, like ``librosa.load``).

    Returns ``(samples [S] float32, sample_rate_hz)`` at the file's own rate. Raises ``AudioFileError`` naming the
    path if the file is missing, unreadable, or has no samples.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"{path}: audio file not found")
    return read_audio(str(path), str(path))


def read_audio(source: Union[str, BinaryIO], what: str) -> Tuple[np.ndarray, int]:
    """``load_audio`` on a path or an open binary file (an upload in memory: ``io.BytesIO``); the header says the
    format. Errors are ``AudioFileError`` starting with ``what``."""
    import soundfile as sf  # local: soundfile needs libsndfile, only file input needs it

    try:
        data, sr = sf.read(source, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises its own error types (LibsndfileError, RuntimeError, TypeError)
        raise AudioFileError(f"{what}: cannot read audio ({type(e).__name__}: {e})") from e
    if data.shape[0] == 0:
        raise AudioFileError(f"{what}: audio file holds no samples")
    try:
        check_sample_rate(int(sr))
        mono = to_mono(data)
    except ValueError as e:
        raise AudioFileError(f"{what}: {e}") from None
    if isinstance(source, str):  # an upload in memory has no header log to read again
        _warn_if_truncated(Path(source), sf, data.shape[0], int(sr))
    return mono, int(sr)


# libsndfile's header log: "data : 32000 (should be 15978)" when a WAV's data chunk (AIFF: SSND) declares more bytes
# than the file holds. 0xFFFFFFFF is what streaming writers put there when they do not know the length.
_DECLARED_VS_HELD = re.compile(r"^\s*(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_UNKNOWN_LENGTH = 0xFFFFFFFF


def _warn_if_truncated(path: Path, sf, frames: int, sample_rate_hz: int) -> None:
    try:
        header_log = sf.info(str(path)).extra_info
    except Exception:  # the samples were read; a header log we cannot get is no reason to fail
        return
    for m in _DECLARED_VS_HELD.finditer(header_log):
        declared, held = int(m.group(2)), int(m.group(3))
        if held < declared != _UNKNOWN_LENGTH:
            log.warning("%s: truncated: its header declares %d bytes of audio but the file holds %d; read the %.2f s "
                        "that are there", path, declared, held, frames / sample_rate_hz)
            return


# Input rates accepted: telephone-band speech up to studio rates. Outside this, a header is more likely wrong
# than the audio, and a resampling filter for such a ratio would be sized by the header.
MIN_INPUT_RATE_HZ, MAX_INPUT_RATE_HZ = 4_000, 768_000
# Largest polyphase factor used: rates whose exact ratio to 16 kHz needs more (e.g. 700 001 Hz -> 16000/700001, a
# 14-million-tap filter) are resampled at the nearest ratio with a denominator <= this (< 2 ppm off in rate).
MAX_RESAMPLE_FACTOR = 1024


def check_sample_rate(sample_rate_hz: int) -> None:
    """Raises ValueError with the reason if ``sample_rate_hz`` is outside the accepted input range."""
    if not MIN_INPUT_RATE_HZ <= int(sample_rate_hz) <= MAX_INPUT_RATE_HZ:
        raise ValueError(f"sample rate {sample_rate_hz} Hz is outside {MIN_INPUT_RATE_HZ}..{MAX_INPUT_RATE_HZ} Hz "
                         "(resampled to 16 kHz inside that range; is the file's header right?)")


SILENCE_PEAK_DBFS = -70.0  # below this peak level a clip holds no speech to answer


def check_audible(samples: np.ndarray, what: str = "input") -> None:
    """Raises AudioFileError if ``samples`` breaks the array rules of this module's docstring, is empty, holds
    NaN/inf, or is silent (peak < SILENCE_PEAK_DBFS)."""
    try:
        x = check_layout(samples)
    except ValueError as e:
        raise AudioFileError(f"{what}: {e}") from None
    if x.size == 0:
        raise AudioFileError(f"{what}: no samples")
    if not np.isfinite(x).all():
        raise AudioFileError(f"{what}: holds NaN or infinite samples")
    peak = float(np.max(np.abs(x)))
    peak_db = 20.0 * math.log10(peak) if peak > 0 else float("-inf")
    if peak_db < SILENCE_PEAK_DBFS:
        raise AudioFileError(f"{what}: silent (peak {peak_db:.1f} dBFS < {SILENCE_PEAK_DBFS:.0f} dBFS): nothing to answer")


MAX_CHANNELS = 64  # more than any microphone array or surround file this runtime will meet; [C, S] arrays exceed it


def pcm_to_float32(samples: np.ndarray) -> np.ndarray:
    """Integer PCM -> float32 with full scale 1.0: int16 / 32768, int32 / 2**31, uint8 (x - 128) / 128 (floats pass
    unchanged). ValueError for other types."""
    x = np.asarray(samples)
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    scale = {np.dtype(np.int16): (0, 32768.0), np.dtype(np.int32): (0, 2.0 ** 31), np.dtype(np.uint8): (128, 128.0)}
    if x.dtype not in scale:
        raise ValueError(f"samples of type {x.dtype}: expected float, int16, int32 or uint8 PCM")
    offset, full = scale[x.dtype]
    return ((x.astype(np.float64) - offset) / full).astype(np.float32)


def check_layout(samples: np.ndarray) -> np.ndarray:
    """``samples`` as an array if it follows the rules of this module's docstring (floating point; [S] or [S, C]
    with 1..MAX_CHANNELS channels last); ValueError with the rule otherwise."""
    x = np.asarray(samples)
    if x.dtype.kind != "f":
        hint = " (integer PCM: convert it with frontend.pcm_to_float32)" if x.dtype.kind in "iub" else ""
        raise ValueError(f"samples of type {x.dtype}: expected floating point audio with full scale 1.0{hint}")
    if x.ndim not in (1, 2):
        raise ValueError(f"samples: expected shape [S] or [S, C], got {x.shape}")
    if x.ndim == 2 and not 1 <= x.shape[1] <= MAX_CHANNELS:
        raise ValueError(f"samples of shape {x.shape}: expected [S, C] (frames x channels) with 1..{MAX_CHANNELS} "
                         "channels on the last axis" + ("; channels-first audio: pass samples.T" if x.shape[0] <=
                                                       MAX_CHANNELS < x.shape[1] else ""))
    return x


def to_mono(samples: np.ndarray) -> np.ndarray:
    """[S] or [S, C] (frames x channels, the soundfile/sounddevice layout) -> [S] float32 channel mean. ValueError
    for arrays outside the rules of this module's docstring (integer PCM, channels first)."""
    x = check_layout(samples)
    if x.ndim == 1:
        return x.astype(np.float32, copy=False)
    return x.mean(axis=1, dtype=np.float64).astype(np.float32)


def to_16k_mono(samples: np.ndarray, sample_rate_hz: int) -> np.ndarray:
    """[S] or [S, C] audio at ``sample_rate_hz`` -> [S'] float32 mono at 16 kHz (polyphase resampling,
    ``scipy.signal.resample_poly`` with the reduced ratio 16000 / sample_rate_hz, its factors capped at
    MAX_RESAMPLE_FACTOR). ValueError for a rate outside MIN_INPUT_RATE_HZ..MAX_INPUT_RATE_HZ."""
    check_sample_rate(sample_rate_hz)
    mono = to_mono(samples)
    if int(sample_rate_hz) == SAMPLE_RATE_HZ:
        return mono
    from scipy.signal import resample_poly

    ratio = Fraction(SAMPLE_RATE_HZ, int(sample_rate_hz)).limit_denominator(MAX_RESAMPLE_FACTOR)
    out = resample_poly(mono.astype(np.float64), ratio.numerator, ratio.denominator)
    return out.astype(np.float32)


# ---- mel filter bank ----------------------------------------------------------------------------------------------
def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _SLANEY_F_SP_HZ
    min_log_mel = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP_HZ
    log_region = hz >= _SLANEY_MIN_LOG_HZ
    mel = np.where(log_region, min_log_mel + np.log(np.maximum(hz, _SLANEY_MIN_LOG_HZ) / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOGSTEP,
                   mel)
    return mel


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    min_log_mel = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP_HZ
    hz = _SLANEY_F_SP_HZ * mel
    return np.where(mel >= min_log_mel, _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOGSTEP * (mel - min_log_mel)), hz)


def mel_filter_bank(n_mels: int, n_fft: int = N_FFT, sample_rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular mel filters from 0 Hz to Nyquist (``librosa.filters.mel`` defaults,
    which produced Whisper's ``mel_filters.npz``). Returns ``[n_mels, n_fft // 2 + 1]`` float32."""
    if n_mels <= 0 or n_fft <= 0 or sample_rate_hz <= 0:
        raise ValueError(f"mel_filter_bank: expected positive n_mels, n_fft, sample_rate_hz, got "
                         f"{n_mels}, {n_fft}, {sample_rate_hz}")
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate_hz)
    mel_edges = np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(sample_rate_hz / 2.0), n_mels + 2)
    hz_edges = _mel_to_hz_slaney(mel_edges)
    widths = np.diff(hz_edges)
    ramps = hz_edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_edges[2:] - hz_edges[:-2]))[:, None]  # Slaney area normalisation
    return weights.astype(np.float32)


_FILTER_CACHE: dict = {}


def _cached_filters(n_mels: int, n_fft: int, sample_rate_hz: int) -> np.ndarray:
    key = (n_mels, n_fft, sample_rate_hz)
    if key not in _FILTER_CACHE:
        filters = mel_filter_bank(n_mels, n_fft, sample_rate_hz)
        filters.setflags(write=False)
        _FILTER_CACHE[key] = filters
    return _FILTER_CACHE[key]


# ---- log-mel ------------------------------------------------------------------------------------------------------
def log_mel(
    samples_16k: np.ndarray,
    n_mels: int,
    *,
    n_fft: int = N_FFT,
    hop_length: int = HOP_LENGTH,
    filters: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Whisper log-mel spectrogram of 16 kHz mono audio [S] -> ``[n_mels, S // hop_length]`` float32 at 100 Hz.

    Periodic Hann window of ``n_fft``, reflect padding of ``n_fft // 2`` on both sides (``torch.stft(center=True)``),
    real FFT, last frame dropped, power spectrum, mel projection, ``log10(max(x, 1e-10))``, floor at
    ``max - 8``, then ``(x + 4) / 4``. The maximum is taken over the whole input (pad first, as the official code
    does). ``filters`` ([n_mels, n_fft // 2 + 1]) defaults to ``mel_filter_bank(n_mels, n_fft, 16000)``.
    """
    x = np.asarray(samples_16k)
    if x.ndim != 1:
        raise ValueError(f"samples_16k: expected shape [S], got {x.shape}")
    pad = n_fft // 2
    if x.shape[0] <= pad:
        raise ValueError(f"samples_16k: expected more than {pad} samples (reflect padding), got {x.shape[0]}")
    if filters is None:
        filters = _cached_filters(n_mels, n_fft, SAMPLE_RATE_HZ)
    if filters.shape != (n_mels, n_fft // 2 + 1):
        raise ValueError(f"filters: expected shape {(n_mels, n_fft // 2 + 1)}, got {filters.shape}")
    padded = np.pad(x.astype(np.float64), (pad, pad), mode="reflect")
    n_frames = 1 + (padded.shape[0] - n_fft) // hop_length
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length][:n_frames]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann (torch.hann_window)
    spectrum = np.fft.rfft(frames[:-1] * window, axis=-1)               # drop the last frame (stft[..., :-1])
    power = spectrum.real ** 2 + spectrum.imag ** 2                      # [frames, n_fft // 2 + 1]
    mel = filters.astype(np.float64) @ power.T                           # [n_mels, frames]
    log_spec = np.log10(np.maximum(mel, LOG_MEL_CLAMP))
    log_spec = np.maximum(log_spec, log_spec.max() - LOG_MEL_DYNAMIC_RANGE)
    return ((log_spec + LOG_MEL_OFFSET) / LOG_MEL_SCALE).astype(np.float32)


# ---- segmentation, padding, token counts --------------------------------------------------------------------------
def pad_or_trim(samples: np.ndarray, length: int = N_SAMPLES) -> np.ndarray:
    """[S] -> [length]: right zero padding or truncation (whisper.py ``pad_or_trim``)."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"samples: expected shape [S], got {x.shape}")
    if x.shape[0] >= length:
        return x[:length]
    return np.pad(x, (0, length - x.shape[0]))


def segment_30s(samples: np.ndarray, segment_samples: int = N_SAMPLES) -> List[np.ndarray]:
    """Splits [S] into consecutive pieces of at most 30 s (views, the last one shorter), exactly like
    ``audio[t * 16000:(t + 30) * 16000]`` for t = 0, 30, 60, ... while ``t * 16000 < S``. Empty input -> []."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"samples: expected shape [S], got {x.shape}")
    return [x[start:start + segment_samples] for start in range(0, x.shape[0], segment_samples)]


def tokens_for_samples(n_samples: int) -> int:
    """12.5 Hz token count of one segment of ``n_samples`` 16 kHz samples: ``(n - 1) // 1280 + 1`` = ceil(n / 1280)."""
    n = int(n_samples)
    if n < 0:
        raise ValueError(f"n_samples: expected >= 0, got {n}")
    return (n - 1) // SAMPLES_PER_TOKEN + 1


def pad_batch_longest(
    segments: Sequence[np.ndarray], pad_to_multiple_of: int, padding_value: float = 0.0
) -> Tuple[np.ndarray, np.ndarray]:
    """Right-pads 1-D segments to the longest one, rounded up to a multiple of ``pad_to_multiple_of`` samples
    (``SequenceFeatureExtractor.pad(padding="longest", pad_to_multiple_of=...)``).

    Returns ``(padded [B, S] float32, sample_mask [B, S] int32)`` with 1 on real samples, 0 on padding.
    """
    if not segments:
        raise ValueError("segments: expected at least one segment, got none")
    if pad_to_multiple_of <= 0:
        raise ValueError(f"pad_to_multiple_of: expected > 0, got {pad_to_multiple_of}")
    longest = max(int(np.asarray(s).shape[0]) for s in segments)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    padded = np.full((len(segments), length), padding_value, dtype=np.float32)
    mask = np.zeros((len(segments), length), dtype=np.int32)
    for i, seg in enumerate(segments):
        seg = np.asarray(seg, dtype=np.float32)
        if seg.ndim != 1:
            raise ValueError(f"segments[{i}]: expected shape [S], got {seg.shape}")
        padded[i, :seg.shape[0]] = seg
        mask[i, :seg.shape[0]] = 1
    return padded, mask
