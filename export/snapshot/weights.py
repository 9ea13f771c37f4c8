"""Safetensors weights in the Hugging Face folder layout, read lazily: one ``model.safetensors``, or shards listed
by ``model.safetensors.index.json`` (``weight_map``: key -> shard file name).

``open_weights(folder)`` returns a ``LazyStateDict``: a read-only ``{key: tensor}`` mapping whose tensors are read
from their file when accessed (files opened once, on first use), so a 19 GB LLM snapshot costs nothing until a
tensor is asked for. The index is checked strictly against its shards: every entry must be in its shard and every
shard key must be in the index (so no key lives in two shards).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, Mapping, Tuple

import torch
from safetensors import safe_open

__all__ = ["LazyStateDict", "open_weights", "WEIGHTS_FILE", "INDEX_FILE"]

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class LazyStateDict(Mapping[str, torch.Tensor]):
    """key -> tensor read from its file on access; ``files`` maps every key to the safetensors file holding it."""

    def __init__(self, files: Mapping[str, Path]) -> None:
        self._files = {key: Path(path) for key, path in files.items()}
        self._handles: Dict[Path, object] = {}

    def _handle(self, key: str):
        path = self._files[key]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def shape(self, key: str) -> Tuple[int, ...]:
        """Shape of ``key`` without reading its data."""
        return tuple(self._handle(key).get_slice(key).get_shape())


def _keys(path: Path) -> set:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return set(f.keys())


def open_weights(folder: Path) -> LazyStateDict:
    """The weights of an HF model folder: index + shards if ``model.safetensors.index.json`` exists, else the single
    ``model.safetensors``. Raises FileNotFoundError (neither file, or a listed shard missing) or ValueError (an
    empty index, or index and shards that disagree), naming the file."""
    folder = Path(folder)
    index_path, single = folder / INDEX_FILE, folder / WEIGHTS_FILE
    if not index_path.is_file():
        if not single.is_file():
            raise FileNotFoundError(f"{folder}: neither {INDEX_FILE} nor {WEIGHTS_FILE} found")
        return LazyStateDict({key: single for key in sorted(_keys(single))})
    weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: expected a non-empty 'weight_map'")
    by_shard: Dict[str, set] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(key)
    for shard, keys in sorted(by_shard.items()):
        path = folder / shard
        if not path.is_file():
            raise FileNotFoundError(f"{index_path}: shard {shard} listed but missing")
        present = _keys(path)
        if keys - present:
            raise ValueError(f"{path}: index lists keys absent from the shard: {sorted(keys - present)[:8]}")
        if present - keys:
            raise ValueError(f"{path}: shard holds keys the index does not list: {sorted(present - keys)[:8]}")
    return LazyStateDict({key: folder / shard for key, shard in weight_map.items()})
