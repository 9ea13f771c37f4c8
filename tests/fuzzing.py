"""Shared pieces of the fuzz targets (tests/runtime/test_fuzz.py, tests/test_fuzz_snapshot_configs.py): the
hypothesis settings (short runs by default; ``--slow`` or ``KIMIA_EDGE_FUZZ_EXAMPLES=N`` for long ones), byte
mutations and arbitrary JSON."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, List, Tuple

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("KIMIA_EDGE_FUZZ_EXAMPLES") or 40)
# short runs are derandomised (the same examples every run: CI does not flake); long runs explore
fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="KIMIA_EDGE_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def scratch_file(name: str, data: bytes) -> Path:
    """``data`` written as ``name`` in a new temporary folder (the caller removes the folder)."""
    folder = Path(tempfile.mkdtemp(prefix="kimia-fuzz-"))
    path = folder / name
    path.write_bytes(data)
    return path


def mutate(base: bytes, edits: List[Tuple[int, int]], cut: int) -> bytes:
    """``base`` with each (position modulo its length, byte) written, then ``cut`` bytes dropped from the end."""
    data = bytearray(base)
    for pos, value in edits:
        data[pos % len(data)] = value
    return bytes(data[: max(0, len(data) - cut)])


edits = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=8)
header_edits = st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=6)


def _containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    _containers, max_leaves=12)


def paths_of(value: Any, prefix: tuple = ()) -> List[tuple]:
    """Every key path inside a JSON document, the root () included."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths_of(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths_of(v, prefix + (i,))
    return out


def replaced(doc: Any, path: tuple, value: Any) -> Any:
    """A copy of ``doc`` with the value at ``path`` replaced by ``value``."""
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


