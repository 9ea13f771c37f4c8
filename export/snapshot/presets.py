"""The size presets of generated snapshots, defined once (torch-free: ``export/cli.py`` imports it for
``kimia-edge snapshot make --size`` on a runtime-only install).

- ``tiny``: the official-fixture geometry (a few MB; every test runs on it),
- ``small``: the full depth and structure, a few times narrower (benchmarks, int8 studies),
- ``full``: the official dimensions (reference doc §1–§3).

Each writer keeps its own per-size dimensions in a table keyed by these names and reads it through ``preset``,
which rejects an unknown size and a table that does not cover exactly ``SIZES``.
"""
from __future__ import annotations

from typing import Mapping, TypeVar

__all__ = ["SIZES", "check_size", "preset"]

SIZES = ("tiny", "small", "full")

T = TypeVar("T")


def check_size(size: str) -> str:
    """Returns ``size`` if it is one of ``SIZES``; otherwise raises ValueError naming the choices."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {SIZES}, got {size!r}")
    return size


def preset(size: str, table: Mapping[str, T]) -> T:
    """``table[size]`` for a table keyed by exactly ``SIZES`` (ValueError for an unknown size or a table with
    missing or extra sizes)."""
    if set(table) != set(SIZES):
        raise ValueError(f"size preset table: expected keys {SIZES}, got {tuple(table)}")
    return table[check_size(size)]
