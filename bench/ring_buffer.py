"""Ring-buffer throughput and latency, side by side with the Python baselines in one run.

A writer thread and a reader thread move float32 audio in fixed blocks (10 ms at 24 kHz = 240 samples, and
4096 samples). The reader copies every block into its own output buffer, as a sound-device callback does.
Baselines: ``queue.Queue`` of numpy arrays (blocking get/put) and ``collections.deque`` (append/popleft with
a polling reader). Also: the median cost of one ``read_into`` of 480 samples with data present.

    python bench/ring_buffer.py [--seconds-of-audio 600] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import queue
import statistics
import threading
import time
from typing import Callable, Dict, List

import numpy as np

from kimia_edge.runtime.rings import AudioRing
from kimia_edge.runtime.metrics import machine_label

SAMPLE_RATE_HZ = 24_000
BLOCK_10MS = SAMPLE_RATE_HZ // 100
CAPACITY_SAMPLES = SAMPLE_RATE_HZ  # one second of audio in flight, for every method




def run_pair(writer: Callable[[], None], reader: Callable[[], None]) -> float:
    t = threading.Thread(target=writer)
    start = time.perf_counter()
    t.start()
    reader()
    t.join()
    return time.perf_counter() - start


def bench_ring(total: int, block: int) -> float:
    ring = AudioRing(CAPACITY_SAMPLES, "block")
    src = np.random.default_rng(0).standard_normal(block).astype(np.float32)
    out = np.empty(block, dtype=np.float32)
    n_blocks = total // block

    def writer() -> None:
        for _ in range(n_blocks):
            ring.write(src)
        ring.close()

    def reader() -> None:
        while ring.read_into(out) == block:
            pass

    return run_pair(writer, reader)


def bench_queue(total: int, block: int) -> float:
    q: "queue.Queue[np.ndarray | None]" = queue.Queue(maxsize=max(1, CAPACITY_SAMPLES // block))
    src = np.random.default_rng(0).standard_normal(block).astype(np.float32)
    out = np.empty(block, dtype=np.float32)
    n_blocks = total // block

    def writer() -> None:
        for _ in range(n_blocks):
            q.put(src.copy())  # a queue hands over ownership: the producer needs a fresh array per block
        q.put(None)

    def reader() -> None:
        while (item := q.get()) is not None:
            out[:] = item

    return run_pair(writer, reader)


def bench_deque(total: int, block: int) -> float:
    d: "collections.deque[np.ndarray | None]" = collections.deque()
    src = np.random.default_rng(0).standard_normal(block).astype(np.float32)
    out = np.empty(block, dtype=np.float32)
    n_blocks = total // block
    max_blocks = max(1, CAPACITY_SAMPLES // block)

    def writer() -> None:
        for _ in range(n_blocks):
            while len(d) >= max_blocks:  # bounded like the others
                time.sleep(0)
            d.append(src.copy())
        d.append(None)

    def reader() -> None:
        while True:
            try:
                item = d.popleft()
            except IndexError:
                time.sleep(0)
                continue
            if item is None:
                return
            out[:] = item

    return run_pair(writer, reader)


def median_read_into_us(n: int = 480, repeats: int = 20_000) -> Dict[str, float]:
    ring = AudioRing(CAPACITY_SAMPLES, "block")
    block = np.ones(n, dtype=np.float32)
    out = np.empty(n, dtype=np.float32)
    result = {}
    for name, call in (("read_into_nowait", lambda: ring.read_into_nowait(out, True)), ("read_into", lambda: ring.read_into(out, 0.1))):
        times: List[int] = []
        for _ in range(repeats):
            ring.write_nowait(block)
            t0 = time.perf_counter_ns()
            call()
            times.append(time.perf_counter_ns() - t0)
        result[name] = statistics.median(times) / 1000
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds-of-audio", type=float, default=600.0, help="audio moved per method and block size")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    total = int(args.seconds_of_audio * SAMPLE_RATE_HZ)

    rows = []
    for block in (BLOCK_10MS, 4096):
        times = {name: fn(total, block) for name, fn in (("ring", bench_ring), ("queue", bench_queue), ("deque", bench_deque))}
        rate = {k: total / v for k, v in times.items()}
        rows.append({
            "block_samples": block,
            "ring_msamples_s": rate["ring"] / 1e6,
            "queue_msamples_s": rate["queue"] / 1e6,
            "deque_msamples_s": rate["deque"] / 1e6,
            "ring_vs_queue": rate["ring"] / rate["queue"],
            "ring_vs_deque": rate["ring"] / rate["deque"],
        })
    latency = median_read_into_us()

    print(f"machine: {machine_label()}")
    print(f"audio moved per method: {args.seconds_of_audio:.0f} s at {SAMPLE_RATE_HZ} Hz, capacity {CAPACITY_SAMPLES} samples\n")
    print("| block (samples) | ring (Msamples/s) | Queue (Msamples/s) | deque (Msamples/s) | ring / Queue | ring / deque |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['block_samples']} | {r['ring_msamples_s']:.1f} | {r['queue_msamples_s']:.2f} | {r['deque_msamples_s']:.2f} "
              f"| {r['ring_vs_queue']:.1f}x | {r['ring_vs_deque']:.1f}x |")
    print(f"\nmedian read_into_nowait(480): {latency['read_into_nowait']:.2f} us; "
          f"median read_into(480) (data present): {latency['read_into']:.2f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_label(), "rows": rows, "median_us": latency}, f, indent=2)


if __name__ == "__main__":
    main()
