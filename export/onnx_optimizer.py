"""The optimisation every exported ONNX graph gets: onnxscript's optimizer, the one ``torch.onnx.export(...,
optimize=True)`` runs (``onnxscript.optimizer.optimize_ir``), less its rewrite rules whose pattern has more than one
output node.

onnxscript matches such a pattern by brute force: for every node of the graph, whatever its op, it first indexes
every node of the graph by op type and then tries each combination (``onnxscript/rewriter/_matcher.py``,
``SimplePatternMatcher.match``), so one such rule costs O(N²) per rewrite round. Its one default rule of that kind,
SlicesSplit (two Slices halving a static last axis -> one Split), took ~25 of the ~50 s that optimize_ir spent on
the tiny vocoder (~8 000 nodes after folding, ~3 900 in the second round) and fired on none of our graphs. Every
other pass and rule, and their order, are optimize_ir's, so the graphs come out the same
(tests/test_onnx_optimizer.py).
"""
from __future__ import annotations

from typing import List

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding

# optimize_ir's default number of fold + rewrite rounds (stops early when a round changes nothing)
ROUNDS = 2


def single_output_node_rules() -> List[rewriter.RewriteRule]:
    """onnxscript's default rewrite rules whose pattern ends in one node (matched from that node, linear time)."""
    return [r for r in rewriter._DEFAULT_REWRITE_RULES if r._target_pattern.has_single_output_node]


def optimize_graph(model: ir.Model) -> None:
    """In place: folds constants, applies ``single_output_node_rules``, removes what is unused, lifts constants to
    (deduplicated) initializers, eliminates common subexpressions — optimize_ir's sequence."""
    rounds = ir.passes.PassManager(
        [
            _constant_folding.FoldConstantsPass(
                shape_inference=True,
                input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
            ),
            rewriter.RewritePass(single_output_node_rules()),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.RemoveUnusedFunctionsPass(),
            common_passes.RemoveUnusedOpsetsPass(),
        ],
        steps=ROUNDS,
        early_stop=True,
    )
    ir.passes.Sequential(
        common_passes.InlinePass(),
        rounds,
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )(model)
