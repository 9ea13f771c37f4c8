"""Behaviour of the C++ SPSC rings: stream integrity, blocking/timeout/close, overflow policies and their
counters, and the buffer-protocol contract."""
from __future__ import annotations

import array
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimia_edge.runtime.rings import AudioRing, RingClosedError, RingFullError, TokenRing


# ---- stream integrity ---------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 64),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 100)), max_size=60),
)
def test_any_interleaving_returns_exactly_the_written_stream(capacity: int, ops: list) -> None:
    ring = TokenRing(capacity, "block")
    written, read = [], []
    next_value = 0
    for is_write, size in ops:
        if is_write:
            data = np.arange(next_value, next_value + size, dtype=np.int32)
            n = ring.write_nowait(data)
            assert n == min(size, capacity - len(written) + len(read))
            written.extend(data[:n].tolist())
            next_value += n
        else:
            out = np.full(size, -1, dtype=np.int32)
            n = ring.read_into_nowait(out)
            read.extend(out[:n].tolist())
            assert (out[n:] == -1).all()  # nothing beyond what was read is touched without pad_silence
    read.extend(ring.read_nowait(capacity).tolist())
    assert read == written


@pytest.mark.parametrize("policy", ["block", "drop_oldest"])
def test_two_threads_move_1e8_samples_in_order(policy: str) -> None:
    """Producer and consumer threads move >= 10^8 int32 samples; the reader checks the exact sequence.

    With drop_oldest the reader may lose samples but must never see one twice, out of order, or torn."""
    total = 100_000_000
    ring = TokenRing(1 << 16, policy)
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 8192, size=4096)
    errors: list = []

    def produce() -> None:
        pos, i = 0, 0
        while pos < total:
            n = min(int(sizes[i % len(sizes)]), total - pos)
            ring.write(np.arange(pos, pos + n, dtype=np.int32))
            pos += n
            i += 1
        ring.close()

    received = 0
    last = -1
    out = np.empty(6000, dtype=np.int32)
    producer = threading.Thread(target=produce)
    producer.start()
    while True:
        n = ring.read_into(out, timeout=10.0)
        if n == 0:
            break
        chunk = out[:n]
        if policy == "block":
            if chunk[0] != last + 1 or not np.array_equal(chunk, np.arange(last + 1, last + 1 + n, dtype=np.int32)):
                errors.append(f"sequence broken after {last}")
                break
        else:
            # strictly increasing, contiguous runs; gaps only where samples were dropped
            if chunk[0] <= last or (n > 1 and not (np.diff(chunk) >= 1).all()):
                errors.append(f"order broken after {last}")
                break
        last = int(chunk[-1])
        received += n
    producer.join()
    stats = ring.stats()
    assert not errors, errors[0]
    assert last == total - 1
    assert stats["total_written"] == total
    assert stats["total_read"] == received
    if policy == "block":
        assert received == total and stats["dropped"] == 0
    else:
        assert received + stats["dropped"] == total


def test_float_samples_round_trip_bit_exactly() -> None:
    ring = AudioRing(16)
    bits = np.array([0x7FC00001, 0xFF800000, 0x00000001, 0x80000000, 0x3F800000], dtype=np.uint32)
    ring.write(bits.view(np.float32))
    assert np.array_equal(ring.read(5).view(np.uint32), bits)  # NaN payload, -inf, denormal, -0.0 survive


# ---- blocking, timeouts, close ---------------------------------------------------------------------------

def test_blocking_read_times_out_and_counts_an_underrun() -> None:
    ring = AudioRing(8)
    ring.write(np.ones(3, dtype=np.float32))
    t0 = time.monotonic()
    got = ring.read(5, timeout=0.05)
    assert len(got) == 3 and time.monotonic() - t0 >= 0.04
    assert ring.stats()["underruns"] == 1


def test_blocking_write_times_out_with_partial_count_and_an_overrun() -> None:
    ring = AudioRing(4, "block")
    assert ring.write(np.ones(6, dtype=np.float32), timeout=0.05) == 4
    assert ring.stats()["overruns"] == 1
    assert ring.available == 4 and ring.free == 0


