"""The static int8 calibrations (Percentile, Entropy) and int4 weight-only MatMulNBits variants of
quantization/variants.py on tiny graphs: parity against the torch reference within the registry's tolerance, the
kernels ONNX Runtime's CPU runs, and the registry's rule on which graphs a precision applies to. One tiny graph per
new precision by default; every graph each one applies to, and the export CLI, with --slow."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from kimia_edge.export.fileio import graph_files
from kimia_edge.export.graphs import graph_spec
from kimia_edge.export.graphs.base import compare, export_graph, run_onnx, run_torch
from kimia_edge.quantization.variants import INT4_BLOCK, make_variant
from kimia_edge.runtime.sessions import open_file_session
from kimia_edge.runtime.spec.graphs import ONNX_GRAPHS
from kimia_edge.runtime.spec.precisions import ONNX_PRECISIONS, parse_precision_spec, precision_applies
from kimia_edge.quantization.study.spec import StudyVariant, parse_variants

HISTOGRAM = ("int8_qdq_percentile", "int8_qdq_entropy")
INT4 = "int4_matmulnbits"


@pytest.fixture(scope="module")
def graphs(tiny_snapshot: Path, tmp_path_factory: pytest.TempPathFactory):
    """name -> (spec, torch module, fp32 ONNX path), exported on first use."""
    out, cache = tmp_path_factory.mktemp("variants"), {}

    def get(name: str):
        if name not in cache:
            spec = graph_spec(name)
            module = spec.build(tiny_snapshot)
            cache[name] = (spec, module, export_graph(spec, module, out / f"{name}.fp32.onnx").path)
        return cache[name]
    return get


def _feeds(spec, module, seed: int) -> List[Dict[str, np.ndarray]]:
    """Seeded inputs at every parity length (so of different shapes) as feed dicts."""
    return [{n: t.numpy() for n, t in zip(spec.input_names, spec.example_inputs(module, n_, seed + i))}
            for i, n_ in enumerate(spec.parity_lengths)]


def _variant_error(graphs, name: str, precision: str, tmp_path: Path):
    """(variant path, worst error over held-out inputs) of ``precision`` made of graph ``name``."""
    spec, module, fp32 = graphs(name)
    path = make_variant(precision, fp32, tmp_path / f"{name}.{precision}.onnx", _feeds(spec, module, 0),
                        spec.int8_dynamic_signed_weights)
    errors = [compare(spec, run_onnx(path, spec, x), run_torch(module, x))
              for x in (spec.example_inputs(module, n, 100 + i) for i, n in enumerate(spec.parity_lengths))]
    return path, max(errors, key=lambda e: e.rel_l2)


def _activation_scales(path: Path) -> Dict[str, float]:
    """{activation: scale of the QuantizeLinear that quantizes it} (the calibrated range / 255)."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


@pytest.mark.parametrize("precision", HISTOGRAM)
def test_histogram_calibration_on_the_adaptor(graphs, precision: str, tmp_path: Path) -> None:
    """Calibrated on inputs of two lengths (ORT's histogram calibrators cannot stack those: one feed at a time),
    within the registry's tolerance, and the activation range is the method's, not MinMax's."""
    path, err = _variant_error(graphs, "adaptor", precision, tmp_path)
    assert 0 < err.rel_l2 <= ONNX_PRECISIONS[precision].tolerance_rel_l2, err
    spec, module, fp32 = graphs("adaptor")
    minmax = make_variant("int8_qdq", fp32, tmp_path / "adaptor.int8_qdq.onnx", _feeds(spec, module, 0))
    got, ref = _activation_scales(path), _activation_scales(minmax)
    assert got.keys() == ref.keys() and got != pytest.approx(ref, rel=1e-3), (precision, got, ref)
    if precision == "int8_qdq_percentile":
        assert got["features"] < ref["features"]  # the 99.999th percentile clips the extremes MinMax keeps


