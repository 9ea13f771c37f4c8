"""What two artifacts of a bundle both state is compared when a pipeline opens it, and a mismatch is refused with
an error naming both values: the token offset (manifest vs LLM GGUF), the streaming schedule vs the frames the DiT
step and vocoder graphs were profiled for, and the special ids vs the LLM's vocabulary."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from kimia_edge.runtime.pipeline import Pipeline, PipelineOptions
from kimia_edge.runtime.spec.manifest import BundleError


def _edited_copy(bundle: Path, tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    edit(raw)
    (copy / "manifest.json").write_text(json.dumps(raw))
    return copy


def test_token_offset_of_manifest_and_gguf_must_agree(tiny_bundle: Path, tmp_path: Path) -> None:
    def edit(raw: dict) -> None:
        raw["model"]["llm"]["kimia_token_offset"] -= 1
    bundle = _edited_copy(tiny_bundle, tmp_path, edit)
    with pytest.raises(BundleError, match=r"token offset: the manifest says 152063, the LLM GGUF .*llm_trunk.gguf says 152064"):
        Pipeline.from_bundle(bundle, PipelineOptions(text_only=True))


def test_a_schedule_beyond_the_graph_profiles_is_refused(tiny_bundle: Path) -> None:
    with pytest.raises(BundleError, match="needs 528 frames per dit_step call .* allows at most 512"):
        Pipeline.from_bundle(tiny_bundle, PipelineOptions(streaming={"first_chunk_tokens": 120}))
    # within the profiles: a 10-token first chunk (earlier first audio) opens
    assert Pipeline.from_bundle(tiny_bundle, PipelineOptions(streaming={"first_chunk_tokens": 10})) is not None


def test_special_ids_must_lie_in_the_llm_vocabulary(tiny_bundle: Path, tmp_path: Path) -> None:
    def edit(raw: dict) -> None:
        raw["model"]["special_tokens"]["pad"] = 10**7
    bundle = _edited_copy(tiny_bundle, tmp_path, edit)
    with pytest.raises(BundleError, match=r"special ids \{'pad': 10000000\} lie outside the LLM's vocabulary of \d+ \(llm/Q8_0/llm_trunk.gguf\)"):
        Pipeline.from_bundle(bundle, PipelineOptions(text_only=True))


@pytest.mark.parametrize("options, message", [
    (PipelineOptions(device="gpu"), "device: expected one of"),
    (PipelineOptions(threads=0), "threads: expected 1..1024"),
    (PipelineOptions(precision="fp32,dit=int8_dynamic"), "no such graph"),
    (PipelineOptions(streaming={"chunk_size": 3}), r"streaming: unknown field\(s\) \['chunk_size'\]"),
])
def test_bad_options_are_refused_before_anything_opens(options: PipelineOptions, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        Pipeline.from_bundle(tmp_path, options)  # not a bundle: the options are checked first
