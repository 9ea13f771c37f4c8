"""``kimia-edge serve``: the OpenAI-compatible local server (runtime/server/). The settings are checked, and the
serve extra looked for, before the model loads: a refused bind or a missing extra costs no load time."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import List

SERVE_EXTRA = ("fastapi", "uvicorn", "sse_starlette", "multipart")
API_KEY_ENV = "KIMIA_EDGE_API_KEY"


def model_ids(bundle: Path, options, name: str = "kimi-audio") -> List[str]:
    """``name@<precision>`` of the GGUF the pipeline opens with ``options`` (the same choice as the pipeline's)."""
    from kimia_edge.runtime.bundle import read_manifest
    from kimia_edge.runtime.pipeline import choose_artifacts
    from kimia_edge.runtime.spec.graphs import LLM_TRUNK

    return [f"{name}@{choose_artifacts(read_manifest(bundle), options)[LLM_TRUNK].precision}"]


def _serve(args: argparse.Namespace) -> int:
    from kimia_edge.runtime.cli import OptionError, options_from_args

    missing = [m for m in SERVE_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: kimia-edge serve needs the serve extra ({', '.join(missing)} missing): "
              "pip install kimia-edge[serve]", file=sys.stderr)
        return 2
    from kimia_edge.runtime.server.config import ServerConfig

    config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                          max_queue=args.max_queue, max_upload_bytes=int(args.max_upload_mb * 2**20),
                          max_steps=args.max_steps)
    try:
        config.validate()
    except ValueError as e:
        raise OptionError(str(e)) from None
    options = options_from_args(args)

    import uvicorn

    from kimia_edge.runtime.pipeline import Pipeline
    from kimia_edge.runtime.server.app import create_app

    ids = model_ids(args.bundle, options, config.model_name)
    pipeline = Pipeline.from_bundle(args.bundle, options)
    app = create_app(pipeline, config, ids, bundle_dir=args.bundle)
    print(f"kimia-edge serve: {', '.join(ids)} on http://{args.host}:{args.port} "
          f"({'API key required' if config.api_key else 'no API key'})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, ws="websockets-sansio")
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from kimia_edge.runtime.cli import _count, _guarded, _runtime_options

    p = sub.add_parser("serve", help="OpenAI-compatible local server: transcriptions, spoken chat, realtime "
                                     "(pip install kimia-edge[serve])")
    _runtime_options(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; others need --api-key)")
    p.add_argument("--port", type=_count(0), default=8000)
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (or set ${API_KEY_ENV}, kept out of ps)")
    p.add_argument("--max-queue", type=_count(0), default=4,
                   help="turns that may wait behind the running one; more get 429 + Retry-After")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="largest audio upload, MiB (default 25)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(handler=_guarded(_serve))
