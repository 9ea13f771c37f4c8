"""The ``kimia-edge`` command. Each world registers its own sub-commands; heavy imports (torch,
onnxruntime, llama.cpp) happen inside the handlers, so ``kimia-edge --version`` stays instant."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from kimia_edge import __version__


def _demo(args: argparse.Namespace) -> int:
    from kimia_edge.demo import run_demo

    return run_demo(args.cache, args.output)


def build_parser() -> argparse.ArgumentParser:
    from kimia_edge.export import cli as export_cli
    from kimia_edge.runtime import cli as runtime_cli

    parser = argparse.ArgumentParser(prog="kimia-edge", description="On-device inference for Kimi-Audio.")
    parser.add_argument("--version", action="version", version=f"kimia-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="show logs: -v kimia-edge's at INFO, -vv every library's at DEBUG (default: warnings)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the whole path offline on a built-in tiny model and clip (about a minute)")
    demo.add_argument("--output", type=Path, default=Path("kimia-edge-demo.wav"))
    demo.add_argument("--cache", type=Path, help="where the demo snapshot and bundle live (default: ~/.cache/kimia-edge)")
    demo.set_defaults(handler=_demo)
    runtime_cli.register(sub)
    export_cli.register(sub)
    return parser


def quiet_torch_logs(verbose: int) -> None:
    """Without -v, torch's own loggers show errors only. torch gives them handlers and levels of their own when it is
    first imported (read from TORCH_LOGS), so basicConfig's level does not reach them; its ONNX exporter warns four
    times per exported graph that torchvision is not installed. Takes effect when torch is imported after this call
    (the handlers import it lazily); a TORCH_LOGS of the user's own is kept."""
    if not verbose and not os.environ.get("TORCH_LOGS"):
        os.environ["TORCH_LOGS"] = "-all"  # "-" = ERROR; an empty TORCH_LOGS would break torch's import


def _exit_on_signal(signum: int, frame: object) -> None:
    """SIGTERM and SIGHUP (a closed terminal) end the command like Ctrl-C does: cleanup code runs (an export's
    staging folder is removed)."""
    raise SystemExit(128 + signum)


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether Ctrl-C is what raised ``exc``: a library can turn the KeyboardInterrupt it met into its own error
    (onnxruntime's extension, interrupted while it imports, raises "ImportError: initialization failed" from it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_signal)
        if hasattr(signal, "SIGHUP"):  # not on Windows
            signal.signal(signal.SIGHUP, _exit_on_signal)
    parser = build_parser()
    args = parser.parse_args(argv)
    # -v: our own logs at INFO (third-party libraries stay at WARNING: onnx_ir alone logs ~2 900 lines per graph
    # export at INFO); -vv: everything at DEBUG.
    logging.basicConfig(level=logging.DEBUG if args.verbose >= 2 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verbose == 1:
        logging.getLogger("kimia_edge").setLevel(logging.INFO)
    quiet_torch_logs(args.verbose)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C in any verb, at any moment (loading included): cleanup ran on the way out
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _caused_by_interrupt(exc):
            raise
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
