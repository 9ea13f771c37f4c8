"""``torch.topk(x, k)`` on the CPU, reproduced with numpy for a [V] vector, ties included (torch-free).

The official sampler picks its top-k ids with ``torch.topk``. For distinct values every implementation agrees;
for equal values at the k-th place (e.g. the zero probabilities of masked ids, or exactly equal logits) the ids
kept and their order come from the C++ standard library algorithm torch runs on the CPU
(aten/src/ATen/native/cpu/SortingKernel.cpp, ``topk_impl_loop``), which is not stable:

- ``k * 64 <= V``: ``std::partial_sort`` over (value, id) pairs in original order, comparator "greater"
  (NaN counts as greater than any number);
- otherwise ``std::nth_element`` at ``k - 1`` then ``std::sort`` of the first ``k - 1``, same comparator.

Both are ported here from GCC's libstdc++ (stl_heap.h, stl_algo.h), the library torch's Linux wheels use.
Measured equal to torch 2.13 on random vectors with many ties (tests/test_sampler_torch.py). The partial-sort path
simulates only the heap insertions (those are the elements greater than the heap's least), so it costs about
one pass over V in numpy plus a few dozen Python steps.
"""
from __future__ import annotations

import math
from typing import Callable, List

import numpy as np

__all__ = ["torch_cpu_topk"]

_Item = tuple  # (value as a Python float, id)
_Comp = Callable[[_Item, _Item], bool]


def _greater(a: _Item, b: _Item) -> bool:
    """torch's comparator for ``largest=True``: NaN first, then larger values."""
    return (math.isnan(a[0]) and not math.isnan(b[0])) or a[0] > b[0]


