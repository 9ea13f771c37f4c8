"""The exported graphs, one GraphSpec class per file, the file named after the graph (imported lazily: each pulls
in its reference module). Which graphs exist, in which order, with which tensors, is the contract's
(``kimia_edge.runtime.spec.graphs``)."""
from __future__ import annotations

import importlib
import inspect

from kimia_edge.export.graphs.base import GraphSpec
from kimia_edge.runtime.spec.graphs import ONNX_GRAPHS

REGISTRY = ONNX_GRAPHS  # the export order: encoders first, as the pipeline runs


def graph_spec(name: str) -> GraphSpec:
    """The GraphSpec of graph ``name`` (the class in ``export/graphs/<name>.py`` whose ``name`` it is)."""
    if name not in ONNX_GRAPHS:
        raise ValueError(f"unknown graph {name!r}; known: {list(ONNX_GRAPHS)}")
    module = importlib.import_module(f"{__name__}.{name}")
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if issubclass(cls, GraphSpec) and getattr(cls, "name", None) == name:
            return cls()
    raise LookupError(f"{module.__file__} defines no GraphSpec named {name!r}")
