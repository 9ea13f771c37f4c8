"""One class per exported graph. A ``GraphSpec`` owns what is particular to its graph — the torch module to
export (built from a snapshot), its I/O names, dynamic axes, seeded example inputs, TensorRT profile shapes,
and the lengths and tolerances of its parity check — and ``export_graph`` does the rest the same way for all:
torch's ONNX exporter, onnxscript's optimizer (``export/onnx_optimizer.py``), ``onnx.checker``, a run in ONNX
Runtime, and parity against the torch module at several shapes."""
from __future__ import annotations

import gc
import logging
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from kimia_edge.export.fileio import graph_files
from kimia_edge.export.onnx_optimizer import optimize_graph
from kimia_edge.runtime.spec.graphs import GRAPHS, GraphContract
from kimia_edge.runtime.spec.manifest import ShapeProfile
from kimia_edge.runtime.spec.precisions import ONNX_PRECISIONS

if TYPE_CHECKING:
    from kimia_edge.export.reference.pipeline import GoldenPipeline

log = logging.getLogger(__name__)

OPSET = 18


@dataclass
class CalibrationContext:
    """What a graph may calibrate on: real speech clips (16 kHz mono) and, built on first use, the golden pipeline
    of the snapshot being exported (to turn speech into the inputs later graphs see: features, tokens, mel)."""

    snapshot: Path
    speech_16k: List[np.ndarray]
    _pipeline: Optional["GoldenPipeline"] = None

    def pipeline(self) -> "GoldenPipeline":
        if self._pipeline is None:
            from kimia_edge.export.reference.pipeline import GoldenPipeline

            self._pipeline = GoldenPipeline(self.snapshot)
        return self._pipeline


@dataclass(frozen=True)
class ErrorStats:
    """Error of an output against the reference: max |a-b| and ||a-b|| / ||b||."""

    max_abs: float
    rel_l2: float

    @classmethod
    def of(cls, got: np.ndarray, ref: np.ndarray) -> "ErrorStats":
        got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
        if got64.shape != ref64.shape:
            raise ValueError(f"shape mismatch: got {got64.shape}, reference {ref64.shape}")
        diff = got64 - ref64
        return cls(float(np.abs(diff).max(initial=0.0)), float(np.linalg.norm(diff) / max(np.linalg.norm(ref64), 1e-30)))

    def worst(self, other: "ErrorStats") -> "ErrorStats":
        return ErrorStats(max(self.max_abs, other.max_abs), max(self.rel_l2, other.rel_l2))

    def within(self, tol: "ErrorStats") -> bool:
        return self.max_abs <= tol.max_abs and self.rel_l2 <= tol.rel_l2


class GraphSpec(ABC):
    """Subclasses set the class attributes and implement ``build`` and ``example_inputs``."""

    name: str  # a key of the graph registry (kimia_edge.runtime.spec.graphs), which names its component and tensors
    # dynamic axes by input/output name: {axis index: symbolic name}; everything else is static
    dynamic_axes: Dict[str, Dict[int, str]] = {}
    # lengths (along the main dynamic axis) used for export and parity; the first one is the export example
    parity_lengths: Tuple[int, ...] = ()
    # fp32 ONNX vs the torch module; precision variants have their own, looser, measured-and-reported error
    fp32_tolerance: ErrorStats = ErrorStats(max_abs=1e-4, rel_l2=1e-5)
    # Largest relative L2 error a precision variant may show for the bundle to list it (the registry's tolerance;
    # a graph may override an entry).
    variant_rel_l2: Dict[str, float] = {p.name: p.tolerance_rel_l2 for p in ONNX_PRECISIONS.values()
                                        if p.tolerance_rel_l2 is not None}
    # int8_dynamic weight format (quantization/variants.py): int8 per channel for MatMul graphs, uint8 for conv graphs
    int8_dynamic_signed_weights: bool = True

    @property
    def contract(self) -> GraphContract:
        return GRAPHS[self.name]

    @property
    def component(self) -> str:
        return self.contract.component

    @property
    def input_names(self) -> Tuple[str, ...]:
        return self.contract.inputs

    @property
    def output_names(self) -> Tuple[str, ...]:
        return self.contract.outputs

    @abstractmethod
    def build(self, snapshot: Path) -> torch.nn.Module:
        """The torch module to export, loaded strictly from ``snapshot``; ``forward(*inputs)`` in input order."""

    @abstractmethod
    def example_inputs(self, module: torch.nn.Module, length: int, seed: int) -> Tuple[torch.Tensor, ...]:
        """Seeded inputs at ``length`` along the main dynamic axis, in ``input_names`` order."""

    @abstractmethod
    def profiles(self, module: torch.nn.Module) -> Dict[str, ShapeProfile]:
        """min / opt / max shape of every input, for TensorRT."""

    def sidecar_arrays(self, module: torch.nn.Module) -> Dict[str, np.ndarray]:
        """Arrays the runtime needs beside the graph (stored as ``<name>.npy`` artifacts). Default: none."""
        return {}

    def calibration_feeds(self, module: torch.nn.Module, context: CalibrationContext) -> List[Dict[str, np.ndarray]]:
        """Inputs for static int8 calibration, derived from real speech. Default: none (no int8_qdq variant)."""
        return []

    def dynamic_shapes(self, module: torch.nn.Module) -> Tuple[Dict[int, torch.export.Dim], ...]:
        """torch.export dims, derived from ``dynamic_axes`` and the profile bounds."""
        prof = self.profiles(module)
        dims: Dict[str, torch.export.Dim] = {}
        shapes = []
        for name in self.input_names:
            spec = {}
            for axis, label in self.dynamic_axes.get(name, {}).items():
                if label not in dims:
                    dims[label] = torch.export.Dim(label, min=prof[name].min[axis], max=prof[name].max[axis])
                spec[axis] = dims[label]
            shapes.append(spec)
        return tuple(shapes)


