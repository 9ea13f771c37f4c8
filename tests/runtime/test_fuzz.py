"""Fuzz targets (hypothesis) for every run-time reader of untrusted bytes. Each reader either returns a valid result
or raises its documented error — AudioFileError, BundleError (ArtifactOpenError for artifacts) — never anything
else, never a crash or a hang:

- audio files through ``frontend.load_audio`` (random bytes, valid WAVs with mutated headers and bodies),
- ``manifest.json`` through ``bundle.read_manifest`` (random bytes, random JSON, a real manifest with parts replaced),
- tokenizer files through ``TextTokenizer.from_snapshot`` (random ``tiktoken.model`` lines, a real
  ``tokenizer_config.json`` with parts replaced),
- GGUF metadata through ``llm_llamacpp.open_gguf`` + ``read_model_info`` and ``FeatureAdaptor`` (real files with
  bytes of their header and metadata changed).

Short runs here (a few dozen examples per target, well under 30 s in all); ``--slow`` or
``KIMIA_EDGE_FUZZ_EXAMPLES=N`` for long runs. Snapshot config readers: tests/test_fuzz_snapshot_configs.py.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np
import pytest
import soundfile as sf
from fuzzing import mutate, paths_of, replaced, scratch_file, edits, fuzz, header_edits, json_values
from hypothesis import given
from hypothesis import strategies as st

from kimia_edge.runtime import frontend as fe
from kimia_edge.runtime.bundle import ArtifactOpenError, read_manifest
from kimia_edge.runtime.spec.manifest import BundleError

# ---- audio files ------------------------------------------------------------------------------------------------
def _wav(channels: int = 2, frames: int = 800, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    data = (0.2 * np.sin(np.arange(frames * channels) * 0.01)).reshape(frames, channels)
    sf.write(buf, data, 16_000, format="WAV", subtype=subtype)
    return buf.getvalue()


WAVS = [_wav(), _wav(1, 500, "FLOAT"), _wav(3, 300, "PCM_U8")]


def _check_audio(path: Path) -> None:
    try:
        samples, rate = fe.load_audio(path)
    except fe.AudioFileError as e:
        assert str(path) in str(e)
        return
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
    assert samples.dtype == np.float32 and samples.ndim == 1 and samples.size > 0
    assert fe.MIN_INPUT_RATE_HZ <= rate <= fe.MAX_INPUT_RATE_HZ


@fuzz
@given(st.binary(max_size=2048))
def test_fuzz_audio_random_bytes(data: bytes) -> None:
    _check_audio(scratch_file("x.wav", data))


@fuzz
@given(st.sampled_from(range(len(WAVS))), header_edits, edits, st.integers(0, 600))
def test_fuzz_audio_mutated_wav(which: int, head: list, body: list, cut: int) -> None:
    _check_audio(scratch_file("x.wav", mutate(mutate(WAVS[which], head, 0), body, cut)))


@fuzz
@given(channels=st.integers(0, 70_000), rate=st.integers(0, 2**32 - 1), bits=st.sampled_from([0, 8, 16, 24, 32, 64, 7]),
       fmt=st.sampled_from([1, 3, 0, 0xFFFE, 6, 7]), declared=st.integers(0, 2**32 - 1), body=st.binary(max_size=512))
def test_fuzz_audio_wav_header_fields(channels: int, rate: int, bits: int, fmt: int, declared: int, body: bytes) -> None:
    block = max(1, channels * bits // 8) & 0xFFFF
    fmt_chunk = struct.pack("<HHIIHH", fmt, channels & 0xFFFF, rate, (rate * block) & 0xFFFFFFFF, block, bits)
    data = (b"RIFF" + struct.pack("<I", 36 + len(body)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt_chunk
            + b"data" + struct.pack("<I", declared) + body)
    _check_audio(scratch_file("x.wav", data))


# ---- manifest.json ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_manifest(tiny_bundle: Path) -> dict:
    return json.loads((tiny_bundle / "manifest.json").read_text())


def _check_manifest(text: bytes) -> None:
    folder = Path(tempfile.mkdtemp(prefix="kimia-fuzz-"))
    (folder / "manifest.json").write_bytes(text)
    try:
        read_manifest(folder)
    except BundleError as e:
        assert "\n" not in str(e).strip() or "failed verification" in str(e)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@fuzz
@given(st.binary(max_size=1024))
def test_fuzz_manifest_random_bytes(data: bytes) -> None:
    _check_manifest(data)


@fuzz
@given(json_values)
def test_fuzz_manifest_random_json(value: Any) -> None:
    _check_manifest(json.dumps(value).encode())


@fuzz
@given(st.data())
def test_fuzz_manifest_real_one_with_parts_replaced(real_manifest: dict, data: st.DataObject) -> None:
    doc = real_manifest
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths_of(doc)))
        doc = replaced(doc, path, data.draw(json_values))
    _check_manifest(json.dumps(doc).encode())


# ---- tokenizer files ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tiny_bundle: Path) -> Path:
    return tiny_bundle / "tokenizer"


def _check_tokenizer(source: Path, tiktoken: bytes, config: bytes) -> None:
    from kimia_edge.runtime.text_tokenizer import TextTokenizer

    folder = Path(tempfile.mkdtemp(prefix="kimia-fuzz-"))
    try:
        for f in source.iterdir():
            shutil.copy(f, folder / f.name)
        (folder / "tiktoken.model").write_bytes(tiktoken)
        (folder / "tokenizer_config.json").write_bytes(config)
        try:
            tok = TextTokenizer.from_snapshot(folder)
        except ArtifactOpenError as e:
            assert str(folder) in str(e)
            return
        assert tok.decode(tok.encode("hello, 世界")) == "hello, 世界"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


tiktoken_lines = st.lists(st.one_of(
    st.tuples(st.binary(min_size=1, max_size=6), st.integers(-5, 400)).map(
        lambda t: __import__("base64").b64encode(t[0]) + b" " + str(t[1]).encode()),
    st.binary(max_size=20)), max_size=30)


@fuzz
@given(tiktoken_lines, st.booleans())
def test_fuzz_tokenizer_ranks(tokenizer_dir: Path, lines: List[bytes], keep_bytes: bool) -> None:
    real = (tokenizer_dir / "tiktoken.model").read_bytes()
    body = (real if keep_bytes else b"") + b"\n".join(lines)
    _check_tokenizer(tokenizer_dir, body, (tokenizer_dir / "tokenizer_config.json").read_bytes())


@fuzz
@given(st.data())
def test_fuzz_tokenizer_config(tokenizer_dir: Path, data: st.DataObject) -> None:
    doc = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    short = {k: v for k, v in doc.items() if k != "added_tokens_decoder"}
    short["added_tokens_decoder"] = dict(list(doc["added_tokens_decoder"].items())[:6])  # paths to pick from stay few
    path = data.draw(st.sampled_from(paths_of(short)))
    text = json.dumps(replaced(short, path, data.draw(json_values))).encode()
    if data.draw(st.booleans()):
        text = mutate(text, data.draw(edits), 0)
    _check_tokenizer(tokenizer_dir, (tokenizer_dir / "tiktoken.model").read_bytes(), text)


# ---- GGUF metadata ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_heads(tiny_bundle: Path) -> dict:
    """The real adaptor GGUF (small) and the trunk's metadata region with a few KB of its tensor data."""
    import gguf

    trunk = next(tiny_bundle.glob("llm/*/llm_trunk.gguf"))
    adaptor = next(tiny_bundle.glob("llm/*/llm_adaptor.gguf"))
    reader = gguf.GGUFReader(str(trunk))
    return {"trunk": trunk.read_bytes(), "adaptor": adaptor.read_bytes(),
            "trunk_meta_end": int(min(t.data_offset for t in reader.tensors))}


