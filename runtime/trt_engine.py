"""Runs a prebuilt TensorRT engine with the TensorRT Python API and cuda-python (no torch).

Untested on GPU: TensorRT cannot be installed on the machines this was written on. The session factory
(runtime/sessions.py) only picks this when ``tensorrt`` and ``cuda`` import and the bundle holds an engine
built for this GPU, and falls back loudly when it fails.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np


def _check(result: Any) -> Any:
    """cuda-python calls return (err, *values); raise on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA call failed with error {err}")
    return values[0] if len(values) == 1 else tuple(values)


class TrtEngineSession:
    """``run(None, feeds) -> outputs`` over one engine, with ONNX Runtime's calling convention."""

    def __init__(self, engine_path: Path) -> None:
        import tensorrt as trt

        from kimia_edge.runtime.engines import cuda_runtime

        cudart = cuda_runtime()  # cuda-python 13 has no ``cuda.cudart``: the engines module finds either layout
        self._trt, self._cudart = trt, cudart
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: TensorRT could not deserialize the engine (built by another TensorRT or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names: Tuple[str, ...] = tuple(n for n in names if self.engine.get_tensor_mode(n) == mode)
        self.output_names: Tuple[str, ...] = tuple(n for n in names if self.engine.get_tensor_mode(n) != mode)
        self.stream = _check(cudart.cudaStreamCreate())
        self._buffers: Dict[str, Tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _device_buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr))
            ptr = _check(self._cudart.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, output_names: Optional[List[str]], feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        trt, cudart = self._trt, self._cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.input_names:
            array = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_input_shape(name, array.shape)
            ptr = self._device_buffer(name, array.nbytes)
            _check(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, h2d, self.stream))
            self.context.set_tensor_address(name, ptr)
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, self._device_buffer(name, max(out.nbytes, 1)))
            outputs.append(out)
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for name, out in zip(self.output_names, outputs):
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        wanted = output_names or list(self.output_names)
        return [outputs[self.output_names.index(n)] for n in wanted]

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        self._cudart.cudaStreamDestroy(self.stream)

    def __enter__(self) -> "TrtEngineSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
