"""Strict checkpoint loading: every key a module expects must be present with its shape, and every key
the file holds must be expected or explicitly ignorable. Errors name the keys."""
from __future__ import annotations

import fnmatch
from typing import Iterable, Mapping

import torch


class CheckpointError(ValueError):
    """A checkpoint does not match the module that should load it. The message names the offending keys."""


def _preview(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_strict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    ignore: Iterable[str] = (),
) -> None:
    """Loads ``state_dict`` into ``module`` with exact key and shape matching.

    ``ignore`` holds fnmatch patterns of keys the official files are known to carry but the math does not use
    (e.g. ``*.rotary_emb.inv_freq``); they are dropped on purpose, nothing else is. ``source`` names the file or
    folder in error messages. Tensors are copied into the module's own dtype.
    """
    patterns = tuple(ignore)
    kept = {k: v for k, v in state_dict.items() if not any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    expected = module.state_dict()
    missing = expected.keys() - kept.keys()
    unexpected = kept.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    bad_shapes = [
        f"{k} {tuple(kept[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(expected.keys() & kept.keys())
        if tuple(kept[k].shape) != tuple(expected[k].shape)
    ]
    if bad_shapes:
        problems.append(f"shape mismatches: {_preview(bad_shapes)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match {type(module).__name__}; " + "; ".join(problems))
    module.load_state_dict(kept, strict=True)
