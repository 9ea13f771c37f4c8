"""The sound device's 10 ms output callback while the full pipeline runs on every core ([H] #14 item 6).

A thread behaves like PortAudio's output callback: every 10 ms (240 samples at 24 kHz) it sleeps to an absolute
deadline, wraps a device buffer as sounddevice does, and calls the player's callback, timing it. Meanwhile the
runtime ``Pipeline`` runs a real speech-to-speech turn on a real clip and its ``AudioEvent`` samples go to the player,
as ``chat --speaker`` does. Three designs, alternating rounds in one run, same seed (same audio) every round:

- ``ring``: the runtime's ``Speaker`` on an ``AudioRing`` (its ``callback`` is what the device calls; the turn's
  samples go in by ``ring.write``, as ``runtime/cli._Output.add`` does);
- ``queue``: a ``queue.Queue`` of 240-sample blocks (the producer cuts the samples into blocks, the callback takes one
  with ``get_nowait`` and copies it into the device buffer);
- ``ring+switch``: ``ring`` with the interpreter's GIL switch interval at 1 ms instead of 5 ms (would the callback
  thread, which needs the GIL, wait less for it?).

Per callback: the scheduled deadline, start and end (``time.monotonic_ns``) and the samples delivered. Reported:
callback duration p50/p99/p99.9, wake-up lateness, deadline misses (a callback that ends more than one period after
its scheduled start: the device would have run dry) and underruns after the first audio (a short block while the
turn still had samples to come); as a control, the thread alone for 10 s with no turn running. The thread asks for
SCHED_FIFO, else a negative nice, else runs as it is, and says which it got.

    python bench/audio_callback.py --bundle BUNDLE [--bundle BUNDLE2] --clip ../shared/audio/qa_example.wav \\
        [--rounds 4] [--max-steps 120] [--threads 2] [--png docs/audio_callback.png] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

RATE_HZ = 24_000
BLOCK = 240  # 10 ms at 24 kHz
PERIOD_NS = BLOCK * 1_000_000_000 // RATE_HZ
SPEAKER_RING_SECONDS = 120  # as runtime/cli.py sizes the Speaker's ring


# ---- statistics (pure; tests/test_audio_callback_bench.py) --------------------------------------------------------
def percentiles_us(durations_ns: Sequence[int], qs: Sequence[float] = (50, 99, 99.9)) -> Dict[str, float]:
    """{"p50": µs, "p99": µs, "p99.9": µs} of ``durations_ns`` (linear interpolation between order statistics)."""
    d = np.asarray(durations_ns, dtype=np.float64)
    if d.size == 0:
        raise ValueError("percentiles_us: no durations")
    return {f"p{q:g}": float(np.percentile(d, q)) / 1000.0 for q in qs}


def deadline_misses(scheduled_ns: Sequence[int], end_ns: Sequence[int], period_ns: int = PERIOD_NS) -> int:
    """Callbacks that ended more than one period after their scheduled start: the device needed the block by then."""
    s, e = np.asarray(scheduled_ns, np.int64), np.asarray(end_ns, np.int64)
    if s.shape != e.shape:
        raise ValueError(f"deadline_misses: {s.size} scheduled times but {e.size} end times")
    return int(np.count_nonzero(e > s + period_ns))


def underruns_after_first_audio(got: Sequence[int], total_samples: int, block: int = BLOCK) -> int:
    """Short blocks from the first one that carried audio on, while the turn still had samples to come: ``got`` [n]
    samples each callback delivered; ``total_samples`` the turn produced. The last, partial block is not one."""
    g = np.asarray(got, np.int64)
    if g.sum() > total_samples:
        raise ValueError(f"underruns_after_first_audio: {int(g.sum())} samples played but {total_samples} produced")
    started = np.cumsum(g) > 0
    short = g < block
    more_to_come = np.cumsum(g) < total_samples
    return int(np.count_nonzero(started & short & more_to_come))


@dataclass
class Timeline:
    """One round: per callback k, scheduled start, actual start and end (monotonic ns), samples delivered."""

    design: str
    scheduled_ns: List[int] = field(default_factory=list)
    start_ns: List[int] = field(default_factory=list)
    end_ns: List[int] = field(default_factory=list)
    got: List[int] = field(default_factory=list)
    total_samples: int = 0
    first_audio_s: Optional[float] = None  # from the first callback
    synth_rtf: Optional[float] = None  # the turn's detokenizer + vocoder time / its audio duration

    def summary(self) -> Dict[str, Any]:
        start, end = np.asarray(self.start_ns), np.asarray(self.end_ns)
        late = start - np.asarray(self.scheduled_ns)
        return {"callbacks": len(self.got), **percentiles_us(end - start),
                "max_us": float((end - start).max()) / 1000.0,
                "late_p99_ms": float(np.percentile(late, 99)) / 1e6, "late_max_ms": float(late.max()) / 1e6,
                "misses": deadline_misses(self.scheduled_ns, self.end_ns),
                "underruns": underruns_after_first_audio(self.got, self.total_samples),
                "audio_s": self.total_samples / RATE_HZ}


# ---- the two players ------------------------------------------------------------------------------------------------
class RingPlayer:
    """The runtime's path: ``Speaker.callback`` on an ``AudioRing``; the producer writes as ``chat --speaker`` does."""

    def __init__(self) -> None:
        from kimia_edge.runtime.audio_io import Speaker
        from kimia_edge.runtime.rings import AudioRing

        self.speaker = Speaker(AudioRing(RATE_HZ * SPEAKER_RING_SECONDS, "block"), RATE_HZ, block=BLOCK)
        self.callback = self.speaker.callback

    def played(self) -> int:
        return self.speaker.played_samples

    def put(self, samples: np.ndarray) -> None:
        self.speaker.ring.write(samples)

    def end(self) -> None:
        self.speaker.ring.close()

    def done(self) -> bool:
        return self.speaker.ring.closed and self.speaker.ring.available == 0


