"""Build-time sub-commands of ``kimia-edge`` (need the ``build`` extra: torch, onnx, gguf). Handlers import
torch lazily, so registering them costs nothing."""
from __future__ import annotations

import argparse
from pathlib import Path


def _snapshot_make(args: argparse.Namespace) -> int:
    from kimia_edge.export.snapshot.make import main_make

    return main_make(args.out, args.size, args.seed, args.components)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from kimia_edge.export.snapshot.make import COMPONENTS, SIZES

    snap = sub.add_parser("snapshot", help="write random-weight snapshots in the official layout")
    snap_sub = snap.add_subparsers(dest="snapshot_command", metavar="ACTION")
    make = snap_sub.add_parser("make", help="write a tiny / small / full snapshot with random weights")
    make.add_argument("--size", choices=SIZES, default="tiny")
    make.add_argument("--out", type=Path, required=True, help="folder to create (must not exist)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--components", nargs="+", choices=COMPONENTS, help="write only these (default: all)")
    make.set_defaults(handler=_snapshot_make)
