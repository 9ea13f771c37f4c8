"""Servers on 127.0.0.1 over the session's tiny bundle: real sockets, real clients."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install .[serve])")

from kimia_edge.runtime.pipeline import Pipeline, PipelineOptions  # noqa: E402
from kimia_edge.runtime.server.app import create_app  # noqa: E402
from kimia_edge.runtime.server.config import ServerConfig  # noqa: E402


@pytest.fixture(scope="session")
def server_pipeline(tiny_bundle: Path) -> Pipeline:
    """One pipeline for every server of the session (opened once: the LLM and six ONNX sessions)."""
    return Pipeline.from_bundle(tiny_bundle, PipelineOptions(threads=1, prepack=False))


@contextmanager
def running_server(pipeline: Pipeline, config: ServerConfig) -> Iterator[str]:
    """uvicorn serving ``create_app`` on a free port of 127.0.0.1, in a thread; yields the base URL."""
    app = create_app(pipeline, config, ["kimi-audio@Q8_0"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws="websockets-sansio"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def serve(server_pipeline: Pipeline) -> Iterator[Callable[..., str]]:
    """``serve(**config)`` starts a server with those ServerConfig fields and returns its base URL; every server
    started is stopped after the test. ``serve(pipeline=p, ...)`` serves another pipeline than the session's."""
    stack = []

    def start(pipeline: Optional[Pipeline] = None, **fields) -> str:
        ctx = running_server(pipeline or server_pipeline, ServerConfig(**fields))
        stack.append(ctx)
        return ctx.__enter__()

    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)
