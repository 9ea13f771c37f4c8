"""``kimia-edge demo``: the whole path on a built-in default, offline, in about a minute on 2 cores.

Makes a tiny random-weight snapshot in the official layout and exports it to a bundle (both cached, and reused
while the bundle verifies), synthesises a speech-like question (voiced vowels through formant filters: random
weights do not care what is said, but the encoders see speech-like audio), runs one speech conversation on the
torch-free runtime, streams the text, prints the metrics and writes the spoken answer.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from kimia_edge import __version__

DEMO_RATE_HZ = 16_000
# (F1, F2, F3) in Hz of five vowels (classic male averages): a, i, u, e, o
_VOWEL_FORMANTS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410))
_FORMANT_BANDWIDTH_HZ = 90.0
_DEMO_STEPS = 100  # LLM steps: ~94 audio tokens = 7.5 s of speech after the 6-step delay


def default_cache() -> Path:
    from kimia_edge.runtime.bundle import default_cache_dir

    return default_cache_dir() / f"demo-{__version__}"


def speech_like_clip(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """[seconds * 16000] float32: a glottal pulse train (f0 110-140 Hz, gliding) through three formant
    resonators per vowel, vowels of ~0.3 s with short pauses, peak -6 dBFS."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    n = int(seconds * DEMO_RATE_HZ)
    t = np.arange(n) / DEMO_RATE_HZ
    f0 = 125 + 15 * np.sin(2 * np.pi * 0.7 * t) + rng.normal(0, 1.0, n).cumsum() * 0.002
    phase = np.cumsum(f0 / DEMO_RATE_HZ)
    source = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64)  # one pulse per period
    out = np.zeros(n)
    seg = int(0.3 * DEMO_RATE_HZ)
    for i, start in enumerate(range(0, n, seg)):
        chunk = source[start:start + seg].copy()
        chunk[int(len(chunk) * 0.8):] = 0.0  # a short pause between vowels
        y = chunk
        for f in _VOWEL_FORMANTS[i % len(_VOWEL_FORMANTS)]:
            r = np.exp(-np.pi * _FORMANT_BANDWIDTH_HZ / DEMO_RATE_HZ)
            y = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * f / DEMO_RATE_HZ), r * r], y)
        out[start:start + len(y)] = y
    out += rng.normal(0, 1e-3 * np.abs(out).max(), n)
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


def prepare_bundle(cache: Path) -> Path:
    """The cached demo bundle, made (snapshot + export) if missing or if it no longer verifies."""
    from kimia_edge.runtime.bundle import load_bundle
    from kimia_edge.runtime.spec.manifest import BundleError

    bundle = cache / "bundle-tiny"
    try:
        load_bundle(bundle)
        print(f"using the demo bundle in {bundle}", file=sys.stderr)
        return bundle
    except BundleError:
        pass
    import shutil

    from kimia_edge.export.exporter import export_bundle
    from kimia_edge.export.snapshot.make import make_snapshot

    snapshot = cache / "snapshot-tiny"
    if not (snapshot / "config.json").is_file():
        shutil.rmtree(snapshot, ignore_errors=True)
        make_snapshot(snapshot, "tiny", seed=0)
    start = time.perf_counter()
    export_bundle(snapshot, bundle, precisions=("fp32",), llm_precision="f16", llm_quants=("Q8_0",), overwrite=True)
    print(f"exported the demo bundle to {bundle} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return bundle


def run_demo(cache: Optional[Path] = None, output: Path = Path("kimia-edge-demo.wav")) -> int:
    import soundfile as sf

    from kimia_edge.runtime.pipeline import Pipeline
    from kimia_edge.runtime.streaming import AudioEvent, TextEvent
    from kimia_edge.runtime.tasks import generation_config

    logging.getLogger("gguf").setLevel(logging.WARNING)
    start = time.perf_counter()
    bundle = prepare_bundle(cache or default_cache())
    chat = Pipeline.from_bundle(bundle).conversation()
    question = speech_like_clip()
    print("kimia-edge demo: a tiny random-weight Kimi-Audio answers a synthetic question "
          "(random weights: the words are noise, the machinery is real)\nanswer: ", end="", flush=True)
    audio = []
    config = generation_config("chat", seed=0, step_limit=_DEMO_STEPS)
    for event in chat.turn(question, DEMO_RATE_HZ, "chat", config=config, seed=0):
        if isinstance(event, TextEvent):
            print(event.text, end="", flush=True)
        elif isinstance(event, AudioEvent):
            audio.append(event.samples)
    wav = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    rate = chat.pipeline.c.output_sample_rate_hz
    sf.write(str(output), wav, rate, subtype="FLOAT")
    print("\n\n" + chat.last.metrics.table())
    print(f"\nwrote {output} ({wav.size / rate:.2f} s at {rate} Hz); "
          f"demo took {time.perf_counter() - start:.0f} s")
    return 0
