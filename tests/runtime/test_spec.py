"""The contract between build time and run time (runtime/spec): precision specs, the registries, the chunk
geometry, and that its names are spelled nowhere else in the package."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from kimia_edge.runtime.spec import gguf, graphs, precisions
from kimia_edge.runtime.spec.streaming import (StreamingConfig, check_schedule_fits, dit_frames_max, frames_profile,
                                               vocoder_frames_max)

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("runtime", "export", "quantization", "src")


def test_precision_spec_per_graph_and_bad_names() -> None:
    runtime_graphs = graphs.RUNTIME_GRAPHS
    assert precisions.parse_precision_spec("int8_dynamic", runtime_graphs) == dict.fromkeys(runtime_graphs, "int8_dynamic")
    assert precisions.parse_precision_spec("fp32,dit_step=int8_dynamic", runtime_graphs) == {
        "whisper_encoder": "fp32", "vq_encoder": "fp32", "dit_step": "int8_dynamic", "vocoder": "fp32"}
    with pytest.raises(ValueError, match="no such graph"):
        precisions.parse_precision_spec("dit=int8_dynamic")
    with pytest.raises(ValueError, match="'int4'"):
        precisions.parse_precision_spec("int4")


def test_registries_hold_together() -> None:
    assert set(graphs.RUNTIME_GRAPHS) <= set(graphs.ONNX_GRAPHS)
    for g in graphs.GRAPHS.values():
        assert g.precisions is None or set(g.precisions) <= set(precisions.PRECISION_NAMES)
    assert precisions.ONNX_PRECISIONS["fp32"].tolerance_rel_l2 is None
    assert all(p.tolerance_rel_l2 for n, p in precisions.ONNX_PRECISIONS.items() if n != "fp32")
    assert precisions.ONNX_PRECISIONS["int8_dynamic"].tensorrt is None  # TensorRT has no dynamic quantization
    assert set(gguf.FILES) == set(graphs.LLM_ROLES) and graphs.llm_artifact("trunk") == graphs.LLM_TRUNK


def test_chunk_geometry_of_the_official_schedule() -> None:
    official = StreamingConfig()
    assert dit_frames_max(official) == 168 and vocoder_frames_max(official) == 252
    assert frames_profile(official, "dit_step") == (4, 168, 512)
    check_schedule_fits(official, 168, 252)
    grown = StreamingConfig(first_chunk_tokens=10, chunk_growth_tokens=10, max_chunk_tokens=60)
    assert dit_frames_max(grown) == (60 + 12) * 4 and frames_profile(grown, "dit_step")[2] == 512
    with pytest.raises(ValueError, match="needs 288 frames per dit_step call .* allows at most 200"):
        check_schedule_fits(grown, 200, 1000)
    huge = StreamingConfig(chunk_tokens=200)
    assert frames_profile(huge, "vocoder")[2] == vocoder_frames_max(huge) > 512  # the exporter widens the profile


def _quoted_everywhere(names: list) -> dict:
    """{name: [files outside runtime/spec that spell it as a string literal]}."""
    found = {}
    for folder in PACKAGE_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            if "spec" in path.relative_to(REPO).parts[:2]:
                continue
            text = path.read_text(encoding="utf-8")
            for name in names:
                if re.search(rf"[\"']{re.escape(name)}[\"']", text):
                    found.setdefault(name, []).append(str(path.relative_to(REPO)))
    return found


def test_contract_names_are_spelled_only_in_the_spec() -> None:
    names = [*gguf.KIMIA_KEYS.values(), *gguf.ADAPTOR_TENSORS, *gguf.FILES.values(), gguf.ADAPTOR_ARCH,
             graphs.VQ_CODEBOOK, graphs.TEXT_TOKENIZER, graphs.LLM_TRUNK, graphs.LLM_AUDIO, graphs.LLM_ADAPTOR,
             "int8_dynamic", "int8_qdq"]
    assert _quoted_everywhere(names) == {}