class QueuePlayer:
    """The baseline: a ``queue.Queue`` of ``BLOCK``-sample arrays (the last may be shorter), None at the end."""

    def __init__(self) -> None:
        self.q: "queue.Queue[Optional[np.ndarray]]" = queue.Queue()
        self.carry = np.zeros(0, np.float32)
        self.played_samples, self.ended = 0, False

    def callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        out = outdata.reshape(-1)
        try:
            block = self.q.get_nowait()
        except queue.Empty:
            out.fill(0.0)
            return
        if block is None:
            self.ended = True
            out.fill(0.0)
            return
        out[: len(block)] = block
        out[len(block):] = 0.0
        self.played_samples += len(block)

    def played(self) -> int:
        return self.played_samples

    def put(self, samples: np.ndarray) -> None:
        samples = np.concatenate([self.carry, samples]) if len(self.carry) else samples
        whole = len(samples) // BLOCK * BLOCK
        for i in range(0, whole, BLOCK):
            self.q.put(samples[i:i + BLOCK].copy())  # a queue hands over ownership: one array per block
        self.carry = samples[whole:].copy()

    def end(self) -> None:
        if len(self.carry):
            self.q.put(self.carry)
        self.q.put(None)

    def done(self) -> bool:
        return self.ended


PLAYERS: Dict[str, Callable[[], Any]] = {"ring": RingPlayer, "queue": QueuePlayer}
# design -> (player, GIL switch interval for the round: None = CPython's default, 5 ms)
DESIGNS: Dict[str, tuple] = {"ring": ("ring", None), "queue": ("queue", None), "ring+switch": ("ring", 0.001)}
BUFFERS_MS = (10, 20, 50, 100)  # device buffering a late callback can eat into: misses for each


