"""``kimia-edge engines build``: on the target device, builds (or finds cached) the TensorRT engine of every ONNX
graph the runtime opens, at the precisions it opens them, into the cache the session factory reads
(runtime/engines.py). Untested on GPU."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List

if TYPE_CHECKING:
    from kimia_edge.runtime.spec.manifest import Artifact, Manifest


def engine_artifacts(manifest: Manifest, precision_spec: str, text_only: bool = False) -> Dict[str, Artifact]:
    """The ONNX graphs a pipeline opened with ``precision_spec`` on device ``tensorrt`` runs, by graph name (the
    pipeline's own choice: a precision a graph may not use or the bundle lacks becomes fp32, logged). The graphs a
    text-only pipeline skips are optional: a bundle without them gets the text-only set. ValueError if TensorRT
    cannot build a chosen precision; BundleError if the bundle lacks what the pipeline needs."""
    from kimia_edge.runtime.engines import builder_flags
    from kimia_edge.runtime.pipeline import PipelineOptions, choose_artifacts
    from kimia_edge.runtime.spec.graphs import RUNTIME_GRAPHS, TEXT_ONLY_SKIPPED_GRAPHS

    listed = {a.name for a in manifest.artifacts}
    text_only = text_only or not all(g in listed for g in TEXT_ONLY_SKIPPED_GRAPHS)
    options = PipelineOptions(precision=precision_spec, device="tensorrt", text_only=text_only)
    chosen = choose_artifacts(manifest, options)
    graphs = {g: chosen[g] for g in RUNTIME_GRAPHS if g in chosen}
    for artifact in graphs.values():
        try:
            builder_flags(artifact.precision)
        except ValueError as e:
            raise ValueError(f"{artifact.name}: {e}") from None
    return graphs


def _build(args: argparse.Namespace) -> int:
    from kimia_edge.runtime.bundle import ensure_usable, read_manifest
    from kimia_edge.runtime.engines import (DEFAULT_WORKSPACE_BYTES, EngineUnavailable, build_engine, engine_target,
                                            engines_dir)
    from kimia_edge.runtime.pipeline import PipelineOptions
    from kimia_edge.runtime.spec.manifest import BundleError

    spec = args.precision or PipelineOptions(device="tensorrt").precision_spec
    try:
        manifest = read_manifest(args.bundle)
        target = engine_target()  # first: without TensorRT nothing else matters, and it is one line
        graphs = engine_artifacts(manifest, spec, args.text_only)
        ensure_usable(args.bundle, manifest, graphs.values(), args.cache_dir)
    except EngineUnavailable as e:
        print(f"error: cannot build TensorRT engines here: {e}", file=sys.stderr)
        return 2
    except (BundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    workspace = args.workspace_mib << 20
    print(f"TensorRT {target.tensorrt_version} on {target.gpu.name} (compute {target.gpu.compute_capability}); "
          f"engines in {engines_dir(args.cache_dir)}")
    rows: List[List[str]] = []
    failed = 0
    for graph, artifact in graphs.items():
        try:
            path, built = build_engine(args.bundle, artifact, args.cache_dir, workspace)
            rows.append([graph, artifact.precision, path.name, "built" if built else "cached"])
        except Exception as e:  # one graph TensorRT cannot take does not stop the others; reported, exit 1
            failed += 1
            rows.append([graph, artifact.precision, "-", "FAILED"])
            print(f"error: {graph}: {e}", file=sys.stderr)
    table = [["graph", "precision", "engine file", "status"]] + rows
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if workspace != DEFAULT_WORKSPACE_BYTES:
        print(f"note: sessions look for engines built with the default workspace ({DEFAULT_WORKSPACE_BYTES >> 20} MiB)")
    return 1 if failed else 0


def _precision_spec(text: str) -> str:
    from kimia_edge.runtime.spec.graphs import RUNTIME_GRAPHS
    from kimia_edge.runtime.spec.precisions import parse_precision_spec

    try:
        parse_precision_spec(text, RUNTIME_GRAPHS)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Adds ``engines build`` to the ``kimia-edge`` command."""
    from kimia_edge.runtime.engines import DEFAULT_WORKSPACE_BYTES
    from kimia_edge.runtime.spec.precisions import DEFAULT_PRECISION_SPEC

    engines = sub.add_parser("engines", help="TensorRT engines for this device (untested on GPU)")
    engines_sub = engines.add_subparsers(dest="engines_command", metavar="ACTION")
    build = engines_sub.add_parser(
        "build", help="build (or find cached) the TensorRT engine of every graph the runtime opens, on this device",
        description="Engines are specific to the TensorRT version and GPU, so they are built here from the bundle's "
                    "ONNX graphs and profile shapes and cached under CACHE/engines, keyed by the graph's sha256, "
                    "TensorRT version, GPU, precision, profiles and workspace. Sessions opened with the same cache "
                    "root and precision use them. Untested on GPU.")
    build.add_argument("--bundle", type=Path, required=True)
    build.add_argument("--precision", type=_precision_spec,
                       help="as for chat / transcribe: one precision or a default and per-graph choices "
                            f"(default: {DEFAULT_PRECISION_SPEC['gpu']}, what --device tensorrt opens); build for "
                            "the precision you run with")
    build.add_argument("--text-only", action="store_true", help="only the graphs transcribe opens")
    build.add_argument("--cache-dir", type=Path,
                       help="cache root, the same as PipelineOptions.cache_dir (default: $KIMIA_EDGE_CACHE or "
                            "~/.cache/kimia-edge); engines go to its engines/ folder")
    build.add_argument("--workspace-mib", type=_positive, default=DEFAULT_WORKSPACE_BYTES >> 20,
                       help="TensorRT builder workspace (default: %(default)s)")
    build.set_defaults(handler=_build)
