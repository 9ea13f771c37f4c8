"""The scoring of bench/vad.py on synthetic events (not timings): onset / offset errors per true region, misses and
false triggers in pure background."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(bench_module):
    return bench_module("vad")


def test_errors_misses_and_false_triggers(bench) -> None:
    regions = [(16_000, 32_000), (80_000, 96_000), (150_000, 160_000)]
    events = [("speech_started", 4_000),                                    # 0.75 s before region 0: false
              ("speech_stopped", 6_000),
              ("speech_started", 16_160), ("speech_stopped", 24_000),        # region 0 split by a pause:
              ("speech_started", 24_800), ("speech_stopped", 32_320),        # first start, last stop count
              ("speech_started", 79_840), ("speech_stopped", 96_000),        # region 1: 10 ms early
              ("speech_started", 120_000), ("speech_stopped", 125_000)]      # between 1 and 2: false
    s = bench.score(events, regions)
    assert s.onset_errors == [160, -160, None] and s.offset_errors == [320, 0, None]
    assert s.missed == 1 and s.false_triggers == 2
    assert s.stats_ms("onset") == (10.0, 10.0) and s.stats_ms("offset") == (10.0, 20.0)


def test_signals_put_speech_where_the_regions_say_at_the_stated_snr(bench) -> None:
    rate = bench.RATE
    t = np.arange(rate) / rate
    clip = np.concatenate([np.zeros(rate // 2), 0.1 * np.sin(2 * np.pi * 200 * t), np.zeros(rate // 2)]).astype(np.float32)
    assert bench.speech_region(clip) == (rate // 2, rate // 2 + rate)
    clean, regions = bench.build_signal([clip, clip], None, None, seed=0)
    assert [b - a for a, b in regions] == [rate] * 3 and np.all(clean[: 3 * rate] == 0)
    noisy, _ = bench.build_signal([clip, clip], "pink", 10.0, seed=0)
    noise = noisy - clean
    speech = np.concatenate([clean[a:b] for a, b in regions])
    assert 10 * np.log10(np.mean(speech ** 2) / np.mean(noise ** 2)) == pytest.approx(10.0, abs=0.01)
    again, _ = bench.build_signal([clip, clip], "pink", 10.0, seed=0)
    np.testing.assert_array_equal(noisy, again)  # seeded
