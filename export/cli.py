"""Build-time sub-commands of ``kimia-edge`` (need the ``build`` extra: torch, onnx, gguf)."""
from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Adds the build-time commands. Handlers import torch lazily."""
