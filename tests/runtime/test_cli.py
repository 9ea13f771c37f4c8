"""The run-time commands on a real bundle (torch-free), and bad input: each case ends with a one-line reason (exit 2) and
names what was wrong."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kimia_edge.cli import main


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle


def test_chat_writes_speech_and_json(bundle: Path, shared_audio: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "answer.wav"
    code = main(["chat", "--bundle", str(bundle), "--input", str(shared_audio / "qa_example.wav"), "--output", str(out),
                 "--max-steps", "40", "--seed", "1", "--json", "--first-chunk-tokens", "10"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metrics"]["llm_steps"] == 40 and result["metrics"]["first_audio_s"] > 0
    assert sf.info(out).samplerate == 24_000 and sf.info(out).frames == (40 - 6) * 1920


def test_transcribe_many_files_one_bad(bundle: Path, shared_audio: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")  # truncated header
    code = main(["transcribe", "--bundle", str(bundle), str(shared_audio / "asr_example_zh.wav"), str(bad),
                 "--max-steps", "5", "--json"])
    captured = capsys.readouterr()
    assert code == 1  # one file failed, the other was still transcribed
    assert json.loads(captured.out.strip().splitlines()[0])["file"].endswith("asr_example_zh.wav")
    assert "broken.wav: cannot read audio" in captured.err


def _write(path: Path, data: np.ndarray, rate: int = 16_000) -> Path:
    sf.write(str(path), data, rate)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "audio file not found"),
    ("empty", "holds no samples"),
    ("silent", "silent"),
    ("text", "cannot read audio"),
])
def test_bad_audio_is_refused_with_the_reason(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              case: str, message: str) -> None:
    path = {
        "missing": tmp_path / "nope.wav",
        "empty": _write(tmp_path / "empty.wav", np.zeros(0, np.float32)) if case == "empty" else None,
        "silent": _write(tmp_path / "silent.wav", np.zeros(16000, np.float32)) if case == "silent" else None,
        "text": tmp_path / "notes.wav",
    }[case]
    if case == "text":
        path.write_text("this is not audio")
    assert main(["chat", "--bundle", str(bundle), "--input", str(path), "--output", str(tmp_path / "o.wav")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:")


def test_many_channels_at_another_rate_are_mixed_down(bundle: Path, shared_audio: Path, tmp_path: Path) -> None:
    data, rate = sf.read(str(shared_audio / "qa_example.wav"), dtype="float32")
    six = _write(tmp_path / "six.flac", np.stack([data] * 6, axis=1), rate)
    assert main(["chat", "--bundle", str(bundle), "--input", str(six), "--output", str(tmp_path / "o.wav"),
                 "--max-steps", "8", "--task", "qa"]) == 0


def test_altered_or_incomplete_bundle_is_refused(bundle: Path, shared_audio: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "dit_step.fp32.onnx").unlink()
    args = ["chat", "--bundle", str(broken), "--input", str(shared_audio / "qa_example.wav"), "--output", str(tmp_path / "o.wav")]
    assert main(args) == 2
    assert "dit_step.fp32.onnx is missing" in capsys.readouterr().err
    assert main(["chat", "--bundle", str(tmp_path), "--input", "x.wav", "--output", "o.wav"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


def test_unopenable_speaker_is_refused(bundle: Path, shared_audio: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch, sounddevice_module) -> None:
    sd = sounddevice_module
    if sd.query_devices():
        pytest.skip("this machine has a sound device: the no-device error cannot be provoked")
    assert main(["chat", "--bundle", str(bundle), "--input", str(shared_audio / "qa_example.wav"), "--speaker"]) == 2
    assert "cannot open the speaker" in capsys.readouterr().err


def test_a_missing_portaudio_is_one_line_with_the_fix(bundle: Path, shared_audio: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    try:
        import sounddevice  # noqa: F401
        pytest.skip("PortAudio is installed here: its absence cannot be provoked")
    except OSError:
        pass
    assert main(["chat", "--bundle", str(bundle), "--input", str(shared_audio / "qa_example.wav"), "--speaker"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot open the speaker") and "apt-get install libportaudio2" in err


def test_help_selfcheck_and_verify_work(bundle: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "transcribe" in capsys.readouterr().out
    assert main(["selfcheck"]) in (0, 1)  # 1 only where this machine lacks PortAudio; the lines say which
    out = capsys.readouterr().out
    assert "native rings   ok" in out and "onnxruntime    ok" in out and "llama.cpp      ok" in out
    assert main(["bundle", "verify", str(bundle)]) == 0
    assert "ok:" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="torch is installed here: this checks the runtime-only install (CI's second venv)")
@pytest.mark.parametrize("argv", [["export", "--snapshot", "s", "--out", "o"], ["snapshot", "make", "--out", "o"],
                                  ["reference", "run", "--snapshot", "s", "--input", "x.wav"]])
def test_build_verbs_name_the_missing_extra_in_one_line(argv: list, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'kimia-edge[build]'" in err[0] and "torch" in err[0]


@pytest.mark.parametrize("flag, value", [("--max-steps", "-1"), ("--seed", "-3"), ("--first-chunk-tokens", "0"),
                                         ("--threads", "0"), ("--max-steps", "many"), ("--threads", "1000")])
def test_bad_numbers_are_refused_by_the_parser(bundle: Path, flag: str, value: str,
                                               capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main(["transcribe", "--bundle", str(bundle), "x.wav", flag, value])
    assert done.value.code == 2 and flag in capsys.readouterr().err


def test_problems_that_would_lose_the_answer_are_found_before_the_turn(bundle: Path, shared_audio: Path,
                                                                     tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    question = str(shared_audio / "qa_example.wav")
    assert main(["chat", "--bundle", str(bundle), "--input", question]) == 2  # speech with nowhere to go
    assert "give --output FILE.wav and/or --speaker" in capsys.readouterr().err
    assert main(["chat", "--bundle", str(bundle), "--input", question, "--output", str(tmp_path / "no" / "a.wav")]) == 2
    assert "cannot write the answer to" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:  # refused by the parser, bounded by this machine's cores
        main(["chat", "--bundle", str(bundle), "--input", question, "--output", str(tmp_path / "o.wav"),
              "--threads", "100000"])
    assert done.value.code == 2 and "argument --threads: expected 1.." in capsys.readouterr().err


def test_a_gpu_device_on_a_machine_without_one_is_one_line(bundle: Path, shared_audio: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime offers CUDA: the missing-GPU error cannot be provoked")
    assert main(["transcribe", "--bundle", str(bundle), "--device", "cuda", str(shared_audio / "qa_example.wav")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "onnxruntime-gpu" in err[0]


def _has_open_file_under(pid: int, folder: Path) -> bool:
    """Whether process ``pid`` holds a file under ``folder`` open (Linux /proc)."""
    import os

    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fd).startswith(str(folder.resolve())) for fd in fds.iterdir())
    except OSError:  # the process or one of its descriptors went away meanwhile
        return False


@pytest.mark.parametrize("when", ["loading", "mid-turn"])
def test_ctrl_c_exits_130_with_one_line(bundle: Path, shared_audio: Path, tmp_path: Path, when: str) -> None:
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "o.wav"
    proc = subprocess.Popen([sys.executable, "-m", "kimia_edge.cli", "chat", "--bundle", str(bundle), "--input",
                             str(shared_audio / "qa_example.wav"), "--output", str(out), "--max-steps", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if when == "loading":  # once it has a file of the bundle open: a fixed sleep lands in the interpreter's start
        deadline = time.monotonic() + 120       # on a loaded machine, before Python handles SIGINT at all
        while not _has_open_file_under(proc.pid, bundle) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        proc.stdout.read(1)  # the answer has started streaming
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err and err.decode().strip().splitlines()[-1] == "interrupted"
    assert not out.exists()  # no answer file from an interrupted first turn


def test_an_error_raised_from_ctrl_c_counts_as_the_interrupt() -> None:
    from kimia_edge.cli import _caused_by_interrupt

    def import_interrupted() -> None:  # what onnxruntime's extension does when Ctrl-C lands inside its import
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ImportError("initialization failed") from e

    with pytest.raises(ImportError) as caught:
        import_interrupted()
    assert _caused_by_interrupt(caught.value)
    assert not _caused_by_interrupt(ImportError("no module named onnxruntime"))
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("cleanup failed")  # raised while handling it: __context__
    except RuntimeError as e:
        assert _caused_by_interrupt(e)