# ---- the callback thread --------------------------------------------------------------------------------------------
def raise_priority() -> str:
    """Asks for SCHED_FIFO for the calling thread, else nice -10; returns what it got (and why not the better)."""
    try:
        prio = min(80, os.sched_get_priority_max(os.SCHED_FIFO))
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(prio))  # pid 0 = this thread on Linux
        return f"SCHED_FIFO {prio}"
    except (OSError, AttributeError) as exc:
        fifo_error = f"SCHED_FIFO refused ({exc})"
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)  # a thread id: this thread only
        return f"nice -10 ({fifo_error})"
    except (OSError, AttributeError) as exc:
        return f"default priority ({fifo_error}; nice -10 refused: {exc})"


class CallbackThread(threading.Thread):
    """Calls ``player.callback(outdata, BLOCK, None, None)`` every ``PERIOD_NS`` on an absolute schedule until the
    player is done (or ``stop()``); ``outdata`` wraps one reused device buffer per call, as sounddevice does."""

    def __init__(self, player: Any, design: str) -> None:
        super().__init__(daemon=True, name=f"audio-callback-{design}")
        self.player, self.timeline = player, Timeline(design)
        self.priority = ""
        self._stop_event = threading.Event()
        self._ready = threading.Event()

    def run(self) -> None:
        self.priority = raise_priority()
        device_buffer = bytearray(BLOCK * 4)
        tl, callback, played = self.timeline, self.player.callback, self.player.played
        self._ready.set()
        t0 = time.monotonic_ns() + PERIOD_NS
        k = 0
        while not self._stop_event.is_set():
            scheduled = t0 + k * PERIOD_NS
            wait = scheduled - time.monotonic_ns()
            if wait > 0:
                time.sleep(wait / 1e9)  # clock_nanosleep to the deadline (Python >= 3.11 on Linux)
            before = played()
            start = time.monotonic_ns()
            outdata = np.frombuffer(device_buffer, dtype=np.float32).reshape(BLOCK, 1)
            callback(outdata, BLOCK, None, None)
            end = time.monotonic_ns()
            tl.scheduled_ns.append(scheduled)
            tl.start_ns.append(start)
            tl.end_ns.append(end)
            tl.got.append(played() - before)
            if tl.first_audio_s is None and tl.got[-1]:
                tl.first_audio_s = (end - t0) / 1e9
            if self.player.done():
                break
            k += 1

    def start_and_wait(self) -> None:
        self.start()
        self._ready.wait()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@contextlib.contextmanager
def switch_interval(seconds: Optional[float]) -> Iterator[None]:
    """``sys.setswitchinterval(seconds)`` for the with-block (None: unchanged): how long a thread that wants the GIL
    waits before the thread running Python bytecode is asked to hand it over."""
    before = sys.getswitchinterval()
    if seconds is not None:
        sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


# ---- a round: one turn through one player ----------------------------------------------------------------------------
def run_round(chat: Any, clip: np.ndarray, clip_rate: int, design: str, config: Any) -> tuple:
    """One turn, its audio through ``design``'s player while the callback thread plays it; (Timeline, priority)."""
    from kimia_edge.runtime.streaming import AudioEvent

    kind, switch = DESIGNS[design]
    player = PLAYERS[kind]()
    thread = CallbackThread(player, design)
    with switch_interval(switch):
        thread.start_and_wait()
        total = _play_turn(chat, clip, clip_rate, config, player, thread, AudioEvent)
    thread.timeline.total_samples = total
    metrics = chat.last.metrics if chat.last is not None else None
    thread.timeline.synth_rtf = metrics.synth_rtf if metrics is not None else None
    return thread.timeline, thread.priority


def _play_turn(chat: Any, clip: np.ndarray, clip_rate: int, config: Any, player: Any, thread: CallbackThread,
               audio_event: type) -> int:
    """Streams the turn's audio into ``player`` while ``thread`` plays it; the samples the turn produced."""
    total = 0
    try:
        for event in chat.turn(clip, clip_rate, task="chat", config=config):
            if isinstance(event, audio_event) and len(event.samples):
                player.put(np.ascontiguousarray(event.samples, dtype=np.float32))
                total += len(event.samples)
        player.end()
        thread.join(timeout=total / RATE_HZ + 30.0)
    finally:
        thread.stop()
    return total


