"""Giving freed heap back to the system after a large release (low-memory mode frees whole ONNX Runtime sessions).

glibc's ``free`` returns memory to the system only from the top of a heap (and whole ``mmap``-ed chunks); the freed
weights and activations of a session often sit below other live allocations and stay resident until the process
calls ``malloc_trim``, which also releases the free pages in the middle of every arena. Elsewhere (macOS, musl,
Windows, an allocator without it) ``trim_heap`` does nothing and says so by returning False: it never raises.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import time
from typing import Callable, Iterator, Optional

log = logging.getLogger(__name__)


def _libc_names() -> Iterator[Optional[str]]:
    """The process's own symbols first; libc by name only if those lack it (find_library may run ldconfig)."""
    yield None
    try:
        name = ctypes.util.find_library("c")
    except Exception:  # noqa: BLE001 - it shells out to ldconfig / gcc on some systems
        return
    if name:
        yield name


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim`` of this process, or None where the C library has none."""
    for name in _libc_names():
        try:
            libc = ctypes.CDLL(name)
        except (OSError, TypeError):  # TypeError: CDLL(None) on Windows
            continue
        fn = getattr(libc, "malloc_trim", None)  # a missing symbol is an AttributeError: None here
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            return fn
    return None


def can_trim_heap() -> bool:
    """True where ``trim_heap`` can hand memory back (glibc's ``malloc_trim`` is there)."""
    return _malloc_trim() is not None


def trim_heap() -> bool:
    """``malloc_trim(0)``: hands the free pages of every malloc arena back to the system. True if it released any
    memory; False if none was free or there is no ``malloc_trim`` here (never raises)."""
    fn = _malloc_trim()
    if fn is None:
        return False
    start = time.perf_counter()
    try:
        released = bool(fn(0))
    except Exception as exc:  # noqa: BLE001 - a memory optimisation must never fail a turn
        log.debug("malloc_trim failed: %s", exc)
        return False
    log.debug("malloc_trim(0) in %.1f ms: %s", 1e3 * (time.perf_counter() - start),
              "memory released" if released else "nothing to release")
    return released