@dataclass
class ExportResult:
    path: Path
    fp32_error: ErrorStats
    seconds: float

    @property
    def files(self) -> List[Path]:
        """The graph and its external-data file."""
        return graph_files(self.path)


def run_torch(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> List[np.ndarray]:
    with torch.inference_mode():
        out = module(*inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().float().numpy() if o.is_floating_point() else o.numpy() for o in outs]


def run_onnx(path: Path, spec: GraphSpec, inputs: Sequence[torch.Tensor], threads: int = 1) -> List[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    # a parity check runs a few calls: packed weight copies would only double the memory of a 6 GB graph
    so.add_session_config_entry("session.disable_prepacking", "1")
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    return sess.run(list(spec.output_names), {n: t.numpy() for n, t in zip(spec.input_names, inputs)})


def compare(spec: GraphSpec, got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> ErrorStats:
    """Worst error over the floating-point outputs; integer outputs (token ids) must match exactly."""
    worst = ErrorStats(0.0, 0.0)
    for name, g, r in zip(spec.output_names, got, ref):
        if np.issubdtype(r.dtype, np.integer):
            if not np.array_equal(g, r):
                raise AssertionError(f"{spec.name}.{name}: integer output differs in {int((g != r).sum())} places")
            continue
        worst = worst.worst(ErrorStats.of(g, r))
    return worst


def export_graph(spec: GraphSpec, module: torch.nn.Module, path: Path, seed: int = 0) -> ExportResult:
    """Exports ``module`` to ``path`` (weights in ``<path>.data`` beside it), checks it, and measures fp32 parity at
    every parity length. Raises AssertionError if the fp32 graph is outside ``spec.fp32_tolerance``."""
    import onnx

    start = time.perf_counter()
    module = module.eval()
    example = spec.example_inputs(module, spec.parity_lengths[0], seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter is chatty about things that do not concern us
        program = torch.onnx.export(
            module, tuple(example), input_names=list(spec.input_names), output_names=list(spec.output_names),
            dynamic_shapes=spec.dynamic_shapes(module), opset_version=OPSET, dynamo=True,
            optimize=False, verbose=False,  # optimised here instead, without the exporter's quadratic rewrite rule
        )
        optimize_graph(program.model)
    # weights in "<path>.data": ONNX Runtime memory-maps external data (without prepacking they are used where they
    # lie, shared with the page cache), weights inside the .onnx are parsed onto the heap (1.1-1.8x the file,
    # docs/benchmarks.md "Where the weights get copied"); and protobuf caps one file at 2 GiB
    program.save(str(path), external_data=True)
    del program
    gc.collect()  # the exporter's in-memory model (a copy of every weight) before ONNX Runtime loads the file
    onnx.checker.check_model(str(path), full_check=True)
    worst = ErrorStats(0.0, 0.0)
    for i, length in enumerate(spec.parity_lengths):
        inputs = spec.example_inputs(module, length, seed + i)
        err = compare(spec, run_onnx(path, spec, inputs), run_torch(module, inputs))
        log.info("%s fp32 at length %d: max_abs %.2e rel_l2 %.2e", spec.name, length, err.max_abs, err.rel_l2)
        worst = worst.worst(err)
    if not worst.within(spec.fp32_tolerance):
        raise AssertionError(f"{spec.name}: fp32 ONNX differs from the reference by {worst} (tolerance {spec.fp32_tolerance})")
    return ExportResult(path, worst, time.perf_counter() - start)
