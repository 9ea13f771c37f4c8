"""A part of the pipeline that is opened when first needed and can be released again (low-memory mode).

    encoders = OnDemand("audio encoders", open_encoders)   # nothing opened yet
    encoders.get().encode(clip)                             # opens (maps the graphs) on first use
    encoders.release()                                      # drops this holder's reference: freed once unused

``release`` only drops the holder's reference; the sessions are freed when the last user lets go (a running turn
keeps its detokenizer until it ends). It then hands the freed heap back to the system (``heap.trim_heap``: glibc's
``malloc_trim``; nothing elsewhere). The next ``get`` opens them again from the bundle.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Generic, Optional, TypeVar

from kimia_edge.runtime import heap

log = logging.getLogger(__name__)

T = TypeVar("T")


class OnDemand(Generic[T]):
    """``get()`` opens the part with ``opener()`` once and returns it until ``release()``. Thread-safe."""

    def __init__(self, name: str, opener: Callable[[], T]) -> None:
        self.name = name
        self._opener = opener
        self._value: Optional[T] = None
        self._lock = threading.Lock()
        self.opened = 0  # how many times the part was opened (1 in the default mode)

    @property
    def is_open(self) -> bool:
        return self._value is not None

    def get(self) -> T:
        with self._lock:
            if self._value is None:
                start = time.perf_counter()
                self._value = self._opener()
                self.opened += 1
                log.info("%s opened in %.2f s", self.name, time.perf_counter() - start)
            return self._value

    def release(self) -> None:
        """Drops the part; if it was open, the memory it freed goes back to the system (glibc ``malloc_trim``)."""
        with self._lock:
            value, self._value = self._value, None
        if value is None:
            return
        del value  # the sessions are freed here unless a running turn still holds them
        log.info("%s released (heap %s)", self.name, "trimmed" if heap.trim_heap() else "not trimmed")
