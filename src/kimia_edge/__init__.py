"""kimia-edge: on-device inference for Kimi-Audio.

Sub-packages: ``kimia_edge.runtime`` (run time, torch-free), ``kimia_edge.export`` and
``kimia_edge.quantization`` (build time, need the ``build`` extra).
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kimia-edge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
