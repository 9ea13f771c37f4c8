"""runtime/heap.py: ``trim_heap`` never fails anywhere, does nothing without ``malloc_trim``, and on glibc hands
freed heap pages back to the system (what low-memory mode relies on after freeing its sessions)."""
from __future__ import annotations

import ctypes

import pytest

from kimia_edge.runtime import heap
from kimia_edge.runtime.metrics import proc_status

MIB = 2**20


def test_trim_heap_returns_a_bool_and_never_raises() -> None:
    assert isinstance(heap.trim_heap(), bool)
    assert isinstance(heap.can_trim_heap(), bool)


def test_without_malloc_trim_it_is_a_clean_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS, musl, Windows: no ``malloc_trim`` symbol, or no C library ``CDLL`` can open."""

    class NoTrim:  # a C library without the symbol: ctypes raises AttributeError for it
        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)

    for fake in (lambda name: NoTrim(), lambda name: (_ for _ in ()).throw(OSError("no libc"))):
        monkeypatch.setattr(ctypes, "CDLL", fake)
        heap._malloc_trim.cache_clear()
        try:
            assert not heap.can_trim_heap() and heap.trim_heap() is False
        finally:
            heap._malloc_trim.cache_clear()
    monkeypatch.undo()
    heap._malloc_trim.cache_clear()


@pytest.mark.skipif(not heap.can_trim_heap() or "RssAnon" not in proc_status(),
                    reason="no glibc malloc_trim or no /proc/self/status here: nothing to hand back or to measure")
def test_freed_heap_between_live_allocations_goes_back_to_the_system() -> None:
    """64 MiB of 4 kB heap blocks, one in 16 kept alive: ``free`` cannot return the holes between them (only the
    top of a heap), ``malloc_trim`` returns their whole pages. Measured: 63 MiB held after the free, 8 after the
    trim (glibc 2.36)."""
    blocks = [b"x" * 4000 + bytes([i % 256]) for i in range(16384)]  # > 512 bytes: malloc, not pymalloc
    kept = blocks[::16]
    del blocks
    before = proc_status()["RssAnon"]
    assert heap.trim_heap() is True
    after = proc_status()["RssAnon"]
    assert before - after >= 32 * MIB, f"RssAnon {before / MIB:.0f} -> {after / MIB:.0f} MiB"
    assert len(kept) == 1024
