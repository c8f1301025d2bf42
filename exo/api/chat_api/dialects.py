"""Which API dialect a path speaks, and errors in each dialect's own format.

* OpenAI (``/v1/*``, the un-prefixed completions paths, everything else):
  ``{"error": {"message", "type", "param", "code"}}`` (``utils.error_body``).
* Anthropic (``/v1/messages*``): ``{"type": "error", "error": {"type", "message"}}``
  (https://docs.anthropic.com/en/api/errors).
* Ollama (``/api/*``): ``{"error": "message"}`` (ollama ``api/types.go`` ``StatusError``).

``dialect_error_middleware`` answers every error in the format of its path's dialect (handlers
raise ``APIError`` whatever their dialect). ``DialectErrorRunner`` serves an application so that the errors
aiohttp answers itself, before any middleware runs (a request it cannot parse: an invalid
method, a request line or header over 8,190 bytes, a bad ``Content-Length``), are JSON too.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any, Literal, Mapping

from aiohttp import web
from aiohttp.typedefs import Handler

from exo.api.chat_api.utils import APIError

logger = logging.getLogger(__name__)

Dialect = Literal["openai", "anthropic", "ollama"]

ANTHROPIC_PREFIX = "/v1/messages"
OLLAMA_PREFIX = "/api/"

# HTTP status -> Anthropic error type
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def dialect_of(path: str) -> Dialect:
    """The dialect of a request path."""
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return "anthropic"
    if path.startswith(OLLAMA_PREFIX):
        return "ollama"
    return "openai"


def anthropic_error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status."""
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_payload(dialect: Dialect, status: int, message: str, *, param: str | None = None,
                  code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error in ``dialect``."""
    if dialect == "anthropic":
        return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}
    if dialect == "ollama":
        return {"error": message}
    return APIError(status, message, param=param, code=code).body()


def error_response(dialect: Dialect, status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON error response in ``dialect`` with ``status`` and extra ``headers``."""
    return web.json_response(error_payload(dialect, status, message, param=param, code=code), status=status,
                             headers=dict(headers or {}))


def api_error_response(dialect: Dialect, e: APIError, headers: Mapping[str, str] | None = None) -> web.Response:
    """``e`` answered in ``dialect``."""
    return error_response(dialect, e.status, e.message, param=e.param, code=e.code, headers=headers)


@web.middleware
async def dialect_error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error in the dialect of its path: ``APIError`` with its status, aiohttp's
    4xx/5xx (an unknown route's 404, 405, the 413 of an oversized body) rewritten, any other
    exception logged and answered 500. The one error middleware of every dialect."""
    dialect = dialect_of(request.path)
    try:
        return await handler(request)
    except APIError as e:
        return api_error_response(dialect, e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 404:
            message, code = f"Unknown route: {request.method} {request.path}", "not_found"
        elif e.status == 405:
            message, code = f"Method {request.method} is not allowed on {request.path}", "method_not_allowed"
        elif e.status == 413:
            message, code = "request body too large", "request_too_large"
        else:
            message, code = e.reason or e.text or "error", None
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return error_response(dialect, e.status, message, code=code, headers=headers)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(dialect, 500, f"internal server error: {type(e).__name__}: {e}", code="internal_error")


class _DialectErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering the errors it raises itself in JSON."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if a response was begun
        text = message or (str(exc) if exc is not None and status < 500 else "") or HTTPStatus(status).phrase
        # an unparsable request has no path (aiohttp gives it "/"): OpenAI's format then
        response = error_response(dialect_of(request.path), status, f"{HTTPStatus(status).phrase}: {text}",
                                  code="invalid_request" if status < 500 else "internal_error")
        response.force_close()
        return response


class _DialectErrorServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        handler = super().__call__()
        handler.__class__ = _DialectErrorRequestHandler  # same slots, one method more
        return handler


class DialectErrorRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer aiohttp's own protocol errors (400, 413, 414,
    431, ...) in the dialect's JSON error format (OpenAI's when the path is unknown) instead
    of ``text/plain``."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _DialectErrorServer
        return server