def test_int4_matmulnbits_on_the_dit_step(graphs, tmp_path: Path) -> None:
    """Every MatMul with a constant weight becomes a 4-bit MatMulNBits with blocks of 32; the file shrinks; the
    runtime's CPU session runs it within the registry's tolerance."""
    path, err = _variant_error(graphs, "dit_step", INT4, tmp_path)
    assert 0 < err.rel_l2 <= ONNX_PRECISIONS[INT4].tolerance_rel_l2, err
    spec, module, fp32 = graphs("dit_step")
    src, got = onnx.load(str(fp32)), onnx.load(str(path))
    weights = {t.name for t in src.graph.initializer}
    const_matmuls = [n for n in src.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    nbits = [n for n in got.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(const_matmuls) > 0
    assert all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["block_size"] == INT4_BLOCK
               and {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["bits"] == 4 for n in nbits)
    size = lambda g: sum(f.stat().st_size for f in graph_files(g))  # noqa: E731  (.onnx + .onnx.data)
    assert size(path) < 0.6 * size(fp32)
    x = spec.example_inputs(module, spec.parity_lengths[0], seed=7)
    out = open_file_session(path, threads=1).run({n: t.numpy() for n, t in zip(spec.input_names, x)})
    np.testing.assert_allclose(out[0], run_onnx(path, spec, x)[0], rtol=1e-4, atol=1e-5)  # other session options


def test_int4_refuses_a_graph_without_matmul_weights(graphs, tmp_path: Path) -> None:
    _, _, fp32 = graphs("adaptor")  # two Gemms: nothing for MatMulNBits
    with pytest.raises(ValueError, match="no MatMul with a constant weight"):
        make_variant(INT4, fp32, tmp_path / "adaptor.int4.onnx")


def test_registry_rule_on_which_graphs_a_precision_applies_to() -> None:
    assert [g for g in ONNX_GRAPHS if precision_applies(INT4, g)] == ["whisper_encoder", "vq_encoder", "dit_step"]
    assert all(precision_applies(p, g) for p in HISTOGRAM for g in ONNX_GRAPHS)
    assert ONNX_PRECISIONS[INT4].tensorrt is None  # TensorRT has no MatMulNBits (int4 only as block-quantized QDQ)
    assert all(ONNX_PRECISIONS[p].tensorrt == ("FP16", "INT8") and ONNX_PRECISIONS[p].needs_calibration
               for p in HISTOGRAM)
    default = parse_variants(None)
    assert StudyVariant("dit_step", INT4) in default and StudyVariant("vocoder", INT4) not in default
    assert {v.component for v in parse_variants(INT4)} == {"whisper_encoder", "vq_encoder", "dit_step"}
    with pytest.raises(ValueError, match="makes int4_matmulnbits of whisper_encoder, vq_encoder, dit_step only"):
        parse_variants("vocoder=int4_matmulnbits")
    assert parse_precision_spec(f"fp32,dit_step={INT4}")["dit_step"] == INT4


@pytest.mark.slow
@pytest.mark.parametrize("name,precision", [(g, p) for p in (*HISTOGRAM, INT4) for g in ONNX_GRAPHS
                                            if precision_applies(p, g)])
def test_every_new_variant_within_its_tolerance(graphs, name: str, precision: str, tmp_path: Path) -> None:
    _, err = _variant_error(graphs, name, precision, tmp_path)
    assert 0 < err.rel_l2 <= ONNX_PRECISIONS[precision].tolerance_rel_l2, (name, precision, err)


@pytest.mark.slow
def test_export_cli_makes_the_new_precisions(tiny_snapshot: Path, shared_audio: Path, tmp_path: Path) -> None:
    """`kimia-edge export --precision`: int4 listed for the DiT step with its measured error, not made of the
    vocoder (convolutions); the histogram calibrations listed for both."""
    from kimia_edge.cli import main
    from kimia_edge.runtime.bundle import load_bundle

    out = tmp_path / "bundle"
    assert main(["export", "--snapshot", str(tiny_snapshot), "--out", str(out), "--graphs", "dit_step", "vocoder",
                 "--precision", "fp32", *HISTOGRAM, INT4, "--calibration-audio", str(shared_audio / "qa_example.wav"),
                 "--no-llm"]) == 0
    have = {(a.name, a.precision) for a in load_bundle(out).artifacts}
    assert {("dit_step", p) for p in (*HISTOGRAM, INT4)} | {("vocoder", p) for p in HISTOGRAM} <= have
    assert ("vocoder", INT4) not in have
    err = load_bundle(out).artifact("dit_step", INT4).error
    assert 0 < err["rel_l2"] <= err["tolerance_rel_l2"] == ONNX_PRECISIONS[INT4].tolerance_rel_l2
