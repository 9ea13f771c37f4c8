"""The page at / in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) with a fake microphone
playing a real spoken clip: the answer's transcript appears and its audio is played through the page's worklet, and
both barge-ins work in the browser: the Stop button, then speaking over an answer (the looping fake microphone says
the clip again while the answer still plays); each time the server cuts the answer to what the page played."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from kimia_edge.runtime.frontend import load_audio, to_16k_mono

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra (playwright) is not installed")


def fake_mic_wav(shared_audio: Path, out: Path) -> Path:
    """16-bit PCM mono 16 kHz (what Chromium's fake capture reads): the clip, then 10 s of silence (the file loops;
    the silence leaves the answer time to play before the clip is heard again and barges in)."""
    x, rate = load_audio(shared_audio / "qa_example.wav")
    x = np.concatenate([to_16k_mono(x, rate), np.zeros(160_000, np.float32)])
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return out


def launch(p, wav: Path, profile: Path):
    """Chromium with a fake microphone that loops ``wav`` and a fresh profile (Playwright takes it as user_data_dir,
    not as --user-data-dir)."""
    args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--headless=new", "--no-sandbox", "--disable-gpu",
            "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--autoplay-policy=no-user-gesture-required"]
    return p.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), args=args)


NEEDS_CHROMIUM = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (.ci/run "
                                                                  "installs Debian's chromium package)")


@NEEDS_CHROMIUM
def test_page_transcribes_plays_and_is_interrupted(serve, shared_audio: Path, tmp_path: Path) -> None:
    base = serve()
    wav = fake_mic_wav(shared_audio, tmp_path / "mic.wav")
    with sync_api.sync_playwright() as p:
        browser = launch(p, wav, tmp_path / "profile")
        try:
            page = browser.new_page()
            errors: list = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            page.fill("#maxTokens", "400")  # 32 s of speech: still playing when the clip comes round again
            page.click("#start")
            page.wait_for_function("window.kimia.playedSamples > 0", timeout=90_000)
            assert page.evaluate("window.kimia.transcript")  # the answer's text arrives with its audio

            page.click("#stop")  # barge-in by button: playback stops, the server keeps what was played
            page.wait_for_function("window.kimia.truncated.length >= 1", timeout=30_000)
            cut = page.evaluate("window.kimia.truncated[0]")
            assert 0 < cut["audio_end_ms"] < cut["received_ms"]

            # barge-in by voice: the clip is said again while the next answer plays
            page.wait_for_function("window.kimia.truncated.length >= 2", timeout=150_000)
            state = page.evaluate("window.kimia")
            assert not errors and not state["errors"], (errors, state["errors"])
            assert state["truncated"][1]["item"] != cut["item"]
            assert state["truncated"][1]["audio_end_ms"] < state["truncated"][1]["received_ms"]
            assert len(state["responses"]) >= 2 and state["responses"][0]["metrics"]["llm_steps"] > 0
            log = page.inner_text("#log")
            assert log.count("kimi: ") >= 2 and log.count("you: (speech)") >= 2
        finally:
            browser.close()
