"""Run-time sub-commands of ``kimia-edge`` (torch-free)."""
from __future__ import annotations

import argparse


def _selfcheck(args: argparse.Namespace) -> int:
    from kimia_edge.runtime.selfcheck import run_selfcheck

    return run_selfcheck()


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("selfcheck", help="check that the native extension and the run-time libraries work here")
    p.set_defaults(handler=_selfcheck)
