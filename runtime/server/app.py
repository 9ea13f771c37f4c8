"""The FastAPI app of ``kimia-edge serve``: one loaded pipeline, its turn queue, and the routers.

Middleware, outermost first: request counting (/metrics), the API key (runtime/server/auth.py), the request-body
limit (413 before a larger body is read: Content-Length first, then a count of what arrives).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kimia_edge.runtime.pipeline import Pipeline
from kimia_edge.runtime.server import errors
from kimia_edge.runtime.server.auth import RequireKey
from kimia_edge.runtime.server.config import ServerConfig
from kimia_edge.runtime.server.metrics import CountRequests, ServerMetrics
from kimia_edge.runtime.server.turns import TurnQueue

REMEMBERED_ANSWERS = 256  # audio ids of recent spoken answers a later request may cite (their transcripts)


@dataclass
class ServerState:
    """What every handler reaches as ``request.app.state.kimia``. ``model_ids``: the ids /v1/models lists, each
    with the precision it runs at (``kimi-audio@Q4_K_M``); the first is the default. ``bundle_dir``: the bundle the
    pipeline was opened from (the realtime VAD's Silero graph lives there; None: the energy VAD). ``transcripts``:
    audio id -> transcript of the last ``REMEMBERED_ANSWERS`` spoken answers (an assistant message citing
    ``audio.id``)."""

    pipeline: Pipeline
    config: ServerConfig
    queue: TurnQueue
    model_ids: List[str] = field(default_factory=list)
    metrics: Optional[ServerMetrics] = None
    bundle_dir: Optional[Path] = None
    transcripts: "OrderedDict[str, str]" = field(default_factory=OrderedDict)

    def remember(self, audio_id: str, transcript: str) -> None:
        self.transcripts[audio_id] = transcript
        while len(self.transcripts) > REMEMBERED_ANSWERS:
            self.transcripts.popitem(last=False)


class LimitBody:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 (OpenAI-shaped) from its Content-Length
    before any of it is read, or, without one, as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await errors.too_large("the request body", int(length), self.limit).response()(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # raised inside the handler's read: its exception handler answers 413
                    raise errors.too_large("the request body", None, self.limit)
            return message

        await self.app(scope, counted, send)


STATIC_DIR = Path(__file__).with_name("static")


def create_app(pipeline: Pipeline, config: ServerConfig, model_ids: List[str],
               bundle_dir: Optional[Path] = None) -> FastAPI:
    """The app over an opened pipeline (``config`` validated here), and the live-speech page at / (static files,
    no CDN; the page itself holds no secret, the socket it opens asks for the key)."""
    from kimia_edge.runtime.server import openai_api, realtime

    config.validate()
    app = FastAPI(title="kimia-edge", docs_url=None, redoc_url=None, openapi_url=None)
    queue = TurnQueue(config.max_queue)
    metrics = ServerMetrics(lambda: (queue.waiting, queue.running))
    queue.on_turn_done = metrics.on_turn_done
    app.state.kimia = ServerState(pipeline, config, queue, list(model_ids), metrics,
                                  bundle_dir=None if bundle_dir is None else Path(bundle_dir))
    app.include_router(openai_api.router)
    app.include_router(realtime.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    errors.install(app)
    endpoints = frozenset(getattr(r, "path", "") for router in (openai_api.router, realtime.router)
                          for r in router.routes) | {"/"}
    app.add_middleware(LimitBody, limit=config.max_body_bytes)  # innermost of the three
    app.add_middleware(RequireKey, api_key=config.api_key)
    app.add_middleware(CountRequests, metrics=metrics, endpoints=lambda: endpoints)
    return app
