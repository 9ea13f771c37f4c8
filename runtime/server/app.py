"""The FastAPI app of ``kimia-edge serve``: one loaded pipeline, its turn queue, and the routers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from fastapi import FastAPI

from kimia_edge.runtime.pipeline import Pipeline
from kimia_edge.runtime.server.config import ServerConfig
from kimia_edge.runtime.server.turns import TurnQueue


@dataclass
class ServerState:
    """What every handler reaches as ``request.app.state.kimia``. ``model_ids``: the ids /v1/models lists, each
    with the precision it runs at (``kimi-audio@Q4_K_M``); the first is the default."""

    pipeline: Pipeline
    config: ServerConfig
    queue: TurnQueue
    model_ids: List[str] = field(default_factory=list)


def create_app(pipeline: Pipeline, config: ServerConfig, model_ids: List[str]) -> FastAPI:
    """The app over an opened pipeline (``config`` validated here)."""
    from kimia_edge.runtime.server import openai_api, realtime

    config.validate()
    app = FastAPI(title="kimia-edge", docs_url=None, redoc_url=None)
    app.state.kimia = ServerState(pipeline, config, TurnQueue(config.max_queue), list(model_ids))
    app.include_router(openai_api.router)
    app.include_router(realtime.router)
    return app
