"""Mixed GGUFs per tensor group (quantization/gguf_mix.py) on the session bundle's F16 and Q8_0 LLM files: an
assembly whose every tensor comes from one source gives that source's logits exactly through the runtime backend;
one layer from Q8_0 changes only that layer's tensors and the logits; the exporter's mix spec (llama.cpp's
tensor-type overrides) writes the same bytes as the assembly of the same groups."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from kimia_edge.export.gguf_quantize import QUANT_TYPES, quantize_llm
from kimia_edge.quantization.gguf_mix import (ROLES, MixOverride, assemble_llm, differing_groups, parse_mix,
                                              tensor_group)
from kimia_edge.runtime.spec.gguf import FILES


def test_parse_mix():
    m = parse_mix("Q4_K_M+trunk.blk.0-3=Q8_0+audio.output=F16+token_embd=F32", tuple(QUANT_TYPES))
    assert m.base == "Q4_K_M"
    assert m.overrides == (MixOverride("trunk", "blk.0-3", "Q8_0"), MixOverride("audio", "output", "F16"),
                           MixOverride(None, "token_embd", "F32"))
    assert m.text == "Q4_K_M+trunk.blk.0-3=Q8_0+audio.output=F16+token_embd=F32"
    assert m.type_for("trunk", "blk.2") == "Q8_0" and m.type_for("trunk", "blk.4") is None
    assert m.type_for("audio", "blk.2") is None and m.type_for("audio", "token_embd") == "F32"
    assert [p for p, _ in m.tensor_types("trunk")] == [r"^token_embd\.", r"^blk\.(0|1|2|3)\."]
    assert tensor_group("blk.12.ffn_down.weight") == "blk.12" and tensor_group("output_norm.weight") == "output_norm"
    for bad, why in (("Q9_K+blk.0=F16", "base"), ("Q4_K_M+blk.0", "SCOPE=TYPE"), ("Q4_K_M+blk.0=Q9", "ggml tensor"),
                     ("Q4_K_M+blk.3-1=F16", "empty layer range"), ("Q4_K_M+mimo.blk.0=F16", "SCOPE=TYPE")):
        with pytest.raises(ValueError, match=why):
            parse_mix(bad, tuple(QUANT_TYPES))


@pytest.fixture(scope="module")
def sources(tiny_bundle):
    """The bundle's F16 and Q8_0 LLM folders (Q8_0 was quantized from F16: the same model) and the adaptor."""
    llm = Path(tiny_bundle) / "llm"
    f16, q8 = llm / "f16", llm / "Q8_0"
    if not (f16 / FILES["trunk"]).exists():
        pytest.skip(f"the session bundle has no F16 LLM at {f16}")
    return f16, q8


def _logits(files, adaptor) -> np.ndarray:
    from kimia_edge.runtime.llm_llamacpp import LlamaCppBackend

    rng = np.random.default_rng(0)
    with LlamaCppBackend(files["trunk"], files["audio"], adaptor, n_ctx=64, n_threads=1, exact=True) as be:
        reader = gguf.GGUFReader(str(files["trunk"]))
        offset = int(reader.fields["kimia.token_offset"].contents())
        vocab = int(reader.fields["kimia.vocab_size"].contents())
        audio, text = rng.integers(offset, vocab, 10), rng.integers(1, offset, 10)
        rows = [np.concatenate(be.prefill(audio, text, None, np.zeros(10, bool)))]
        for i in range(4):
            rows.append(np.concatenate(be.step(int(audio[i]), int(text[i]))))
    return np.stack(rows)


def _tensors(path: Path) -> dict:
    return {t.name: (t.tensor_type, t.data.tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


def test_assembly_from_one_source_is_that_source(sources, tmp_path):
    f16, q8 = sources
    adaptor = f16 / FILES["adaptor"]
    for i, src in enumerate((f16, q8)):
        mixed = assemble_llm([f16, q8], lambda role, group, i=i: i, tmp_path / f"all{i}")
        src_files = {r: src / FILES[r] for r in ROLES}
        for role in ROLES:
            assert _tensors(mixed[role]) == _tensors(src_files[role])
        np.testing.assert_array_equal(_logits(mixed, adaptor), _logits(src_files, adaptor))


def test_one_layer_quantized_changes_only_that_layer(sources, tmp_path):
    f16, q8 = sources
    groups = differing_groups(f16, q8)
    assert ("trunk", "blk.1") in groups
    mixed = assemble_llm([f16, q8], lambda role, group: int((role, group) == ("trunk", "blk.1")), tmp_path / "m")
    a, b = _tensors(mixed["trunk"]), _tensors(f16 / FILES["trunk"])
    changed = {n for n in a if a[n] != b[n]}
    assert changed and {tensor_group(n) for n in changed} == {"blk.1"}
    assert _tensors(mixed["audio"]) == _tensors(f16 / FILES["audio"])
    adaptor = f16 / FILES["adaptor"]
    base = _logits({r: f16 / FILES[r] for r in ROLES}, adaptor)
    got = _logits(mixed, adaptor)
    assert np.isfinite(got).all() and not np.array_equal(got, base)
    assert np.abs(got - base).max() < np.abs(base).max()  # a perturbation, not garbage


def test_exported_mix_equals_assembly(sources, tmp_path):
    f16, q8 = sources
    spec = "Q8_0+trunk.blk.1=F16+audio.blk.0=F16"
    exported = quantize_llm(f16, tmp_path / "exported", spec)
    mix = parse_mix(spec, tuple(QUANT_TYPES))
    assembled = assemble_llm([f16, q8], lambda role, group: 0 if mix.type_for(role, group) else 1, tmp_path / "a")
    for role in ROLES:
        assert _tensors(exported[role]) == _tensors(assembled[role]), role
    with pytest.raises(ValueError, match="not a quant type"):
        quantize_llm(f16, tmp_path / "bad", "Q9+blk.0=F16")


def test_export_refuses_a_bad_mix_before_any_work(tiny_snapshot, tmp_path):
    from kimia_edge.export.exporter import export_bundle

    with pytest.raises(ValueError, match="not a ggml tensor type"):
        export_bundle(tiny_snapshot, tmp_path / "b", llm_quants=("Q4_K_M+blk.0=Q9",))
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_bundle_with_a_mix_verifies_and_opens(tiny_snapshot, tmp_path):
    """Heavy (an export): a bundle exported with a mix lists it as an LLM precision, verifies, and its files open in
    the runtime's llama.cpp backend with the overridden layer at its type."""
    from kimia_edge.export.exporter import export_bundle
    from kimia_edge.runtime.bundle import load_bundle, verify_bundle
    from kimia_edge.runtime.spec.graphs import llm_artifact

    spec = "Q8_0+trunk.blk.1=F32"
    out = export_bundle(tiny_snapshot, tmp_path / "b", precisions=("fp32",), graphs=("adaptor",),
                        llm_precision="f16", llm_quants=(spec,))
    assert verify_bundle(out) == []
    manifest = load_bundle(out)
    trunk, audio = (out / manifest.artifact(llm_artifact(r), spec).path for r in ROLES)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(trunk)).tensors}
    assert {types[n] for n in types if n.startswith("blk.1.")} == {"F32"}
    adaptor = out / manifest.artifact(llm_artifact("adaptor"), "F16").path
    assert np.isfinite(_logits({"trunk": trunk, "audio": audio}, adaptor)).all()