def _check_gguf(data: bytes, role: str) -> None:
    from kimia_edge.runtime.llm_llamacpp import FeatureAdaptor, open_gguf, read_model_info

    path = scratch_file(f"{role}.gguf", data)
    try:
        if role == "trunk":
            info = read_model_info(open_gguf(path), str(path))
            assert info.hidden_size > 0 and info.context_length > 0
        else:
            adaptor = FeatureAdaptor(path, 1e-5)
            assert adaptor.w1.ndim == 2
    except ArtifactOpenError as e:
        assert str(path) in str(e) or "GGUF" in str(e) or "expected" in str(e)
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


@fuzz
@given(st.data())
def test_fuzz_gguf_trunk_metadata(gguf_heads: dict, data: st.DataObject) -> None:
    end = gguf_heads["trunk_meta_end"]
    changes = data.draw(st.lists(st.tuples(st.integers(0, end - 1), st.integers(0, 255)), min_size=1, max_size=6))
    _check_gguf(mutate(gguf_heads["trunk"], changes, 0), "trunk")


@fuzz
@given(st.data())
def test_fuzz_gguf_adaptor(gguf_heads: dict, data: st.DataObject) -> None:
    base = gguf_heads["adaptor"]
    changes = data.draw(st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), min_size=1, max_size=6))
    _check_gguf(mutate(base, changes, data.draw(st.integers(0, 64))), "adaptor")


@fuzz
@given(st.binary(max_size=512))
def test_fuzz_gguf_random_bytes(data: bytes) -> None:
    _check_gguf(b"GGUF" + data, "trunk")
