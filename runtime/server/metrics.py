"""``GET /metrics``: the server's counters in the Prometheus text format (version 0.0.4), written here (no client
library: a handful of series, and nothing more to install).

Series (times in seconds):
    kimia_first_audio_seconds        histogram  start of a turn -> first output sample (RunMetrics.first_audio_s)
    kimia_first_text_seconds         histogram  start of a turn -> first text piece
    kimia_stage_rtf{stage}           histogram  real-time factor of "encode" (audio tokenizer) and "synth"
                                                (detokenizer + vocoder); < 1 is faster than real time
    kimia_llm_steps_per_second       histogram  LLM decode speed per turn
    kimia_llm_steps_total            counter    LLM steps run
    kimia_turns_total{stop}          counter    turns that ran, by how they ended (text_eos, audio_eos, max_tokens,
                                                context_full, cancelled)
    kimia_turns_cancelled_total      counter    turns cancelled (client gone, barge-in)
    kimia_ring_events_total{ring,kind} counter  ring overruns / underruns / dropped (RunMetrics.rings)
    kimia_queue_depth                gauge      turns waiting behind the running one
    kimia_turn_running               gauge      1 while a turn runs
    kimia_http_requests_total{endpoint,method,status} counter
"""
from __future__ import annotations

import math
import threading
from collections import defaultdict
from typing import Callable, Dict, List, Sequence, Tuple

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kimia_edge.runtime.metrics import RunMetrics

LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0)
RTF_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0)
STEPS_PER_S_BUCKETS = (1.0, 2.0, 5.0, 10.0, 12.5, 20.0, 50.0, 100.0, 200.0, 500.0)
RING_KINDS = ("overruns", "underruns", "dropped")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus keeps them."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        if value is None or not math.isfinite(value):
            return
        self.counts[next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> List[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, n in zip(list(self.bounds) + [math.inf], self.counts):
            running += n
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum!r}", f"{name}_count{lab} {self.count}"]
        return out


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ServerMetrics:
    """What /metrics reports. ``on_turn_done`` is the TurnQueue hook (called on the event loop after each turn);
    ``queue_state()`` returns (waiting, running) when the page is rendered."""

    def __init__(self, queue_state: Callable[[], Tuple[int, bool]]) -> None:
        self._lock = threading.Lock()
        self.queue_state = queue_state
        self.first_audio = Histogram(LATENCY_BUCKETS_S)
        self.first_text = Histogram(LATENCY_BUCKETS_S)
        self.rtf = {"encode": Histogram(RTF_BUCKETS), "synth": Histogram(RTF_BUCKETS)}
        self.steps_per_s = Histogram(STEPS_PER_S_BUCKETS)
        self.llm_steps = 0
        self.turns: Dict[str, int] = defaultdict(int)
        self.rings: Dict[Tuple[str, str], int] = defaultdict(int)
        self.requests: Dict[Tuple[str, str, int], int] = defaultdict(int)

    def on_turn_done(self, m: RunMetrics) -> None:
        """Records one finished (or cancelled) turn."""
        with self._lock:
            if m.first_audio_s is not None:
                self.first_audio.observe(m.first_audio_s)
            if m.first_text_s is not None:
                self.first_text.observe(m.first_text_s)
            if m.input_audio_s:
                self.rtf["encode"].observe(m.encode_rtf)
            if m.synth_rtf is not None:
                self.rtf["synth"].observe(m.synth_rtf)
            if m.llm_steps:
                self.steps_per_s.observe(m.llm_steps_per_s)
            self.llm_steps += m.llm_steps
            self.turns[m.stop or "unknown"] += 1
            for ring, counters in m.rings.items():
                for kind in RING_KINDS:
                    self.rings[(ring, kind)] += int(counters.get(kind, 0))

    def count_request(self, endpoint: str, method: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, method, status)] += 1

    def render(self) -> str:
        """The page, Prometheus text format 0.0.4."""
        waiting, running = self.queue_state()
        with self._lock:
            out = ["# HELP kimia_first_audio_seconds Start of a turn to its first output sample.",
                   "# TYPE kimia_first_audio_seconds histogram", *self.first_audio.lines("kimia_first_audio_seconds"),
                   "# HELP kimia_first_text_seconds Start of a turn to its first text piece.",
                   "# TYPE kimia_first_text_seconds histogram", *self.first_text.lines("kimia_first_text_seconds"),
                   "# HELP kimia_stage_rtf Real-time factor per stage (processing time / audio duration).",
                   "# TYPE kimia_stage_rtf histogram"]
            for stage, h in self.rtf.items():
                out += h.lines("kimia_stage_rtf", f'stage="{stage}"')
            out += ["# HELP kimia_llm_steps_per_second LLM decode steps per second, per turn.",
                    "# TYPE kimia_llm_steps_per_second histogram", *self.steps_per_s.lines("kimia_llm_steps_per_second"),
                    "# HELP kimia_llm_steps_total LLM steps run.", "# TYPE kimia_llm_steps_total counter",
                    f"kimia_llm_steps_total {self.llm_steps}",
                    "# HELP kimia_turns_total Turns run, by how they ended.", "# TYPE kimia_turns_total counter"]
            out += [f'kimia_turns_total{{stop="{_esc(s)}"}} {n}' for s, n in sorted(self.turns.items())]
            out += ["# HELP kimia_turns_cancelled_total Turns cancelled (client gone, barge-in).",
                    "# TYPE kimia_turns_cancelled_total counter",
                    f"kimia_turns_cancelled_total {self.turns.get('cancelled', 0)}",
                    "# HELP kimia_ring_events_total Ring overruns, underruns and dropped items.",
                    "# TYPE kimia_ring_events_total counter"]
            out += [f'kimia_ring_events_total{{ring="{_esc(r)}",kind="{k}"}} {n}'
                    for (r, k), n in sorted(self.rings.items())]
            out += ["# HELP kimia_queue_depth Turns waiting behind the running one.", "# TYPE kimia_queue_depth gauge",
                    f"kimia_queue_depth {waiting}",
                    "# HELP kimia_turn_running 1 while a turn runs.", "# TYPE kimia_turn_running gauge",
                    f"kimia_turn_running {int(running)}",
                    "# HELP kimia_http_requests_total HTTP requests by endpoint, method and status.",
                    "# TYPE kimia_http_requests_total counter"]
            out += [f'kimia_http_requests_total{{endpoint="{_esc(e)}",method="{m}",status="{s}"}} {n}'
                    for (e, m, s), n in sorted(self.requests.items())]
        return "\n".join(out) + "\n"


class CountRequests:
    """ASGI middleware: counts every HTTP answer by endpoint (the path if it is one of ``endpoints``, else
    "other", so that scanners cannot grow the label set), method and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, endpoints: Callable[[], Sequence[str]]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            self.metrics.count_request(path if path in self.endpoints() else "other", scope["method"], status[0])