def idle_round(seconds: float) -> Timeline:
    """The control: the callback thread alone for ``seconds`` (no turn running, an empty ring): how late the OS wakes it."""
    thread = CallbackThread(RingPlayer(), "idle")
    thread.start_and_wait()
    time.sleep(seconds)
    thread.stop()
    return thread.timeline


def run_bundle(bundle: Path, clip: np.ndarray, clip_rate: int, rounds: int, max_steps: int,
               threads: Optional[int], seed: int) -> Dict[str, Any]:
    """Loads ``bundle``, one unmeasured warm-up turn, then ``rounds`` rounds of every design, the order rotated."""
    from tqdm import tqdm

    from kimia_edge.runtime.pipeline import Pipeline, PipelineOptions
    from kimia_edge.runtime.tasks import generation_config

    chat = Pipeline.from_bundle(bundle, PipelineOptions(threads=threads)).conversation(keep_history=False)
    config = generation_config("chat", seed, step_limit=max_steps)
    run_round(chat, clip, clip_rate, "ring", config)  # warm-up: first-call costs out of the measurement
    idle = idle_round(10.0)
    timelines: Dict[str, List[Timeline]] = {d: [] for d in DESIGNS}
    names = list(DESIGNS)
    priority = ""
    for r in tqdm(range(rounds), desc=f"rounds on {bundle.name}", unit="round"):
        for design in names[r % len(names):] + names[: r % len(names)]:
            tl, priority = run_round(chat, clip, clip_rate, design, config)
            timelines[design].append(tl)
    return {"bundle": str(bundle), "priority": priority, "timelines": timelines, "idle": idle.summary()}


def pooled(timelines: List[Timeline]) -> Dict[str, Any]:
    """Summary over all rounds of one design: durations pooled, misses and underruns summed."""
    dur = np.concatenate([np.asarray(t.end_ns) - np.asarray(t.start_ns) for t in timelines])
    per = [t.summary() for t in timelines]
    return {"rounds": len(timelines), "callbacks": int(dur.size), **percentiles_us(dur),
            "max_us": float(dur.max()) / 1000.0,
            "late_p99_ms": float(np.percentile(np.concatenate([np.asarray(t.start_ns) - np.asarray(t.scheduled_ns)
                                                               for t in timelines]), 99)) / 1e6,
            "late_max_ms": max(p["late_max_ms"] for p in per),
            "misses": sum(p["misses"] for p in per),
            "misses_by_buffer_ms": {ms: sum(deadline_misses(t.scheduled_ns, t.end_ns, ms * 1_000_000) for t in timelines)
                                    for ms in BUFFERS_MS},
            "underruns": sum(p["underruns"] for p in per),
            "misses_per_round": [p["misses"] for p in per], "late_p99_ms_per_round": [p["late_p99_ms"] for p in per],
            "audio_s_per_round": per[0]["audio_s"],
            "synth_rtf": float(np.median([t.synth_rtf for t in timelines if t.synth_rtf is not None] or [np.nan])),
            "first_audio_s": float(np.median([t.first_audio_s for t in timelines if t.first_audio_s is not None]))
            if any(t.first_audio_s is not None for t in timelines) else None}


