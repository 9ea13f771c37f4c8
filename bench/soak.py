"""Soak: a streaming conversation loop on one bundle for N minutes, the process's resident memory (RSS) and OS thread
count sampled every second. A leak shows as a positive RSS slope after warm-up; a thread that outlives its turn as a
growing thread count.

Each turn is a speech-to-speech turn (``chat``) streamed through ``Conversation.turn`` with a step limit, on a
conversation that keeps no history (every turn the same size); every ``--abandon-every``-th turn is abandoned after
its first audio event (the generator is closed), which must cancel it and join its threads.

    python bench/soak.py --bundle BUNDLE [--minutes 10] [--warmup-s 60] [--max-steps 40] [--png soak.png] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from kimia_edge.runtime.metrics import machine_label, proc_status


def _rss_mb_and_threads() -> tuple:
    """(resident MB, OS threads) of this process, from /proc/self/status."""
    status = proc_status()
    return status["VmRSS"] / 2**20, status["Threads"]


class Sampler(threading.Thread):
    """Samples (seconds since start, RSS MB, threads) every ``period_s`` until ``stop()``."""

    def __init__(self, period_s: float = 1.0) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.period_s, self.samples, self._stop_event = period_s, [], threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss, threads = _rss_mb_and_threads()
            self.samples.append((time.monotonic() - self.t0, rss, threads - 1))  # without the sampler itself
            self._stop_event.wait(self.period_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def summarize(samples: List[tuple], warmup_s: float) -> Dict[str, float]:
    t = np.array([s[0] for s in samples])
    rss = np.array([s[1] for s in samples])
    threads = np.array([s[2] for s in samples])
    after = t >= warmup_s
    slope = float(np.polyfit(t[after] / 60.0, rss[after], 1)[0]) if after.sum() >= 10 else float("nan")
    return {"seconds": float(t[-1]), "rss_start_mb": float(rss[after][0]) if after.any() else float("nan"),
            "rss_end_mb": float(rss[-1]), "rss_max_mb": float(rss.max()), "rss_slope_mb_per_min": slope,
            "threads_min_after_warmup": int(threads[after].min()) if after.any() else -1,
            "threads_max": int(threads.max()), "threads_max_after_warmup": int(threads[after].max()) if after.any() else -1}


def plot(samples: List[tuple], warmup_s: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] / 60 for s in samples]
    fig, ax = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    ax[0].plot(t, [s[1] for s in samples], lw=0.8)
    ax[0].set_ylabel("RSS (MB)")
    ax[1].plot(t, [s[2] for s in samples], lw=0.8, color="tab:orange")
    ax[1].set_ylabel("OS threads")
    ax[1].set_xlabel("minutes")
    for a in ax:
        a.axvline(warmup_s / 60, color="grey", ls=":", lw=0.8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--audio", type=Path, default=Path(__file__).resolve().parents[2] / "shared/audio/qa_example.wav")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--abandon-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--png", type=Path, default=Path("soak.png"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from kimia_edge.runtime.frontend import load_audio
    from kimia_edge.runtime.pipeline import Pipeline, PipelineOptions
    from kimia_edge.runtime.streaming import AudioEvent
    from kimia_edge.runtime.tasks import generation_config

    samples, rate = load_audio(args.audio)
    pipe = Pipeline.from_bundle(args.bundle, PipelineOptions(threads=args.threads,
                                                             streaming={"first_chunk_tokens": 10}))
    conversation = pipe.conversation(keep_history=False)
    sampler = Sampler()
    sampler.start()
    deadline = time.monotonic() + args.minutes * 60
    turns = abandoned = audio_s = 0
    stops: Dict[str, int] = {}
    while time.monotonic() < deadline:
        config = generation_config("chat", turns, step_limit=args.max_steps)
        events = conversation.turn(samples, rate, "chat", config=config, seed=turns)
        abandon = args.abandon_every and turns % args.abandon_every == args.abandon_every - 1
        for event in events:
            if isinstance(event, AudioEvent):
                audio_s += event.samples.size / pipe.c.output_sample_rate_hz
                if abandon:
                    events.close()  # cancels the turn and joins its threads
                    abandoned += 1
                    break
        if not abandon:
            stop = conversation.last.metrics.stop
            stops[stop] = stops.get(stop, 0) + 1
        turns += 1
    sampler.stop()
    summary = summarize(sampler.samples, args.warmup_s)
    summary.update(turns=turns, abandoned=abandoned, audio_s=round(audio_s, 1), stops=stops,
                   machine=machine_label(), python_threads_at_end=threading.active_count() - 0)
    print(json.dumps(summary, indent=2))
    plot(sampler.samples, args.warmup_s, args.png,
         f"soak {args.minutes:g} min, {turns} turns ({abandoned} abandoned), {machine_label()}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "samples": sampler.samples}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
