"""Precision variants of an exported fp32 ONNX graph, written by ONNX Runtime's own tools:

- ``fp16``: ``onnxruntime.transformers.float16`` with fp32 I/O kept (a GPU format: on CPU ONNX Runtime inserts
  casts and runs fp32, so only its numerics are measured here);
- ``int8_dynamic``: ``quantize_dynamic``, activations quantized on the fly. Weights int8 per output channel with
  a 7-bit range (``reduce_range``: ORT's u8s8 kernels cannot saturate on CPUs without VNNI and take the VNNI
  path where it exists: DiT step 2.1x eager torch on an AVX-512-VNNI EPYC vs 1.6x with uint8 weights), or, for
  conv graphs (``signed_weights=False``), uint8 per tensor: ORT's ConvInteger with int8 weights ran the small
  vocoder 2.3x slower than with uint8;
- ``int8_qdq``: ``quantize_static`` in QDQ format, calibrated on inputs from real speech; int8 weights per
  channel with a reduced range, uint8 activations. TensorRT builds int8 engines from these scales.

A graph whose weights live in an external-data file (``<graph>.onnx.data``, graphs over 2 GB) gets variants
written the same way, since protobuf cannot hold more than 2 GiB in one file.

Each variant's error against the reference is measured by the caller (``export/exporter.py``) and stored in
the manifest. The names, tolerances and TensorRT flags of the precisions are the registry's
(``kimia_edge.runtime.spec.precisions``); this module is how they are made: ``to_<precision>(src, dst, calibration,
signed_weights)`` for each registry entry but fp32."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

from kimia_edge.export.fileio import external_data_file
from kimia_edge.runtime.spec.precisions import onnx_precision

log = logging.getLogger(__name__)

# Ops whose weights int8 quantization touches; Conv covers the vocoder and the Whisper front convs.
_QUANT_OPS = ["MatMul", "Gemm", "Conv"]


class _FeedReader:
    """onnxruntime.quantization.CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: Sequence[Dict[str, np.ndarray]]) -> None:
        self._it: Iterator[Dict[str, np.ndarray]] = iter(list(feeds))

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._it, None)


def to_fp16(src: Path, dst: Path, calibration: Optional[List[Dict[str, np.ndarray]]] = None,
            signed_weights: bool = True) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    large = external_data_file(src).exists()
    # onnx shape inference works on a serialised proto: impossible over 2 GiB, so it is skipped there (the
    # converter then keeps fp32 where it cannot tell a tensor's type, which only costs casts)
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=large)
    if large:
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


def to_int8_qdq(src: Path, dst: Path, calibration: Optional[Iterable[Dict[str, np.ndarray]]] = None,
               signed_weights: bool = True) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    feeds = list(calibration or [])
    if not feeds:
        raise ValueError(f"{src.name}: static int8 needs calibration inputs, got none")
    quantize_static(
        str(src), str(dst), _FeedReader(feeds),
        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        per_channel=True, reduce_range=True, op_types_to_quantize=_QUANT_OPS,
        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external_data_file(src).exists(),
    )
    return dst


def make_variant(precision: str, src: Path, dst: Path, calibration: Optional[List[Dict[str, np.ndarray]]] = None,
                 signed_weights: bool = True) -> Path:
    """Writes the ``precision`` variant of the fp32 graph ``src`` to ``dst`` (``signed_weights``: int8_dynamic only)."""
    maker = globals().get(f"to_{onnx_precision(precision).name}")
    if maker is None:
        raise ValueError(f"no maker to_{precision}() in {__name__} (fp32 is the export itself)")
    return maker(src, dst, calibration, signed_weights)