def test_blocked_writer_resumes_when_reader_frees_space() -> None:
    ring = TokenRing(4, "block")
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("n", ring.write(np.arange(10, dtype=np.int32), timeout=5)))
    t.start()
    got = []
    while len(got) < 10:
        got.extend(ring.read(2, timeout=5).tolist())
    t.join(5)
    assert result["n"] == 10 and got == list(range(10))


def test_close_wakes_a_waiting_reader_which_then_sees_end_of_stream() -> None:
    ring = AudioRing(8)
    ring.write(np.full(2, 7, dtype=np.float32))
    result = {}

    def reader() -> None:
        result["first"] = ring.read(10)  # waits: only 2 of 10 there
        result["after"] = ring.read(10)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.05)
    assert t.is_alive()
    ring.close()
    t.join(2)
    assert not t.is_alive()
    assert result["first"].tolist() == [7, 7] and len(result["after"]) == 0
    assert ring.stats()["underruns"] == 0  # end of stream is not an underrun


def test_close_wakes_a_blocked_writer_with_an_error() -> None:
    ring = AudioRing(2, "block")
    ring.write(np.zeros(2, dtype=np.float32))
    err = {}

    def writer() -> None:
        try:
            ring.write(np.zeros(4, dtype=np.float32))
        except RingClosedError as e:
            err["e"] = e

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.05)
    ring.close()
    t.join(2)
    assert isinstance(err.get("e"), RingClosedError)
    with pytest.raises(RingClosedError):
        ring.write_nowait(np.zeros(1, dtype=np.float32))


def test_read_into_nowait_pads_silence_and_counts_underrun() -> None:
    ring = AudioRing(1024)
    ring.write(np.full(100, 0.5, dtype=np.float32))
    out = np.full(480, 9.0, dtype=np.float32)
    assert ring.read_into_nowait(out, pad_silence=True) == 100
    assert (out[:100] == 0.5).all() and (out[100:] == 0).all()
    assert ring.stats()["underruns"] == 1


def test_clear_discards_and_frees_space() -> None:
    ring = TokenRing(8)
    ring.write(np.arange(8, dtype=np.int32))
    ring.clear()
    assert ring.available == 0 and ring.free == 8
    ring.write(np.array([42], dtype=np.int32))
    assert ring.read(1).tolist() == [42]


# ---- overflow policies -------------------------------------------------------------------------------

def test_drop_oldest_keeps_the_newest_and_counts_drops() -> None:
    ring = TokenRing(5, "drop_oldest")
    ring.write(np.arange(3, dtype=np.int32))
    ring.write(np.arange(3, 7, dtype=np.int32))  # 7 written into 5 slots: 0 and 1 are lost
    stats = ring.stats()
    assert stats["dropped"] == 2 and stats["overruns"] == 1 and stats["high_water"] == 5
    assert ring.read(5).tolist() == [2, 3, 4, 5, 6]
    assert ring.stats()["dropped"] == 2  # counted once, whether before or after the reader noticed


def test_drop_oldest_with_a_block_larger_than_capacity_keeps_its_tail() -> None:
    ring = TokenRing(4, "drop_oldest")
    assert ring.write(np.arange(10, dtype=np.int32)) == 10
    assert ring.read_nowait(10).tolist() == [6, 7, 8, 9]
    assert ring.stats()["dropped"] == 6


def test_raise_policy_is_all_or_nothing() -> None:
    ring = AudioRing(4, "raise")
    ring.write(np.ones(3, dtype=np.float32))
    with pytest.raises(RingFullError, match="do not fit"):
        ring.write(np.ones(2, dtype=np.float32))
    assert ring.available == 3  # nothing of the refused block went in
    assert ring.stats()["overruns"] == 1


def test_counters_add_up() -> None:
    ring = AudioRing(10)
    ring.write(np.ones(7, dtype=np.float32))
    ring.read(4)
    ring.write(np.ones(5, dtype=np.float32))
    s = ring.stats()
    assert (s["total_written"], s["total_read"], s["high_water"]) == (12, 4, 8)
    assert s["total_written"] - s["total_read"] == ring.available


# ---- buffer-protocol contract -------------------------------------------------------------------------

