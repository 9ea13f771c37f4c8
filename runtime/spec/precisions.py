"""The precision registry: every numeric format an artifact of a bundle can have, and what each one means to the
exporter (how it is made, the error it may show to be listed), to TensorRT (builder flags) and to the runtime
(defaults per device, which graphs may use it). Adding a precision is one entry here plus the code that makes it
(``kimia_edge.quantization.variants``).

ONNX graphs: ``fp32`` is the export itself; the others are variants written by ONNX Runtime's tools.
LLM (GGUF): the base file is F32 or F16; the rest are llama.cpp quant type names, checked by llama.cpp.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

from .graphs import ONNX_GRAPHS

__all__ = ["OnnxPrecision", "ONNX_PRECISIONS", "PRECISION_NAMES", "onnx_precision", "precision_applies",
           "parse_precision_spec", "DEFAULT_EXPORT_PRECISIONS", "DEFAULT_PRECISION_SPEC", "INT8_DYNAMIC",
           "LLM_BASE_PRECISIONS", "LLM_PREFERENCE", "DEFAULT_LLM_QUANTS"]


@dataclass(frozen=True)
class OnnxPrecision:
    """One ONNX precision.

    ``tolerance_rel_l2``: largest relative L2 error a variant may show against the reference on held-out inputs (and
    speech-derived ones) for a bundle to list it; None for fp32, whose own parity tolerance is per graph. Set for
    random weights, a worst case: they catch a broken variant (wrong scales, a saturating kernel: rel L2 near 1),
    they do not grade a good one. Highest seen on tiny / small snapshots: fp16 9.4e-3, int8 dynamic 2.7e-2,
    int8 QDQ 6.4e-2 (docs/benchmarks.md); on the tiny snapshot's whisper encoder, adaptor and DiT step, calibrated on
    ../shared/audio: Percentile 3.0e-2, Entropy 3.6e-2, int4 MatMulNBits 0.13 (4 bits: hence its wider 0.3).
    ``needs_calibration``: made from calibration inputs derived from real speech.
    ``tensorrt``: None if TensorRT cannot build an engine from this variant, else the builder flags it needs.
    ``graphs``: the graphs it can be made of (None: every graph); the exporter and the study skip the others and
    the runtime opens them at fp32. A graph's own contract (``GraphContract.precisions``) may narrow it further.
    """

    name: str
    description: str
    tolerance_rel_l2: Optional[float]
    needs_calibration: bool = False
    tensorrt: Optional[Tuple[str, ...]] = None
    graphs: Optional[Tuple[str, ...]] = None


ONNX_PRECISIONS: Dict[str, OnnxPrecision] = {p.name: p for p in (
    OnnxPrecision("fp32", "the exported graph", None, tensorrt=()),
    OnnxPrecision("fp16", "fp16 weights and compute, fp32 I/O (a GPU format: ORT's CPU runs it in fp32 behind casts)",
                  3e-2, tensorrt=("FP16",)),
    OnnxPrecision("int8_dynamic", "int8 weights, activations quantized on the fly (CPU)", 0.15),
    OnnxPrecision("int8_qdq", "static int8 in QDQ form, calibrated on real speech (TensorRT explicit quantization)",
                  0.2, needs_calibration=True, tensorrt=("FP16", "INT8")),
    OnnxPrecision("int8_qdq_percentile", "int8_qdq with activation ranges at the 99.999th percentile of a histogram",
                  0.2, needs_calibration=True, tensorrt=("FP16", "INT8")),
    OnnxPrecision("int8_qdq_entropy", "int8_qdq with activation ranges of least KL divergence (histogram, entropy)",
                  0.2, needs_calibration=True, tensorrt=("FP16", "INT8")),
    # TensorRT takes int4 weights only as symmetric block-quantized DequantizeLinear (QDQ), not ORT's contrib
    # MatMulNBits: no engine from this variant. Only graphs whose weights sit in MatMuls: the adaptor is two Gemms
    # and the vocoder is convolutions, where it would quantize nothing.
    OnnxPrecision("int4_matmulnbits", "int4 weight-only MatMulNBits, blocks of 32, fp32 activations (CPU)", 0.3,
                  graphs=("whisper_encoder", "vq_encoder", "dit_step")),
)}
PRECISION_NAMES: Tuple[str, ...] = tuple(ONNX_PRECISIONS)
# What `kimia-edge export` makes when no --precision is given. The other calibrations and int4 are study variants,
# made when asked for (`--precision fp32 int8_qdq_entropy`), until a study on real weights shows one worth its time.
INT8_DYNAMIC = "int8_dynamic"  # the CPU int8 format: what per-block sensitivity quantizes one block with
INT8_QDQ = "int8_qdq"  # static int8, MinMax calibration (the QDQ variants are those with needs_calibration)
DEFAULT_EXPORT_PRECISIONS: Tuple[str, ...] = ("fp32", "fp16", INT8_DYNAMIC, INT8_QDQ)

# What the runtime opens when nothing is asked, per device, and why (docs/quantization.md, the study):
# - CPU: fp32 everywhere, the precision every parity test holds. Every other format measured costs error far above
#   the noise floor on every graph (small snapshot: int8_dynamic Whisper features rel L2 3.4e-2, DiT mel L1 2.3e-2,
#   int4 3-6x that; tiny: int8 flips ~5 % of the VQ encoder's semantic ids, the LLM's input). End to end,
#   `fp32,dit_step=int8_dynamic` stays inside the speech floor of another noise seed (small: MR-STFT 0.20 against
#   1.09, PESQ 4.55) and is the fastest CPU mix measured (docs/benchmarks.md): offered by name, not the default,
#   until a study of the real snapshot shows its error is inaudible (random weights cannot).
# - GPU: fp16 (untested on GPU).
DEFAULT_PRECISION_SPEC: Mapping[str, str] = {"cpu": "fp32", "gpu": "fp16"}

LLM_BASE_PRECISIONS: Tuple[str, ...] = ("F32", "F16")
# GGUF variants in the order the runtime prefers them when none is asked for: the smallest listed first.
LLM_PREFERENCE: Tuple[str, ...] = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16", "F32")
# Q4_K_M by default for size and speed (small snapshot: 238 MB against 360 for Q8_0; full size 5.8 GB, and a step is
# compute-bound at 2 threads: docs/llm.md). Its cost on the study's random weights, a worst case for quantizers:
# text / audio mean KLD 3.9e-2 / 0.21 against Q8_0's 5.0e-4 / 2.3e-3 (docs/quantization.md); `--llm-precision Q8_0`
# where memory allows. A study of the real snapshot decides whether it stays.
DEFAULT_LLM_QUANTS: Tuple[str, ...] = ("Q4_K_M",)


def onnx_precision(name: str) -> OnnxPrecision:
    """The registry entry ``name``; ValueError listing the known names otherwise."""
    try:
        return ONNX_PRECISIONS[name]
    except KeyError:
        raise ValueError(f"precision {name!r}: expected one of {PRECISION_NAMES}") from None


def precision_applies(precision: str, graph: str) -> bool:
    """Whether the registry's ``precision`` can be made of ``graph`` (its ``graphs`` rule)."""
    allowed = onnx_precision(precision).graphs
    return allowed is None or graph in allowed


def parse_precision_spec(spec: str, graphs: Sequence[str] = ONNX_GRAPHS) -> Dict[str, str]:
    """``"int8_dynamic"`` (every graph) or ``"fp32,dit_step=int8_dynamic"`` (a default, then per-graph choices)
    -> {graph: precision} for every graph in ``graphs``. ValueError names what is wrong."""
    chosen: Dict[str, str] = {}
    default = "fp32"
    for item in filter(None, (part.strip() for part in spec.split(","))):
        graph, _, precision = item.rpartition("=")
        onnx_precision(precision)
        if graph and graph not in graphs:
            raise ValueError(f"precision for {graph!r}: no such graph; graphs are {tuple(graphs)}")
        if graph:
            chosen[graph] = precision
        else:
            default = precision
    return {graph: chosen.get(graph, default) for graph in graphs}