# ---- libstdc++ heap (stl_heap.h) ------------------------------------------------------------------------------------
def _push_heap(h: List[_Item], first: int, hole: int, top: int, value: _Item, comp: _Comp) -> None:
    parent = (hole - 1) // 2
    while hole > top and comp(h[first + parent], value):
        h[first + hole] = h[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    h[first + hole] = value


def _adjust_heap(h: List[_Item], first: int, hole: int, length: int, value: _Item, comp: _Comp) -> None:
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if comp(h[first + child], h[first + child - 1]):
            child -= 1
        h[first + hole] = h[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        h[first + hole] = h[first + child - 1]
        hole = child - 1
    _push_heap(h, first, hole, top, value, comp)


def _make_heap(h: List[_Item], first: int, last: int, comp: _Comp) -> None:
    length = last - first
    if length < 2:
        return
    parent = (length - 2) // 2
    while True:
        _adjust_heap(h, first, parent, length, h[first + parent], comp)
        if parent == 0:
            return
        parent -= 1


def _pop_heap(h: List[_Item], first: int, last: int, result: int, comp: _Comp) -> None:
    value = h[result]
    h[result] = h[first]
    _adjust_heap(h, first, 0, last - first, value, comp)


def _heap_select(h: List[_Item], first: int, middle: int, last: int, comp: _Comp) -> None:
    _make_heap(h, first, middle, comp)
    for i in range(middle, last):
        if comp(h[i], h[first]):
            _pop_heap(h, first, middle, i, comp)


def _sort_heap(h: List[_Item], first: int, last: int, comp: _Comp) -> None:
    while last - first > 1:
        last -= 1
        _pop_heap(h, first, last, last, comp)


# ---- libstdc++ introselect / introsort (stl_algo.h) ---------------------------------------------------------------
def _move_median_to_first(h: List[_Item], result: int, a: int, b: int, c: int, comp: _Comp) -> None:
    if comp(h[a], h[b]):
        pick = b if comp(h[b], h[c]) else (c if comp(h[a], h[c]) else a)
    elif comp(h[a], h[c]):
        pick = a
    elif comp(h[b], h[c]):
        pick = c
    else:
        pick = b
    h[result], h[pick] = h[pick], h[result]


def _unguarded_partition_pivot(h: List[_Item], first: int, last: int, comp: _Comp) -> int:
    mid = first + (last - first) // 2
    _move_median_to_first(h, first, first + 1, mid, last - 1, comp)
    lo, hi, pivot = first + 1, last, h[first]
    while True:
        while comp(h[lo], pivot):
            lo += 1
        hi -= 1
        while comp(pivot, h[hi]):
            hi -= 1
        if not lo < hi:
            return lo
        h[lo], h[hi] = h[hi], h[lo]
        lo += 1


def _unguarded_linear_insert(h: List[_Item], last: int, comp: _Comp) -> None:
    value = h[last]
    prev = last - 1
    while comp(value, h[prev]):
        h[last] = h[prev]
        last = prev
        prev -= 1
    h[last] = value


def _insertion_sort(h: List[_Item], first: int, last: int, comp: _Comp) -> None:
    if first == last:
        return
    for i in range(first + 1, last):
        if comp(h[i], h[first]):
            value = h[i]
            h[first + 1:i + 1] = h[first:i]
            h[first] = value
        else:
            _unguarded_linear_insert(h, i, comp)


def _lg(n: int) -> int:
    return n.bit_length() - 1


def _nth_element(h: List[_Item], first: int, nth: int, last: int, comp: _Comp) -> None:
    if first == last or nth == last:
        return
    depth = _lg(last - first) * 2
    while last - first > 3:
        if depth == 0:
            _heap_select(h, first, nth + 1, last, comp)
            h[first], h[nth] = h[nth], h[first]
            return
        depth -= 1
        cut = _unguarded_partition_pivot(h, first, last, comp)
        if cut <= nth:
            first = cut
        else:
            last = cut
    _insertion_sort(h, first, last, comp)


_SORT_THRESHOLD = 16


def _introsort_loop(h: List[_Item], first: int, last: int, depth: int, comp: _Comp) -> None:
    while last - first > _SORT_THRESHOLD:
        if depth == 0:
            _heap_select(h, first, last, last, comp)
            _sort_heap(h, first, last, comp)
            return
        depth -= 1
        cut = _unguarded_partition_pivot(h, first, last, comp)
        _introsort_loop(h, cut, last, depth, comp)
        last = cut


def _sort(h: List[_Item], first: int, last: int, comp: _Comp) -> None:
    if first == last:
        return
    _introsort_loop(h, first, last, _lg(last - first) * 2, comp)
    if last - first > _SORT_THRESHOLD:
        _insertion_sort(h, first, first + _SORT_THRESHOLD, comp)
        for i in range(first + _SORT_THRESHOLD, last):
            _unguarded_linear_insert(h, i, comp)
    else:
        _insertion_sort(h, first, last, comp)


# ---- torch.topk ------------------------------------------------------------------------------------------------
def _partial_sort_topk(x: np.ndarray, k: int) -> List[_Item]:
    """``std::partial_sort(first, first + k, last, greater)``: only the insertions into the k-heap are simulated;
    the elements it skips (not greater than the heap's least) never change the first k."""
    heap: List[_Item] = [(float(v), i) for i, v in enumerate(x[:k])]
    _make_heap(heap, 0, k, _greater)
    nan = np.isnan(x)
    pos, n, block = k, x.shape[0], 4096
    while pos < n:
        least = heap[0][0]
        if math.isnan(least):
            break  # nothing is greater than a NaN at the root
        end = min(pos + block, n)
        hits = np.flatnonzero((x[pos:end] > least) | nan[pos:end])
        if hits.size == 0:
            pos = end
            continue
        i = pos + int(hits[0])
        item = (float(x[i]), i)
        if _greater(item, heap[0]):  # __pop_heap(first, middle, i): the least leaves, x[i] enters
            _adjust_heap(heap, 0, 0, k, item, _greater)
        pos = i + 1
    _sort_heap(heap, 0, k, _greater)
    return heap


def torch_cpu_topk(values: np.ndarray, k: int) -> np.ndarray:
    """The ids ``torch.topk(torch.from_numpy(values), k).indices`` returns on the CPU for a [V] float vector
    (``largest=True, sorted=True``), in the same order. Raises ValueError for ``k`` outside 1..V."""
    x = np.asarray(values)
    if x.ndim != 1:
        raise ValueError(f"values: expected [V], got shape {x.shape}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k}: expected 1..{n}")
    if k * 64 <= n:
        items = _partial_sort_topk(x, k)
    else:
        items = [(float(v), i) for i, v in enumerate(x)]
        _nth_element(items, 0, k - 1, n, _greater)
        _sort(items, 0, k - 1, _greater)
    return np.array([i for _, i in items[:k]], dtype=np.int64)
