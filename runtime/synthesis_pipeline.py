"""Synthesis pipelining: the vocoder of chunk k runs on a worker thread while the caller's thread runs the DiT of
chunk k+1 (issue [H] #14 item 3).

    caller thread:  DiT(0) | DiT(1)     | DiT(2)     | ...
    worker thread:         | voc(0)->sink | voc(1)->sink | ...

The DiT half of a chunk (``StreamingDetokenizer.dit_chunk``) touches only the DiT state (noise, K/V cache,
positions); the vocoder half (``vocode_chunk``) only the cross-fade state (held-back mel and wav). One worker runs
the vocoder halves in chunk order, so the samples are bit-identical to the serial path's. ONNX Runtime releases the
GIL inside ``run``, so the two sessions really run at once; how many intra-op threads each gets is the caller's
choice (``runtime/pipeline.py`` and docs/benchmarks.md: on 2 cores, one each).

Chunks are delivered to ``sink`` on the worker thread as soon as they are vocoded (not when the next DiT ends), so
the first audio comes as early as in the serial path.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Optional

from kimia_edge.runtime.detokenizer import MelChunk, StreamingDetokenizer, WaveChunk

__all__ = ["SynthesisPipeline"]

_STOP = None


class SynthesisPipeline:
    """Runs ``detokenizer`` with its vocoder one chunk behind on a worker thread; ``sink(chunk)`` receives every
    ``WaveChunk`` in order, on that thread. Use as a context manager (or call ``close``): the worker is joined.

    An exception in the vocoder or the sink (e.g. ``Interrupted`` after a cancel, a closed ring) stops delivery and
    is raised again by the next ``push`` / ``finish``. A ``StreamingDetokenizer.interrupt`` event stops both halves
    before their next network call."""

    def __init__(self, detokenizer: StreamingDetokenizer, sink: Callable[[WaveChunk], None]) -> None:
        self.detokenizer = detokenizer
        self.sink = sink
        self._jobs: "queue.Queue[Optional[MelChunk]]" = queue.Queue()
        self._error: Optional[BaseException] = None
        self._worker = threading.Thread(target=self._vocode_loop, name="kimia-vocoder", daemon=True)
        self._worker.start()

    def __enter__(self) -> "SynthesisPipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def push(self, tokens: Iterable[int]) -> None:
        """Buffers 12.5 Hz ids and runs the DiT of every chunk that can run; their vocoding is queued."""
        self._raise_worker_error()
        det = self.detokenizer
        for ids in det.runnable(tokens):
            self._jobs.put(det.dit_chunk(ids, is_final=False))
            self._raise_worker_error()

    def finish(self) -> None:
        """Runs the buffered tail as the final chunk, waits until every chunk was delivered, resets the
        detokenizer."""
        det = self.detokenizer
        try:
            self._raise_worker_error()
            tail = det.take_tail()
            if tail.size:
                self._jobs.put(det.dit_chunk(tail, is_final=True))
            self._jobs.join()
            self._raise_worker_error()
        finally:
            self._jobs.join()   # the worker must not touch the cross-fade state while reset() clears it
            det.reset()

    def close(self) -> None:
        """Stops the worker after the queued chunks (idempotent)."""
        if self._worker.is_alive():
            self._jobs.put(_STOP)
            self._worker.join()

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _vocode_loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is _STOP:
                    return
                if self._error is None:  # after an error, the remaining chunks are dropped
                    self.sink(self.detokenizer.vocode_chunk(job))
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc
            finally:
                self._jobs.task_done()
