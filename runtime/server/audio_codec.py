"""Audio bytes in and out of ``kimia-edge serve``.

In: wav / flac / ogg / mp3 files through soundfile (libsndfile; mp3 needs libsndfile >= 1.1), and raw ``pcm16``
(little-endian int16 mono) taken at 24 kHz, the rate of OpenAI's realtime audio. Out: 16-bit PCM wav or raw
pcm16 at the model's output rate (24 kHz).
"""
from __future__ import annotations

import io
from typing import Optional, Tuple

import numpy as np

from kimia_edge.runtime.frontend import AudioFileError, read_audio

FILE_FORMATS = ("wav", "flac", "ogg", "mp3")  # what soundfile reads from bytes
PCM16_RATE_HZ = 24_000  # raw pcm16 input carries no header: taken at OpenAI's realtime rate
INPUT_FORMATS = FILE_FORMATS + ("pcm16",)
OUTPUT_FORMATS = ("wav", "pcm16")


def decode_audio(data: bytes, fmt: Optional[str], what: str = "audio") -> Tuple[np.ndarray, int]:
    """``(samples [S] float32 mono, sample_rate_hz)`` of ``data`` in ``fmt`` (None or a file format: soundfile
    reads the header; "pcm16": raw int16 LE at 24 kHz). Raises ``AudioFileError`` naming ``what`` and the problem
    (an unknown format, a corrupt or empty file, an odd pcm16 length, a rate outside 4..768 kHz). A file format
    is read from its header, whatever ``fmt`` names."""
    if fmt is not None and fmt not in INPUT_FORMATS:
        raise AudioFileError(f"{what}: unsupported format {fmt!r}; expected one of {list(INPUT_FORMATS)}")
    if not data:
        raise AudioFileError(f"{what}: no audio bytes")
    if fmt == "pcm16":
        if len(data) % 2:
            raise AudioFileError(f"{what}: pcm16 needs an even number of bytes (int16 samples), got {len(data)}")
        return (np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0), PCM16_RATE_HZ
    return read_audio(io.BytesIO(data), what)


def to_pcm16(samples: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] -> little-endian int16 bytes (clipped)."""
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return (np.round(x * 32767.0)).astype("<i2").tobytes()


def encode_audio(samples: np.ndarray, sample_rate_hz: int, fmt: str) -> bytes:
    """``samples`` [S] float32 as ``fmt``: "wav" (16-bit PCM, mono) or "pcm16" (raw int16 LE)."""
    if fmt == "pcm16":
        return to_pcm16(samples)
    if fmt != "wav":
        raise ValueError(f"output format: expected one of {OUTPUT_FORMATS}, got {fmt!r}")
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0), sample_rate_hz, format="WAV",
             subtype="PCM_16")
    return buf.getvalue()
