"""The statistics of bench/audio_callback.py on synthetic timelines (known answers, no timings), and both players'
callbacks on a scripted stream: same samples delivered, underruns where the stream ran dry."""
from __future__ import annotations

import sys

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(bench_module):
    return bench_module("audio_callback")


def test_percentiles_of_a_known_distribution(bench) -> None:
    durations_ns = np.arange(1, 1001) * 1000  # 1..1000 µs
    p = bench.percentiles_us(durations_ns)
    assert p["p50"] == pytest.approx(500.5) and p["p99"] == pytest.approx(990.01) and p["p99.9"] == pytest.approx(999.001)
    with pytest.raises(ValueError, match="no durations"):
        bench.percentiles_us([])


def test_deadline_misses_count_callbacks_ending_after_one_period(bench) -> None:
    period = bench.PERIOD_NS
    scheduled = [k * period for k in range(6)]
    end = [s + d for s, d in zip(scheduled, [50_000, period, period + 1, 3 * period, 0, 2_000_000])]
    assert bench.deadline_misses(scheduled, end) == 2  # exactly one period late is still in time
    with pytest.raises(ValueError, match="6 scheduled times but 5"):
        bench.deadline_misses(scheduled, end[:5])


def test_underruns_count_only_short_blocks_between_first_audio_and_the_last_sample(bench) -> None:
    b = bench.BLOCK
    #        silence before first audio | audio | dry | audio | dry  | audio, last partial | silence after the end
    got = [0, 0, 0,                      b, b,   0,    b,      100,   b, 60,                  0, 0]
    total = sum(got)
    assert bench.underruns_after_first_audio(got, total) == 2
    assert bench.underruns_after_first_audio([0, 0], 0) == 0  # no audio at all: nothing to run dry
    with pytest.raises(ValueError, match="played but"):
        bench.underruns_after_first_audio(got, total - 1)


def test_timeline_summary_combines_the_counts(bench) -> None:
    period = bench.PERIOD_NS
    tl = bench.Timeline("ring", scheduled_ns=[0, period, 2 * period], start_ns=[1_000, period + 2_000_000, 2 * period],
                        end_ns=[11_000, 2 * period + 5_000, 2 * period + 4_000], got=[bench.BLOCK, 0, bench.BLOCK],
                        total_samples=2 * bench.BLOCK + 10)
    s = tl.summary()
    assert s["callbacks"] == 3 and s["misses"] == 1 and s["underruns"] == 1
    assert s["max_us"] == pytest.approx(8005.0) and s["late_max_ms"] == pytest.approx(2.0)


@pytest.mark.parametrize("design", ["ring", "queue"])
def test_players_deliver_the_stream_and_count_a_dry_ring(bench, design) -> None:
    player = bench.PLAYERS[design]()
    b = bench.BLOCK
    stream = np.arange(2 * b + 100, dtype=np.float32)
    out = np.full((b, 1), -1.0, np.float32)
    played, got = [], []

    def tick() -> None:
        before = player.played()
        player.callback(out, b, None, None)
        got.append(player.played() - before)
        played.append(out[: got[-1], 0].copy())

    tick()                               # nothing yet: silence
    assert np.all(out == 0)
    player.put(stream[:300])             # 300 samples: one block and a 60-sample remainder
    tick()
    tick()                               # ring: 60 samples then silence; queue: the remainder waits for more
    player.put(stream[300:])
    player.end()
    while not player.done():
        tick()
    np.testing.assert_array_equal(np.concatenate(played), stream)
    assert sum(got) == len(stream)
    assert bench.underruns_after_first_audio(got, len(stream)) == 1


def test_switch_interval_is_set_for_the_block_and_restored(bench) -> None:
    before = sys.getswitchinterval()
    with bench.switch_interval(0.002):
        assert sys.getswitchinterval() == pytest.approx(0.002)
    with pytest.raises(KeyError), bench.switch_interval(0.003):
        raise KeyError("restored on error too")
    with bench.switch_interval(None):
        assert sys.getswitchinterval() == before
    assert sys.getswitchinterval() == before
