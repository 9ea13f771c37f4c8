"""Turns on a shared pipeline, from async handlers: admission and running off the event loop.

The pipeline runs one turn at a time (one LLM KV state). ``TurnQueue.admit()`` is called by a handler before it
answers: it returns a ``Ticket`` or raises ``QueueFull`` (the handler answers 429 with ``Retry-After``) when
``max_queue`` turns are already waiting behind the running one. ``Ticket.events(...)`` then waits for its turn
(first come, first served) and streams the pipeline's events, produced on a worker thread. Leaving the iteration
early (the client disconnected, a barge-in, an error) cancels the turn: the runtime's own cancel stops the LLM
between two steps and the synthesis between two network calls; the worker thread is joined before the next turn
starts, so nothing keeps running.
"""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, List, Optional

import anyio
import numpy as np

from kimia_edge.runtime.generation import GenerationConfig
from kimia_edge.runtime.metrics import RunMetrics
from kimia_edge.runtime.pipeline import Conversation
from kimia_edge.runtime.streaming import Event

_END = object()


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting turns already; ``retry_after_s`` estimates when one is free."""

    def __init__(self, waiting: int, retry_after_s: int) -> None:
        super().__init__(f"{waiting} turns are waiting already; retry in about {retry_after_s} s")
        self.waiting, self.retry_after_s = waiting, retry_after_s


@dataclass
class _Failed:
    exc: BaseException


class TurnQueue:
    """One running turn and at most ``max_queue`` waiting ones. ``on_turn_done(metrics)`` is called after each
    turn that ran (cancelled ones included)."""

    def __init__(self, max_queue: int, on_turn_done: Optional[Callable[[RunMetrics], None]] = None) -> None:
        self.max_queue = max_queue
        self.on_turn_done = on_turn_done
        self._admitted = 0  # running + waiting
        self._lock: Optional[asyncio.Lock] = None  # made on first use, inside the server's event loop
        self._recent_s: List[float] = []

    @property
    def waiting(self) -> int:
        """Admitted turns not yet running."""
        return max(0, self._admitted - 1)

    @property
    def running(self) -> bool:
        return self._admitted > 0

    def admit(self) -> "Ticket":
        """A place in the queue, or ``QueueFull``. Call from the event loop; release with ``Ticket.release()`` (the
        end of ``Ticket.events`` releases it)."""
        if self._admitted > self.max_queue:
            raise QueueFull(self.waiting, self.retry_after_s())
        self._admitted += 1
        return Ticket(self)

    def retry_after_s(self) -> int:
        """Seconds until a place is likely free: the mean of the last turns' durations (1 s before any turn)."""
        mean = sum(self._recent_s) / len(self._recent_s) if self._recent_s else 1.0
        return max(1, int(np.ceil(mean)))

    def _record(self, seconds: float) -> None:
        self._recent_s = (self._recent_s + [seconds])[-8:]


class Ticket:
    """An admitted turn. ``events()`` runs it once; ``release()`` gives the place back (idempotent)."""

    def __init__(self, queue: TurnQueue) -> None:
        self.queue = queue
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.queue._admitted -= 1

    async def events(self, conversation: Conversation, samples: np.ndarray, sample_rate_hz: int, task: str = "chat",
                     *, config: Optional[GenerationConfig] = None, seed: Optional[int] = None,
                     ) -> AsyncIterator[Event]:
        """Waits for the turn's place, then streams ``conversation.turn(...)``'s events; errors of the turn (bad
        audio, a context that cannot hold the prompt) are raised here. Releases the ticket at the end.

        A consumer that may stop early iterates inside ``contextlib.aclosing(ticket.events(...))``: an async
        generator left by ``break`` is only closed when collected, and until then its turn keeps its place."""
        q = self.queue
        if q._lock is None:
            q._lock = asyncio.Lock()
        try:
            async with q._lock:
                start, before = time.perf_counter(), conversation.last
                try:
                    async with aclosing(_run_in_thread(conversation, samples, sample_rate_hz, task, config,
                                                       seed)) as run:
                        async for event in run:
                            yield event
                finally:  # also when the consumer left early: the turn ran (cancelled) and has its metrics
                    q._record(time.perf_counter() - start)
                    last = conversation.last
                    if q.on_turn_done is not None and last is not None and last is not before \
                            and last.metrics is not None:
                        q.on_turn_done(last.metrics)
        finally:
            self.release()


async def _run_in_thread(conversation: Conversation, samples: np.ndarray, sample_rate_hz: int, task: str,
                         config: Optional[GenerationConfig], seed: Optional[int]) -> AsyncIterator[Any]:
    loop = asyncio.get_running_loop()
    out: "asyncio.Queue[Any]" = asyncio.Queue()
    stop = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(out.put_nowait, item)
        except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
            pass

    def work() -> None:
        gen = conversation.turn(samples, sample_rate_hz, task, config=config, seed=seed)
        try:
            for event in gen:
                if stop.is_set():  # closing the turn below cancels it; the conversation still records what was said
                    break
                put(event)
        except BaseException as exc:  # handed to the event loop, raised there
            put(_Failed(exc))
        finally:
            gen.close()
            put(_END)

    thread = threading.Thread(target=work, name="kimia-server-turn", daemon=True)
    thread.start()
    try:
        while True:
            item = await out.get()
            if item is _END:
                break
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        conversation.cancel()
        with anyio.CancelScope(shield=True):  # joined even while the handler is being cancelled
            await loop.run_in_executor(None, thread.join)
