"""Voice activity detection: the shared onset / offset state machine on synthetic signals, Silero VAD from the
bundle on real speech (in silence and in noise), and how ``open_vad`` chooses between Silero and energy."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kimia_edge.runtime.bundle import read_manifest, verify_bundle
from kimia_edge.runtime.frontend import load_audio, to_16k_mono
from kimia_edge.runtime.spec.graphs import VAD
from kimia_edge.runtime.spec.manifest import BundleError
from kimia_edge.runtime.vad import EnergyVad, SileroVad, VadConfig, VadEvent, open_vad

RATE = 16_000


def _tone(seconds: float, db: float = -20.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (10 ** (db / 20) * np.sqrt(2) * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def _push_in_blocks(vad, signal: np.ndarray, sizes=(1, 7, 160, 333, 512, 4000)) -> list:
    events, i, k = [], 0, 0
    while i < len(signal):
        n = sizes[k % len(sizes)]
        events += vad.push(signal[i:i + n])
        i, k = i + n, k + 1
    return events


@pytest.fixture(scope="module")
def speech(shared_audio: Path) -> np.ndarray:
    return to_16k_mono(*load_audio(shared_audio / "qa_example.wav"))


@pytest.fixture(scope="module")
def silero_path(tiny_bundle: Path) -> Path:
    manifest = read_manifest(tiny_bundle)
    if not any(a.name == VAD for a in manifest.artifacts):
        pytest.skip("this bundle was exported without silero-vad installed: it has no VAD artifact")
    return tiny_bundle / manifest.artifact(VAD).path


def test_config_errors_name_the_field() -> None:
    for kwargs, field in (({"threshold": 1.0}, "threshold"), ({"min_silence_s": -1}, "min_silence_s"),
                          ({"pre_roll_s": 100}, "pre_roll_s"), ({"min_speech_s": "x"}, "min_speech_s")):
        with pytest.raises(ValueError, match=field):
            VadConfig(**kwargs)


def test_energy_onset_offset_and_utterance_with_pre_roll() -> None:
    cfg = VadConfig(pre_roll_s=0.2, min_speech_s=0.1, min_silence_s=0.3)
    signal = np.concatenate([_silence(0.96), _tone(0.9), _silence(1.0)])  # onset at a 30 ms frame boundary
    vad = EnergyVad(cfg)
    events = _push_in_blocks(vad, signal)
    assert events == [VadEvent("speech_started", int(0.96 * RATE)), VadEvent("speech_stopped", int(1.86 * RATE))]
    assert not vad.speaking
    utt = vad.utterance()
    start = int(0.96 * RATE) - int(0.2 * RATE)
    np.testing.assert_array_equal(utt, signal[start:int(1.86 * RATE)])
    # the same signal in one block gives the same events: block length does not matter
    assert EnergyVad(cfg).push(signal) == events


def test_utterance_while_speaking_runs_to_now_and_reset_restarts_the_count() -> None:
    vad = EnergyVad(VadConfig(pre_roll_s=0.0, min_speech_s=0.06))
    assert vad.push(_silence(0.3)) == [] and vad.utterance().size == 0
    events = vad.push(_tone(0.5))
    assert [e.kind for e in events] == ["speech_started"] and vad.speaking
    assert vad.utterance().size == pytest.approx(0.5 * RATE, abs=480)
    vad.reset()
    assert not vad.speaking and vad.utterance().size == 0
    assert vad.push(_tone(0.3))[0].sample == 0  # indices count from the reset


def test_a_click_is_not_speech_and_a_short_pause_does_not_end_it() -> None:
    vad = EnergyVad(VadConfig(min_speech_s=0.25, min_silence_s=0.6))
    assert vad.push(np.concatenate([_tone(0.06, -10), _silence(1.0)])) == []
    events = vad.push(np.concatenate([_tone(0.5), _silence(0.3), _tone(0.5), _silence(1.0)]))
    assert [e.kind for e in events] == ["speech_started", "speech_stopped"]  # one utterance across the 0.3 s pause


def test_silero_finds_real_speech_in_silence_and_in_noise(silero_path: Path, speech: np.ndarray) -> None:
    ref = EnergyVad(VadConfig(min_speech_s=0.1)).push(np.concatenate([_silence(1.0), speech, _silence(1.0)]))
    onset = ref[0].sample - RATE  # where the clip's speech begins (clean signal, energy detector)
    rng = np.random.default_rng(0)
    clean = np.concatenate([_silence(1.0), speech, _silence(1.0)])
    noise = rng.standard_normal(len(clean)).astype(np.float32)
    noise *= np.sqrt(np.mean(speech ** 2) / 10 ** (10 / 10)) / noise.std()  # 10 dB SNR over the clip
    for signal in (clean, clean + noise):
        vad = SileroVad(silero_path, VadConfig())
        events = _push_in_blocks(vad, signal)
        assert [e.kind for e in events] == ["speech_started", "speech_stopped"]
        assert abs(events[0].sample - (RATE + onset)) < 0.15 * RATE
        assert events[1].sample < RATE + len(speech) + 0.3 * RATE
    # noise alone: the energy detector fires on it, Silero does not
    loud_noise = (0.05 * rng.standard_normal(3 * RATE)).astype(np.float32)
    assert SileroVad(silero_path).push(loud_noise) == []
    assert [e.kind for e in EnergyVad().push(loud_noise)] == ["speech_started"]


def test_silero_graph_contract_is_checked(silero_path: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(silero_path), providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} == {"input", "state", "sr"}
    assert [o.name for o in session.get_outputs()] == ["output", "stateN"]
    assert isinstance(SileroVad(session), SileroVad)


def test_open_vad_chooses_silero_from_the_bundle_else_energy(tiny_bundle: Path, silero_path: Path,
                                                             tmp_path: Path) -> None:
    assert verify_bundle(tiny_bundle, cache_dir=tmp_path / "cache") == []
    artifact = read_manifest(tiny_bundle).artifact(VAD)
    assert artifact.component == "vad" and artifact.format == "onnx" and artifact.precision == "fp32"
    assert [Path(f.path).name for f in artifact.files] == ["silero_vad.onnx", "LICENSE"]
    assert "MIT" in (tiny_bundle / artifact.files[1].path).read_text() and artifact.extra["package"].startswith("silero-vad==")
    assert isinstance(open_vad(tiny_bundle, cache_dir=tmp_path / "cache"), SileroVad)
    assert isinstance(open_vad(None), EnergyVad)

    without = tmp_path / "no-vad"  # the manifest alone: open_vad reads it and opens nothing else
    without.mkdir()
    raw = json.loads((tiny_bundle / "manifest.json").read_text())
    raw["artifacts"] = [a for a in raw["artifacts"] if a["name"] != VAD]
    (without / "manifest.json").write_text(json.dumps(raw))
    assert isinstance(open_vad(without), EnergyVad)

    altered = tmp_path / "altered"  # a VAD file that does not match its hash is refused, like every artifact
    shutil.copytree(tiny_bundle / "vad", altered / "vad")
    shutil.copyfile(tiny_bundle / "manifest.json", altered / "manifest.json")
    data = bytearray((altered / artifact.path).read_bytes())
    data[-1] ^= 1
    (altered / artifact.path).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        open_vad(altered, cache_dir=tmp_path / "cache")
