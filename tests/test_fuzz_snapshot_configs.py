"""Fuzz targets (hypothesis) for the snapshot's configuration readers: the tiny snapshot's own files with values
replaced by arbitrary JSON (or YAML) and with bytes changed. Each reader returns a configuration that validates or
raises ValueError naming the file — never another exception. Short runs here; ``--slow`` or
``KIMIA_EDGE_FUZZ_EXAMPLES=N`` for long ones (see tests/runtime/test_fuzz.py for the run-time readers)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from kimia_edge.export.snapshot.detokenizer import read_detokenizer_config
from kimia_edge.runtime.audio_encoder_config import FeatureExtractorConfig, VQEncoderConfig, WhisperEncoderConfig
from kimia_edge.runtime.llm_config import KimiaConfig
from kimia_edge.runtime.vocoder_config import VocoderConfig
from fuzzing import mutate, paths_of, replaced, edits, fuzz, json_values

# file inside the snapshot -> reader of the snapshot copy
READERS: Dict[str, Callable[[Path], Any]] = {
    "config.json": lambda snap: KimiaConfig.from_snapshot(snap),
    "whisper-large-v3/config.json": lambda snap: WhisperEncoderConfig.from_json(snap / "whisper-large-v3/config.json"),
    "whisper-large-v3/preprocessor_config.json":
        lambda snap: FeatureExtractorConfig.from_json(snap / "whisper-large-v3/preprocessor_config.json"),
    "glm-4-voice-tokenizer/config.json": lambda snap: VQEncoderConfig.from_folder(snap / "glm-4-voice-tokenizer"),
    "glm-4-voice-tokenizer/preprocessor_config.json":
        lambda snap: VQEncoderConfig.from_folder(snap / "glm-4-voice-tokenizer"),
    "vocoder/config.json": lambda snap: VocoderConfig.from_json(snap / "vocoder/config.json"),
    "audio_detokenizer/config.yaml": read_detokenizer_config,
}


@pytest.fixture(scope="module")
def originals(tiny_snapshot: Path) -> Dict[str, bytes]:
    return {name: (tiny_snapshot / name).read_bytes() for name in READERS}


def _snapshot_with(originals: Dict[str, bytes], name: str, data: bytes) -> Path:
    """A temporary folder holding the snapshot's config files, ``name`` with ``data`` instead of its own."""
    snap = Path(tempfile.mkdtemp(prefix="kimia-fuzz-"))
    for other, content in {**originals, name: data}.items():
        (snap / other).parent.mkdir(parents=True, exist_ok=True)
        (snap / other).write_bytes(content)
    return snap


def _check(name: str, data: bytes, originals: Dict[str, bytes]) -> None:
    snap = _snapshot_with(originals, name, data)
    try:
        try:
            cfg = READERS[name](snap)
        except ValueError as e:
            assert str(snap) in str(e) or "Config" in str(e) or "config" in str(e), e
            return
        cfg.validate()
    finally:
        shutil.rmtree(snap, ignore_errors=True)


def _load(name: str, data: bytes) -> Any:
    return yaml.safe_load(data) if name.endswith(".yaml") else json.loads(data)


def _dump(name: str, doc: Any) -> bytes:
    return (yaml.safe_dump(doc) if name.endswith(".yaml") else json.dumps(doc)).encode()


@fuzz
@given(st.sampled_from(sorted(READERS)), st.data())
def test_fuzz_config_values_replaced(originals: Dict[str, bytes], name: str, data: st.DataObject) -> None:
    doc = _load(name, originals[name])
    for _ in range(data.draw(st.integers(1, 3))):
        doc = replaced(doc, data.draw(st.sampled_from(paths_of(doc))), data.draw(json_values))
    _check(name, _dump(name, doc), originals)


@fuzz
@given(st.sampled_from(sorted(READERS)), edits, st.integers(0, 200))
def test_fuzz_config_bytes_changed(originals: Dict[str, bytes], name: str, changes: list, cut: int) -> None:
    _check(name, mutate(originals[name], changes, cut), originals)


# What the fuzz targets found (each raised TypeError or an unnamed JSON error before): regressions.
@pytest.mark.parametrize("name, edit, message", [
    ("whisper-large-v3/config.json", ("max_source_positions", {}), "malformed configuration .TypeError"),
    ("whisper-large-v3/config.json", ("encoder_ffn_dim", [1]), "malformed configuration .TypeError"),
    ("glm-4-voice-tokenizer/config.json", ("max_source_positions", {}), "malformed configuration .TypeError"),
    ("vocoder/config.json", ("resblock_dilation_sizes", [[{}]]), "malformed configuration .TypeError"),
    ("config.json", ("hidden_size", "16"), "KimiaConfig"),
    ("config.json", None, "config.json: not valid JSON text"),
    ("audio_detokenizer/config.yaml", None, "config.yaml: not valid YAML"),
])
def test_malformed_config_values_are_value_errors(originals: Dict[str, bytes], name: str, edit, message: str) -> None:
    import re

    if edit is None:
        data = b"\x80" + originals[name]  # not UTF-8
    else:
        doc = _load(name, originals[name])
        doc[edit[0]] = edit[1]
        data = _dump(name, doc)
    snap = _snapshot_with(originals, name, data)
    try:
        with pytest.raises(ValueError) as raised:
            READERS[name](snap)
        assert re.search(message, str(raised.value)), raised.value
    finally:
        shutil.rmtree(snap, ignore_errors=True)
