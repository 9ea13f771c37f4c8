"""Which ONNX Runtime graph fusions fire on an exported graph: op-type counts of the graph as written and of the
graph ONNX Runtime runs after its own optimisation (session option ``optimized_model_filepath``), on the CPU EP.

    python bench/ort_fusions.py GRAPH.onnx [GRAPH2.onnx ...] [--ort-opt-level all] [--markdown]

The fused ops ONNX Runtime can make on the CPU (onnxruntime/core/optimizer): LayerNormalization (LayerNormFusion),
com.microsoft Gelu / FastGelu / BiasGelu (GeluFusion, FastGeluFusion, BiasGeluFusion), SkipLayerNormalization,
Attention / MultiHeadAttention (AttentionFusion: BERT-style patterns only), FusedMatMul (MatMulScaleFusion and
transposes), Gemm (MatMulAddFusion, 2-D inputs only), DynamicQuantizeMatMul / MatMulIntegerToFloat (int8), BiasSoftmax.
Counting them in the optimised graph says which fired; the first table column is what the exporter wrote.
"""
from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path
from typing import Counter, Dict, List

FUSED_OPS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "Gelu", "FastGelu",
             "BiasGelu", "QuickGelu", "Attention", "MultiHeadAttention", "GroupQueryAttention", "FusedMatMul",
             "FusedGemm", "Gemm", "BiasSoftmax", "BiasAdd", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
             "MatMulNBits")
LEVELS = ("basic", "extended", "all")


def op_counts(path: Path) -> Counter[str]:
    """``domain:op`` (no domain for the default one) -> node count of the main graph (not loading external data)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                               for n in model.graph.node)


def optimized_counts(path: Path, level: str = "all") -> Counter[str]:
    """Op counts of the graph ONNX Runtime's CPU session runs after its graph optimisation at ``level``."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                       "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                       "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
        so.optimized_model_filepath = str(out)
        # external data of a large optimised graph goes beside it, in the temporary folder
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        return op_counts(out)


def fused(counts: Counter[str]) -> Dict[str, int]:
    return {op: n for op, n in sorted(counts.items()) if op.split(":")[-1] in FUSED_OPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="+", type=Path)
    parser.add_argument("--ort-opt-level", choices=LEVELS, default="all")
    args = parser.parse_args()
    rows: List[str] = []
    for path in args.graphs:
        before, after = op_counts(path), optimized_counts(path, args.ort_opt_level)
        print(f"\n{path}: {sum(before.values())} nodes as exported, {sum(after.values())} after ORT level "
              f"'{args.ort_opt_level}'")
        print("| op | as exported | ORT-optimised |\n|---|---:|---:|")
        for op in sorted(set(before) | set(after), key=lambda o: (-after.get(o, 0), o)):
            print(f"| {op} | {before.get(op, 0)} | {after.get(op, 0)} |")
        rows.append(f"{path.name}: fused ops {fused(after) or 'none'}")
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
