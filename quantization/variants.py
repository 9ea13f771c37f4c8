"""Precision variants of an exported fp32 ONNX graph, written by ONNX Runtime's own tools:

- ``fp16``: ``onnxruntime.transformers.float16`` with fp32 I/O kept (a GPU format: on CPU ONNX Runtime inserts
  casts and runs fp32, so only its numerics are measured here);
- ``int8_dynamic``: ``quantize_dynamic``, activations quantized on the fly. Weights int8 per output channel with
  a 7-bit range (``reduce_range``: ORT's u8s8 kernels cannot saturate on CPUs without VNNI and take the VNNI
  path where it exists: DiT step 2.1x eager torch on an AVX-512-VNNI EPYC vs 1.6x with uint8 weights), or, for
  conv graphs (``signed_weights=False``), uint8 per tensor: ORT's ConvInteger with int8 weights ran the small
  vocoder 2.3x slower than with uint8;
- ``int8_qdq``, ``int8_qdq_percentile``, ``int8_qdq_entropy``: ``quantize_static`` in QDQ format, calibrated on
  inputs from real speech; int8 weights per channel with a reduced range, uint8 activations. They differ only in
  how an activation's range is chosen: MinMax (the extremes seen), Percentile (ORT's histogram of 2048 bins, the
  99.999th percentile: a few outliers no longer stretch the scale) or Entropy (the threshold whose quantized
  histogram is closest in KL divergence to the 128-bin one). TensorRT builds int8 engines from these scales;
- ``int4_matmulnbits``: weight-only int4 (``matmul_nbits_quantizer``): every MatMul with a constant 2-D weight
  becomes a ``com.microsoft.MatMulNBits`` with symmetric blocks of 32 input rows, one fp32 scale each (4 bits +
  1 bit of scale per weight, like llama.cpp's Q4_0), activations and compute stay fp32. 32, not ORT's default 128:
  on the tiny graphs 128 showed 8-19 % more error, 16 10 % less for one more bit per weight (docs/quantization.md).
  Gemm and Conv stay fp32, so only MatMul graphs are listed for it in the registry.

Graphs keep their weights in an external-data file (``<graph>.onnx.data``, memory-mapped by ONNX Runtime); each
variant is written the same way (over 2 GiB there is no other way: protobuf holds at most 2 GiB in one file).

Each variant's error against the reference is measured by the caller (``export/exporter.py``) and stored in
the manifest. The names, tolerances and TensorRT flags of the precisions are the registry's
(``kimia_edge.runtime.spec.precisions``); this module is how they are made: ``to_<precision>(src, dst, calibration,
signed_weights)`` for each registry entry but fp32."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

from kimia_edge.export.fileio import external_data_file, unshared_graph
from kimia_edge.runtime.spec.precisions import onnx_precision

log = logging.getLogger(__name__)

# Ops whose weights int8 quantization touches; Conv covers the vocoder and the Whisper front convs.
_QUANT_OPS = ["MatMul", "Gemm", "Conv"]
PROTOBUF_LIMIT_BYTES = 2**31  # one serialised ModelProto, weights included


class _FeedReader:
    """onnxruntime.quantization.CalibrationDataReader over a list of feed dicts; ``set_range`` lets
    ``quantize_static`` (``CalibStridedMinMax``) calibrate on a slice at a time."""

    def __init__(self, feeds: Sequence[Dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._it: Iterator[Dict[str, np.ndarray]] = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._feeds[start_index:end_index])

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._it, None)


def to_fp16(src: Path, dst: Path, calibration: Optional[List[Dict[str, np.ndarray]]] = None,
            signed_weights: bool = True) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    data = external_data_file(src)
    # onnx shape inference works on a serialised proto: impossible over 2 GiB, so it is skipped there (the
    # converter then keeps fp32 where it cannot tell a tensor's type, which only costs casts)
    over_2gib = data.exists() and data.stat().st_size > PROTOBUF_LIMIT_BYTES
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=over_2gib)
    if data.exists():
        onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=external_data_file(dst).name)
    else:
        onnx.save(model, str(dst))
    return dst


def to_int8_dynamic(src: Path, dst: Path, calibration: Optional[List[Dict[str, np.ndarray]]] = None,
                    signed_weights: bool = True) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weights = dict(weight_type=QuantType.QInt8, per_channel=True, reduce_range=True) if signed_weights \
        else dict(weight_type=QuantType.QUInt8)
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=_QUANT_OPS,
                     use_external_data_format=external_data_file(src).exists(), **weights)
    return dst


def _static_int8(src: Path, dst: Path, calibration: Optional[Iterable[Dict[str, np.ndarray]]],
                 method_name: str) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    feeds = list(calibration or [])
    if not feeds:
        raise ValueError(f"{src.name}: static int8 needs calibration inputs, got none")
    method = CalibrationMethod[method_name]
    # ORT's calibrators keep every activation of every feed before reducing them: on the small snapshot's Whisper
    # encoder MinMax grew to 7.5 GB (OOM-killed), and the histogram ones cannot stack feeds of different lengths.
    # One feed at a time: min / max merge exactly, the histograms merge between feeds.
    one_at_a_time = {"CalibStridedMinMax": 1}
    quantize_static(
        str(src), str(dst), _FeedReader(feeds),
        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        per_channel=True, reduce_range=True, op_types_to_quantize=_QUANT_OPS,
        calibrate_method=method, use_external_data_format=external_data_file(src).exists(),
        extra_options=one_at_a_time,
    )
    return dst


def to_int8_qdq(src: Path, dst: Path, calibration: Optional[Iterable[Dict[str, np.ndarray]]] = None,
               signed_weights: bool = True) -> Path:
    return _static_int8(src, dst, calibration, "MinMax")


def to_int8_qdq_percentile(src: Path, dst: Path, calibration: Optional[Iterable[Dict[str, np.ndarray]]] = None,
                           signed_weights: bool = True) -> Path:
    return _static_int8(src, dst, calibration, "Percentile")


def to_int8_qdq_entropy(src: Path, dst: Path, calibration: Optional[Iterable[Dict[str, np.ndarray]]] = None,
                        signed_weights: bool = True) -> Path:
    return _static_int8(src, dst, calibration, "Entropy")


INT4_BLOCK = 32  # input rows per int4 scale (see the module doc)


def to_int4_matmulnbits(src: Path, dst: Path, calibration: Optional[Iterable[Dict[str, np.ndarray]]] = None,
                        signed_weights: bool = True) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=INT4_BLOCK, is_symmetric=True)
    quantizer.process()
    if not any(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node):
        raise ValueError(f"{src.name}: int4_matmulnbits found no MatMul with a constant weight to quantize")
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=external_data_file(src).exists())
    return dst


def make_variant(precision: str, src: Path, dst: Path, calibration: Optional[List[Dict[str, np.ndarray]]] = None,
                 signed_weights: bool = True) -> Path:
    """Writes the ``precision`` variant of the fp32 graph ``src`` to ``dst`` (``signed_weights``: int8_dynamic only)."""
    maker = globals().get(f"to_{onnx_precision(precision).name}")
    if maker is None:
        raise ValueError(f"no maker to_{precision}() in {__name__} (fp32 is the export itself)")
    with unshared_graph(src) as readable:
        return maker(readable, dst, calibration, signed_weights)
