"""The one lazy safetensors reader (export/snapshot/weights.py) that the LLM, Whisper and GLM-4-Voice readers share:
single file or index + shards, strict index, tensors read on access."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kimia_edge.export.snapshot.audio_encoders import WHISPER_DIR, read_whisper_encoder, write_whisper_encoder
from kimia_edge.export.snapshot.weights import INDEX_FILE, WEIGHTS_FILE, open_weights


def _tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.randn(5, generator=g),
            "c.weight": torch.randn(2, 2, generator=g).to(torch.bfloat16)}


def _shard(folder: Path, tensors: dict, index: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    by_file: dict = {}
    for key, name in index.items():
        by_file.setdefault(name, {})[key] = tensors[key]
    for name, part in by_file.items():
        save_file(part, str(folder / name))
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": index}))


def test_single_file_and_shards_read_the_same_tensors(tmp_path: Path) -> None:
    tensors = _tensors()
    (tmp_path / "one").mkdir()
    save_file(tensors, str(tmp_path / "one" / WEIGHTS_FILE))
    _shard(tmp_path / "two", tensors, {"a.weight": "model-1-of-2.safetensors", "b.bias": "model-1-of-2.safetensors",
                                       "c.weight": "model-2-of-2.safetensors"})
    for folder in (tmp_path / "one", tmp_path / "two"):
        sd = open_weights(folder)
        assert sorted(sd) == sorted(tensors) and len(sd) == 3
        assert sd.shape("a.weight") == (3, 4)
        for key, value in tensors.items():
            assert sd[key].dtype == value.dtype and torch.equal(sd[key], value)


def test_index_must_agree_with_its_shards(tmp_path: Path) -> None:
    tensors = _tensors()
    _shard(tmp_path / "extra", tensors, {"a.weight": "s1.safetensors", "b.bias": "s1.safetensors",
                                         "c.weight": "s2.safetensors"})
    index = json.loads((tmp_path / "extra" / INDEX_FILE).read_text())
    del index["weight_map"]["b.bias"]  # still stored in s1: a key the index does not list
    (tmp_path / "extra" / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"s1.safetensors: shard holds keys the index does not list: \['b.bias'\]"):
        open_weights(tmp_path / "extra")
    _shard(tmp_path / "absent", {"a.weight": tensors["a.weight"]}, {"a.weight": "s1.safetensors"})
    index = {"weight_map": {"a.weight": "s1.safetensors", "b.bias": "s1.safetensors"}}
    (tmp_path / "absent" / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index lists keys absent from the shard: \['b.bias'\]"):
        open_weights(tmp_path / "absent")
    index["weight_map"]["b.bias"] = "s9.safetensors"
    (tmp_path / "absent" / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="shard s9.safetensors listed but missing"):
        open_weights(tmp_path / "absent")
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        open_weights(tmp_path / "none")


def test_sharded_whisper_folder_reads_like_the_single_file(tmp_path: Path) -> None:
    """The Whisper reader goes through the same map: a sharded copy of a written folder gives the same tensors."""
    write_whisper_encoder(tmp_path / "single", "tiny", seed=1)
    cfg, single = read_whisper_encoder(tmp_path / "single")
    keys = sorted(single)
    index = {k: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
             for i, k in enumerate(keys)}
    _shard(tmp_path / "sharded" / WHISPER_DIR, {k: single[k] for k in keys}, index)
    (tmp_path / "sharded" / WHISPER_DIR / "config.json").write_bytes(
        (tmp_path / "single" / WHISPER_DIR / "config.json").read_bytes())
    cfg2, sharded = read_whisper_encoder(tmp_path / "sharded")
    assert cfg2 == cfg and sorted(sharded) == keys
    assert all(torch.equal(sharded[k], single[k]) for k in keys)