def plot(results: List[Dict[str, Any]], path: Path) -> None:
    """Per bundle: the callback-duration CDF of both designs, and one round's timeline of end - scheduled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 3.6 * len(results)), squeeze=False)
    colors = {"ring": "tab:blue", "queue": "tab:orange", "ring+switch": "tab:green"}
    for row, res in zip(axes, results):
        name = Path(res["bundle"]).name
        for design, tls in res["timelines"].items():
            dur = np.sort(np.concatenate([np.asarray(t.end_ns) - np.asarray(t.start_ns) for t in tls])) / 1000.0
            row[0].plot(dur, 1.0 - np.arange(dur.size) / dur.size, color=colors[design], label=design)
            t = tls[0]
            x = (np.asarray(t.scheduled_ns) - t.scheduled_ns[0]) / 1e9
            row[1].plot(x, (np.asarray(t.end_ns) - np.asarray(t.scheduled_ns)) / 1e6, color=colors[design],
                        lw=0.6, label=f"{design} (round 1)")
        row[0].set(xscale="log", yscale="log", xlabel="callback duration (µs)", ylabel="fraction of callbacks >= x",
                   title=f"{name}: callback duration (all rounds)")
        row[1].axhline(PERIOD_NS / 1e6, color="red", ls="--", lw=0.8, label="deadline (10 ms)")
        row[1].set(xlabel="time in the turn (s)", ylabel="end - scheduled start (ms)",
                   title=f"{name}: when each callback finished")
        for ax in row:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    import soundfile as sf

    from kimia_edge.runtime.metrics import machine_label

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, action="append", required=True, help="repeat for several bundles")
    ap.add_argument("--clip", type=Path, required=True, help="the user's question (any rate, mono or not)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per bundle; each runs both designs")
    ap.add_argument("--max-steps", type=int, default=120, help="LLM step limit per turn (random weights rarely stop)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime / llama.cpp threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", type=Path, default=Path("audio_callback.png"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds: expected >= 1")
    clip, clip_rate = sf.read(str(args.clip), dtype="float32")

    load_before = open("/proc/loadavg").read().split()[:3]
    results = [run_bundle(b, clip, clip_rate, args.rounds, args.max_steps, args.threads, args.seed) for b in args.bundle]
    load_after = open("/proc/loadavg").read().split()[:3]

    print(f"machine: {machine_label()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"load average before {' '.join(load_before)}, after {' '.join(load_after)}")
    print(f"callback thread: {results[0]['priority']}\n")
    print("| bundle | design | callbacks | p50 (µs) | p99 (µs) | p99.9 (µs) | max (µs) | late p99 / max (ms) "
          "| deadline misses | underruns after first audio | first audio (s) | synthesis RTF |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    out = []
    for res in results:
        for design, tls in res["timelines"].items():
            s = pooled(tls)
            out.append({"bundle": res["bundle"], "design": design, **s})
            print(f"| {Path(res['bundle']).name} | {design} | {s['callbacks']} | {s['p50']:.1f} | {s['p99']:.1f} "
                  f"| {s['p99.9']:.1f} | {s['max_us']:.0f} | {s['late_p99_ms']:.2f} / {s['late_max_ms']:.1f} "
                  f"| {s['misses']} | {s['underruns']} | {s['first_audio_s'] or float('nan'):.2f} | {s['synth_rtf']:.2f} |")
    for res in results:
        i = res["idle"]
        print(f"\ncontrol, {Path(res['bundle']).name}: the callback thread alone for 10 s (no turn): late p99 / max "
              f"{i['late_p99_ms']:.2f} / {i['late_max_ms']:.2f} ms, duration p99 {i['p99']:.1f} µs, {i['misses']} misses")
    print(f"\ndeadline misses if the device buffered more (ms of audio): {', '.join(map(str, BUFFERS_MS))}")
    for o in out:
        print(f"  {Path(o['bundle']).name} {o['design']}: " + " / ".join(str(v) for v in o["misses_by_buffer_ms"].values())
              + f"; per round: misses {o['misses_per_round']}, late p99 (ms) "
              + ", ".join(f"{v:.1f}" for v in o["late_p99_ms_per_round"]))
    print("audio per turn: " + ", ".join(f"{Path(o['bundle']).name} {o['audio_s_per_round']:.1f} s"
                                        for o in out[::len(DESIGNS)]))
    plot(results, args.png)
    print(f"wrote {args.png}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_label(), "priority": results[0]["priority"],
                                         "idle": {r["bundle"]: r["idle"] for r in results},
                                         "loadavg_before": load_before, "loadavg_after": load_after, "rows": out},
                                        indent=2))


if __name__ == "__main__":
    main()