def test_any_c_contiguous_buffer_of_the_right_dtype_is_taken_without_copy() -> None:
    ring = AudioRing(16)
    ring.write(array.array("f", [1.0, 2.0]))
    ring.write(memoryview(np.array([3.0], dtype=np.float32)))
    ring.write(np.array([4.0], dtype="<f4"))
    out = np.zeros(8, dtype=np.float32)
    view = out[2:6]  # a contiguous slice is written in place
    assert ring.read_into(view, timeout=0) == 4
    assert out.tolist() == [0, 0, 1, 2, 3, 4, 0, 0]


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (np.zeros(4, dtype=np.float64), TypeError, "float32"),
        (np.zeros(4, dtype=np.int32), TypeError, "float32"),
        (np.zeros(4, dtype=">f4"), TypeError, "float32"),
        (np.zeros((2, 2), dtype=np.float32), ValueError, "1-D"),
        (np.zeros(8, dtype=np.float32)[::2], ValueError, "contiguous"),
        ([1.0, 2.0], TypeError, "incompatible function arguments"),
    ],
)
def test_wrong_buffers_raise_clear_errors(bad, error, message) -> None:
    ring = AudioRing(16)
    with pytest.raises(error, match=message):
        ring.write(bad)
    assert ring.available == 0


def test_read_into_refuses_read_only_and_wrong_dtype_outputs() -> None:
    ring = TokenRing(4)
    ro = np.zeros(4, dtype=np.int32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        ring.read_into_nowait(ro)
    with pytest.raises(TypeError, match="int32"):
        ring.read_into_nowait(np.zeros(4, dtype=np.int64))


def test_bad_construction_arguments() -> None:
    with pytest.raises(ValueError, match="policy"):
        AudioRing(8, "overwrite")
    with pytest.raises(ValueError, match="capacity"):
        AudioRing(0)
    with pytest.raises(ValueError, match="timeout"):
        AudioRing(8).read(1, timeout=-1)


def test_wait_readable_waits_without_reading_or_counting() -> None:
    ring = AudioRing(16)
    assert ring.wait_readable(1, timeout=0.02) is False
    t = threading.Timer(0.05, lambda: ring.write(np.ones(3, dtype=np.float32)))
    t.start()
    assert ring.wait_readable(3, timeout=2.0) is True
    t.join()
    assert ring.available == 3 and ring.stats()["underruns"] == 0
    ring.close()
    assert ring.wait_readable(5, timeout=None) is False  # closed and short: returns at once


@pytest.mark.parametrize("timeout", [float("inf"), 9.3e9, 1e300])
def test_an_infinite_or_huge_timeout_waits_instead_of_returning_at_once(timeout: float) -> None:
    ring = AudioRing(8, "block")
    threading.Timer(0.2, lambda: ring.write(np.ones(4, np.float32))).start()
    start = time.monotonic()
    got = ring.read(4, timeout=timeout)  # used to return at once with an underrun: the deadline overflowed
    assert got.tolist() == [1.0] * 4 and time.monotonic() - start >= 0.15
    assert ring.stats()["underruns"] == 0
    ring.write(np.ones(8, np.float32))
    threading.Timer(0.2, lambda: ring.read(4)).start()
    assert ring.write(np.ones(4, np.float32), timeout=timeout) == 4  # a full ring waits for room, then writes


def test_a_nan_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        AudioRing(8).read(1, timeout=float("nan"))


def test_a_second_producer_or_consumer_at_the_same_time_is_refused() -> None:
    ring = AudioRing(8, "block")
    wrote = []
    first = threading.Thread(target=lambda: wrote.append(ring.write(np.ones(16, np.float32))))  # waits for room
    first.start()
    assert _eventually(lambda: ring.available == 8)
    with pytest.raises(RuntimeError, match="two threads used the producer side"):
        ring.write(np.full(4, 2.0, np.float32))  # would have written over the same slots
    assert ring.read(8).tolist() == [1.0] * 8
    first.join(10)
    assert wrote == [16] and ring.read(8).tolist() == [1.0] * 8
    got = []
    waiting = threading.Thread(target=lambda: got.append(ring.read(4, timeout=10)))  # waits for data
    waiting.start()
    time.sleep(0.1)
    with pytest.raises(RuntimeError, match="two threads used the consumer side"):
        ring.read_into_nowait(np.empty(4, np.float32))
    ring.write(np.ones(4, np.float32))  # one side at a time stays allowed, from any thread
    waiting.join(10)
    assert got[0].tolist() == [1.0] * 4


def _eventually(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()
