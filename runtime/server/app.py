"""The FastAPI app of ``kimia-edge serve``: one loaded pipeline, its turn queue, and the routers."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from kimia_edge.runtime.pipeline import Pipeline
from kimia_edge.runtime.server.config import ServerConfig
from kimia_edge.runtime.server.turns import TurnQueue


@dataclass
class ServerState:
    """What every handler reaches as ``request.app.state.kimia``. ``model_ids``: the ids /v1/models lists, each
    with the precision it runs at (``kimi-audio@Q4_K_M``); the first is the default. ``bundle_dir``: the bundle the
    pipeline was opened from (the realtime VAD's Silero graph lives there; None: the energy VAD)."""

    pipeline: Pipeline
    config: ServerConfig
    queue: TurnQueue
    model_ids: List[str] = field(default_factory=list)
    bundle_dir: Optional[Path] = None


STATIC_DIR = Path(__file__).with_name("static")


def create_app(pipeline: Pipeline, config: ServerConfig, model_ids: List[str],
               bundle_dir: Optional[Path] = None) -> FastAPI:
    """The app over an opened pipeline (``config`` validated here), and the live-speech page at / (static files,
    no CDN; the page itself holds no secret, the socket it opens asks for the key)."""
    from kimia_edge.runtime.server import openai_api, realtime

    config.validate()
    app = FastAPI(title="kimia-edge", docs_url=None, redoc_url=None)
    app.state.kimia = ServerState(pipeline, config, TurnQueue(config.max_queue), list(model_ids),
                                  None if bundle_dir is None else Path(bundle_dir))
    app.include_router(openai_api.router)
    app.include_router(realtime.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app
