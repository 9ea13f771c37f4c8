"""The rules for audio handed over as arrays or files (runtime/frontend.py docstring): integer PCM is refused with
the conversion to use (pcm_to_float32 scales it as soundfile does), channels are on the last axis and a
channels-first array is refused, and a truncated WAV is read with a warning naming both lengths."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kimia_edge.runtime import frontend as fe


def _tone(n: int = 16_000) -> np.ndarray:
    return (0.25 * np.sin(np.arange(n) * 0.05)).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint8, np.int64, bool])
def test_integer_pcm_is_refused_with_the_conversion_to_use(dtype) -> None:
    pcm = np.ones(1600, dtype=dtype)
    with pytest.raises(ValueError, match=f"samples of type {np.dtype(dtype)}: expected floating point"):
        fe.to_16k_mono(pcm, 16_000)
    with pytest.raises(fe.AudioFileError, match="input: samples of type"):
        fe.check_audible(pcm)  # what every turn checks first


def test_pcm_to_float32_scales_as_soundfile_does(tmp_path: Path) -> None:
    assert fe.pcm_to_float32(np.array([-32768, 16384, 0], np.int16)).tolist() == [-1.0, 0.5, 0.0]
    assert fe.pcm_to_float32(np.array([-2**31, 2**30], np.int32)).tolist() == [-1.0, 0.5]
    assert fe.pcm_to_float32(np.array([0, 128, 192], np.uint8)).tolist() == [-1.0, 0.0, 0.5]
    pcm = (np.random.default_rng(0).integers(-32768, 32767, 4000)).astype(np.int16)
    sf.write(str(tmp_path / "pcm16.wav"), pcm, 16_000, subtype="PCM_16")
    np.testing.assert_array_equal(fe.pcm_to_float32(pcm), fe.load_audio(tmp_path / "pcm16.wav")[0])
    with pytest.raises(ValueError, match="expected float, int16, int32 or uint8"):
        fe.pcm_to_float32(np.zeros(3, np.int64))


def test_channels_go_on_the_last_axis() -> None:
    stereo = np.stack([_tone(), 0.5 * _tone()], axis=1)  # [S, 2]
    np.testing.assert_allclose(fe.to_mono(stereo), 0.75 * _tone(), atol=1e-7)
    with pytest.raises(ValueError, match=r"shape \(2, 16000\): expected \[S, C\].*channels-first audio: pass samples.T"):
        fe.to_16k_mono(stereo.T, 16_000)  # averaging over time instead would give 16 000 "channels" of 2 frames
    with pytest.raises(ValueError, match=r"1\.\.64 channels on the last axis"):
        fe.to_mono(np.zeros((100, 0), np.float32))
    assert fe.to_mono(np.zeros((100, fe.MAX_CHANNELS), np.float32)).shape == (100,)


def test_a_truncated_wav_is_read_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    full = tmp_path / "full.wav"
    sf.write(str(full), _tone(), 16_000, subtype="PCM_16")
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(full.read_bytes()[:16_022])
    with caplog.at_level(logging.WARNING, logger="kimia_edge.runtime.frontend"):
        samples, rate = fe.load_audio(full)
        assert samples.shape == (16_000,) and not caplog.records  # a whole file: no warning
        samples, rate = fe.load_audio(truncated)
    assert samples.shape == (7_989,) and rate == 16_000
    assert [r.getMessage() for r in caplog.records] == [
        f"{truncated}: truncated: its header declares 32000 bytes of audio but the file holds 15978; "
        "read the 0.50 s that are there"]
