"""API-key check of ``kimia-edge serve``: ``Authorization: Bearer KEY`` on every endpoint except ``GET /health``
and the page (``GET /``, ``/static/``) when the server has a key; keys compared in constant time
(``hmac.compare_digest``).

Browsers cannot set headers on a WebSocket, so OpenAI's clients send the key as a ``Sec-WebSocket-Protocol`` entry
``openai-insecure-api-key.KEY``; ``key_ok`` accepts that as well as the header. ``ws_subprotocol`` picks the
subprotocol a WebSocket handler should accept with (a browser that offered some drops the connection when the
answer names none).
"""
from __future__ import annotations

import hmac
from typing import Mapping, Optional, Sequence

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health", "/"})  # GET only
WS_KEY_PREFIX = "openai-insecure-api-key."


def _same(given: str, key: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8"))


def _subprotocols(headers: Mapping[str, str]) -> Sequence[str]:
    raw = headers.get("sec-websocket-protocol") or ""
    return [p.strip() for p in raw.split(",") if p.strip()]


def key_ok(headers: Mapping[str, str], api_key: Optional[str]) -> bool:
    """True when ``api_key`` is None (no key configured) or ``headers`` carry it: ``Authorization: Bearer KEY`` or a
    ``Sec-WebSocket-Protocol`` entry ``openai-insecure-api-key.KEY``. ``headers``: case-insensitive (Starlette's
    ``Headers``, ``request.headers``, ``websocket.headers``) or lower-case keys."""
    if api_key is None:
        return True
    auth = headers.get("authorization") or ""
    scheme, _, given = auth.partition(" ")
    if scheme.lower() == "bearer" and _same(given.strip(), api_key):
        return True
    return any(p.startswith(WS_KEY_PREFIX) and _same(p[len(WS_KEY_PREFIX):], api_key) for p in _subprotocols(headers))


def ws_subprotocol(headers: Mapping[str, str]) -> Optional[str]:
    """The subprotocol to accept a WebSocket with: the first one offered that is not the key entry (OpenAI's
    browser client offers ``realtime`` first), or None when only the key (or nothing) was offered."""
    return next((p for p in _subprotocols(headers) if not p.startswith(WS_KEY_PREFIX)), None)


class RequireKey:
    """ASGI middleware: refuses HTTP requests that do not carry ``api_key`` (401, OpenAI-shaped); ``GET /health``, the
    page at ``/`` and its ``/static/`` files stay open (they hold no secret). WebSockets check the key themselves."""

    def __init__(self, app: ASGIApp, api_key: Optional[str]) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key is None or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # the socket's handler checks the key with ``key_ok`` after accepting,
            return await self.app(scope, receive, send)  # so that a browser is told why (a refused handshake is 1006)
        if scope["method"] in ("GET", "HEAD") and (scope["path"] in OPEN_PATHS or scope["path"].startswith("/static/")):
            return await self.app(scope, receive, send)
        if key_ok(Headers(scope=scope), self.api_key):
            return await self.app(scope, receive, send)
        from kimia_edge.runtime.server.errors import APIError

        error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                         code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)
