"""export/onnx_optimizer.py: the exporter's optimisation (onnxscript's optimize_ir) minus the brute-force-matched
rewrite rules — the same graph, at linear cost."""
from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
ir = pytest.importorskip("onnx_ir")

from onnxscript import optimizer, rewriter  # noqa: E402

from kimia_edge.export.onnx_optimizer import optimize_graph, single_output_node_rules  # noqa: E402
from kimia_edge.export.reference.bigvgan import Activation1d, SnakeBeta  # noqa: E402


def test_rules_are_the_defaults_less_those_matched_by_brute_force() -> None:
    kept = single_output_node_rules()
    assert kept and all(r._target_pattern.has_single_output_node for r in kept)
    left_out = [r.name for r in rewriter._DEFAULT_REWRITE_RULES if r not in kept]
    assert "SlicesSplit" in left_out  # the one that took half of the tiny vocoder's export
    assert len(kept) + len(left_out) == len(rewriter._DEFAULT_REWRITE_RULES)


class _TwoActivations(torch.nn.Module):
    """The vocoder's repeated block twice on one input (the shape arithmetic of both is common subexpressions)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a, self.b = (Activation1d(SnakeBeta(channels, logscale=True)) for _ in range(2))
        for act in (self.a, self.b):
            act.freeze_phase_filters(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_same_graph_as_the_exporters_optimizer() -> None:
    """Anti-aliased SnakeBeta activations (constants derived from parameters, edge slices, views with a dynamic
    length) come out byte for byte as optimize_ir makes them."""
    x = torch.randn(1, 4, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_TwoActivations(4).eval(), (x,), dynamic_shapes=({2: torch.export.Dim("frames", min=4, max=64)},),
                                    opset_version=18, dynamo=True, optimize=False, verbose=False)
    proto = ir.serde.serialize_model(program.model)
    ours, theirs = ir.serde.deserialize_model(proto), ir.serde.deserialize_model(proto)
    optimize_graph(ours)
    optimizer.optimize_ir(theirs)
    assert len(ours.graph) < len(proto.graph.node)  # it did optimise
    assert ir.serde.serialize_model(ours).SerializeToString() == ir.serde.serialize_model(theirs).SerializeToString()
