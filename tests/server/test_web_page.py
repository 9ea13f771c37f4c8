"""The page at / in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) with a fake microphone
playing a real spoken clip: the answer's transcript appears and its audio is played through the page's worklet."""
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


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (.ci/run installs Debian's "
                                                  "chromium package)")
def test_page_transcribes_and_plays(serve, shared_audio: Path, tmp_path: Path) -> None:
    base = serve()
    wav = fake_mic_wav(shared_audio, tmp_path / "mic.wav")
    args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--headless=new", "--no-sandbox", "--disable-gpu",
            "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--autoplay-policy=no-user-gesture-required"]
    with sync_api.sync_playwright() as p:
        # a fresh profile (Playwright takes it as user_data_dir, not as --user-data-dir)
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=str(CHROMIUM),
                                                       args=args)
        try:
            page = browser.new_page()
            errors: list = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            page.fill("#maxTokens", "40")
            page.click("#start")
            page.wait_for_function("window.kimia.responses.length >= 1 && window.kimia.playedSamples > 0",
                                   timeout=90_000)
            state = page.evaluate("window.kimia")
            assert not errors and not state["errors"], (errors, state["errors"])
            assert state["playedSamples"] > 0 and state["receivedSamples"] > 0
            assert state["transcript"] and page.inner_text("#log").count("kimi: ") >= 1
            assert "you: (speech)" in page.inner_text("#log")
            assert state["responses"][0]["metrics"]["llm_steps"] > 0
        finally:
            browser.close()
