"""Run-time sub-commands of ``kimia-edge`` (torch-free)."""
from __future__ import annotations

import argparse
from pathlib import Path


def _selfcheck(args: argparse.Namespace) -> int:
    from kimia_edge.runtime.selfcheck import run_selfcheck

    return run_selfcheck()


def _bundle_verify(args: argparse.Namespace) -> int:
    from kimia_edge.runtime.manifest import BundleError, read_manifest, verify_bundle

    try:
        manifest = read_manifest(args.bundle)
        problems = verify_bundle(args.bundle)
    except BundleError as e:
        print(f"FAIL {e}")
        return 1
    for a in manifest.artifacts:
        print(f"  {a.name:<18} {a.format:<8} {a.precision:<12} {a.bytes / 1e6:10.2f} MB")
    for p in problems:
        print(f"FAIL {p}")
    print(f"{'FAIL' if problems else 'ok'}: {args.bundle} (format {manifest.format} v{manifest.version}, {len(manifest.artifacts)} artifacts)")
    return 1 if problems else 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("selfcheck", help="check that the native extension and the run-time libraries work here")
    p.set_defaults(handler=_selfcheck)

    bundle = sub.add_parser("bundle", help="inspect bundles")
    bundle_sub = bundle.add_subparsers(dest="bundle_command", metavar="ACTION")
    verify = bundle_sub.add_parser("verify", help="check every artifact's size and sha256 and the bundle version")
    verify.add_argument("bundle", type=Path)
    verify.set_defaults(handler=_bundle_verify)
