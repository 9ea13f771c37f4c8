"""Load on ``kimia-edge serve``: N concurrent clients looping streamed spoken chat completions.

Starts ``kimia-edge serve`` on the bundle given (a subprocess: the clients do not share its GIL), then for each
queue size and each client count N runs N clients for ``--seconds``; each client sends a streamed chat completion
with ``--max-tokens`` LLM steps, reads it to the end, and sends the next. Reported per cell:
- time to first text (first transcript delta) and to the first audio byte, p50 / p99, in seconds from the request
  being sent (queue wait included: what a client sees);
- completed turns per minute (all clients together, over the cell's wall time);
- errors: 429 (queue full; the client waits the shorter of Retry-After and 0.5 s, then retries) and others.

Two queue sizes show both regimes: one large enough that nobody is refused, and one (``--small-queue``) under
which clients beyond 1 + that many get 429s.

    python bench/server.py --bundle BUNDLE [--clients 1 2 4 8] [--seconds 30] [--max-tokens 40]
        [--queues 8 1] [--threads 2] [--markdown docs/server.md]

The table goes between the ``<!-- bench/server.py SECTION: begin/end -->`` markers of ``--markdown``; timings are
reported, never asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import httpx

from kimia_edge.runtime.metrics import machine_label

DEFAULT_CLIP = Path(__file__).resolve().parents[2] / "shared" / "audio" / "qa_example.wav"


@dataclass
class Cell:
    """One (queue size, client count) run. Times in seconds."""

    max_queue: int
    clients: int
    wall_s: float = 0.0
    first_text_s: List[float] = field(default_factory=list)
    first_audio_s: List[float] = field(default_factory=list)
    completed: int = 0
    refused_429: int = 0
    other_errors: int = 0

    @property
    def turns_per_min(self) -> float:
        return 60.0 * self.completed / self.wall_s if self.wall_s else 0.0


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100), linear between ranks; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_turn(http: httpx.AsyncClient, url: str, body: dict, cell: Cell) -> Optional[float]:
    """Sends one streamed chat; records its first text / audio times. Returns a back-off in seconds after a 429."""
    start = time.perf_counter()
    text_at = audio_at = None
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code == 429:
                cell.refused_429 += 1
                return min(float(r.headers.get("retry-after", 1)), 0.5)
            if r.status_code != 200:
                cell.other_errors += 1
                return 0.5
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line.startswith("data: [DONE]"):
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    cell.other_errors += 1
                    return 0.5
                audio = (chunk["choices"][0]["delta"].get("audio") or {}) if chunk.get("choices") else {}
                if text_at is None and audio.get("transcript"):
                    text_at = time.perf_counter() - start
                if audio_at is None and audio.get("data"):
                    audio_at = time.perf_counter() - start
    except httpx.HTTPError:
        cell.other_errors += 1
        return 0.5
    cell.completed += 1
    if text_at is not None:
        cell.first_text_s.append(text_at)
    if audio_at is not None:
        cell.first_audio_s.append(audio_at)
    return None


async def run_cell(url: str, body: dict, cell: Cell, seconds: float) -> None:
    """``cell.clients`` clients, each starting turns until ``seconds`` have passed (a started turn is finished)."""
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        async with httpx.AsyncClient(timeout=600) as http:
            while time.perf_counter() < deadline:
                backoff = await one_turn(http, url, body, cell)
                if backoff:
                    await asyncio.sleep(backoff)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(cell.clients)))
    cell.wall_s = time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, max_queue: int, threads: Optional[int]) -> "tuple[subprocess.Popen, str]":
    """``kimia-edge serve`` on a free loopback port; returns once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "kimia_edge.cli", "serve", "--bundle", str(bundle), "--port", str(port),
           "--max-queue", str(max_queue), "--fast-start", "--log-level", "warning"]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"kimia-edge serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError("kimia-edge serve did not answer /health within 600 s")
        time.sleep(0.5)


def fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(cells: List[Cell], header: str) -> str:
    rows = [header, "",
            "| max_queue | clients | turns | turns/min | first text p50 / p99 (s) | first audio p50 / p99 (s) "
            "| 429 | other errors |",
            "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        rows.append(f"| {c.max_queue} | {c.clients} | {c.completed} | {c.turns_per_min:.1f} "
                    f"| {fmt(percentile(c.first_text_s, 50))} / {fmt(percentile(c.first_text_s, 99))} "
                    f"| {fmt(percentile(c.first_audio_s, 50))} / {fmt(percentile(c.first_audio_s, 99))} "
                    f"| {c.refused_429} | {c.other_errors} |")
    return "\n".join(rows)


def write_markdown(path: Path, text: str, section: str) -> None:
    """Replaces what stands between the markers of ``section`` in ``path`` (or appends them with ``text``)."""
    begin, end = f"<!-- bench/server.py {section}: begin -->", f"<!-- bench/server.py {section}: end -->"
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + block + "\n"
    path.write_text(new)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--clip", type=Path, default=DEFAULT_CLIP, help="the spoken question every client sends")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--queues", type=int, nargs="+", default=[8, 1], help="max_queue values, one server each")
    p.add_argument("--seconds", type=float, default=30.0, help="per cell: clients start turns for this long")
    p.add_argument("--max-tokens", type=int, default=40, help="LLM steps per turn (12.5 per second of speech)")
    p.add_argument("--threads", type=int, help="ONNX / llama.cpp threads of the server")
    p.add_argument("--label", default="", help="what the bundle is (tiny, small...), for the table's header")
    p.add_argument("--markdown", type=Path, help="write the table into this file, between its markers")
    p.add_argument("--section", default="tiny", help="which table of --markdown (its markers name it)")
    a = p.parse_args(argv)

    body = {"model": "kimi-audio", "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "pcm16"},
            "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
                "data": base64.b64encode(a.clip.read_bytes()).decode(), "format": a.clip.suffix.lstrip(".")}}]}],
            "max_tokens": a.max_tokens, "stream": True, "seed": 0}
    cells: List[Cell] = []
    for max_queue in a.queues:
        proc, url = start_server(a.bundle, max_queue, a.threads)
        try:
            asyncio.run(run_cell(url, dict(body, max_tokens=2), Cell(max_queue, 1), 0.1))  # warm-up turn
            for n in a.clients:
                cell = Cell(max_queue, n)
                asyncio.run(run_cell(url, body, cell, a.seconds))
                cells.append(cell)
                print(table([cell], "").strip().splitlines()[-1], flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    header = (f"Bundle: {a.label or a.bundle.name}; {a.max_tokens} LLM steps per turn; {a.seconds:g} s per cell; "
              f"server threads: {a.threads or 'default'}; clip: {a.clip.name}; {machine_label()}; "
              f"{datetime.date.today().isoformat()}; `python bench/server.py "
              f"{' '.join(os.path.basename(x) if x == str(a.bundle) else x for x in (argv or sys.argv[1:]))}`")
    text = table(cells, header)
    print("\n" + text)
    if a.markdown:
        write_markdown(a.markdown, text, a.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
