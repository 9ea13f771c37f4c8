"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the status OpenAI uses.

Handlers raise ``APIError`` (or one of the helpers below); ``install(app)`` turns it, FastAPI's own validation
errors (422 → 400 here, as OpenAI answers bad parameters with 400), routing errors (404, 405) and any other
exception (500: logged, the server keeps serving) into that shape.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An answer other than 2xx, in OpenAI's shape. ``param``: the request field at fault (dotted path), if any;
    ``code``: a machine-readable reason (``model_not_found``, ``invalid_api_key``...); ``headers``: extra response
    headers (``Retry-After``)."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_param(param: str, message: str, code: str = "invalid_value") -> APIError:
    """400 for a request field with a value we refuse; ``message`` says what was expected."""
    return APIError(400, f"{param}: {message}", param=param, code=code)


def unknown_model(model: Any, known: Any) -> APIError:
    """404 model_not_found, listing the ids this server has."""
    return APIError(404, f"The model {model!r} does not exist here; this server has {list(known)}",
                    param="model", code="model_not_found")


def too_large(what: str, size_bytes: Optional[int], limit_bytes: int) -> APIError:
    """413 for an upload (or request body) over ``limit_bytes``."""
    got = "" if size_bytes is None else f" ({size_bytes} bytes)"
    return APIError(413, f"{what} is too large{got}: the limit is {limit_bytes} bytes (--max-upload-mb)",
                    code="request_too_large")


def _loc_param(loc: Any) -> Optional[str]:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = _loc_param(first.get("loc", ()))
    message = "; ".join(f"{_loc_param(e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}" for e in errors)
    return APIError(400, message or "invalid request", param=param, code="invalid_value").response()


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None)).response()


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error answering %s %s", request.method, request.url.path)
    return APIError(500, f"internal error ({type(exc).__name__}); the server is still running",
                    code="internal_error").response()


def install(app: FastAPI) -> None:
    """Every error of ``app`` in OpenAI's shape."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
