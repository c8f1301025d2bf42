"""aiohttp middlewares: OpenAI-format errors everywhere, and CORS for browser clients."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from exo.api.chat_api.utils import APIError, error_response

logger = logging.getLogger(__name__)

_CORS_METHODS = "GET, POST, OPTIONS"
_CORS_MAX_AGE_S = "86400"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error in OpenAI's format ``{"error": {message, type, param, code}}``.

    ``APIError`` keeps its status; aiohttp's 4xx/5xx (unknown route 404, 405, 413 of an
    oversized body) are rewritten; any other exception is logged and answered 500.
    """
    try:
        return await handler(request)
    except APIError as e:
        return e.response()
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
        resp = error_response(e.status, message, code=code)
        if "Allow" in e.headers:
            resp.headers["Allow"] = e.headers["Allow"]
        return resp
    except asyncio.CancelledError:
        raise
    except Exception as e:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, f"internal server error: {type(e).__name__}: {e}", code="internal_error")


@web.middleware
async def cors_preflight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer CORS preflight requests (``OPTIONS`` with ``Access-Control-Request-Method``) with
    204 on any path; the headers come from ``make_cors_on_prepare``."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(status=204)
    return await handler(request)


def make_cors_on_prepare(allow_origin: str = "*"):
    """An ``on_response_prepare`` signal handler adding CORS headers to every response,
    streamed ones included (their headers are sent before the handler returns)."""

    async def cors_on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Access-Control-Allow-Origin"] = allow_origin
        if allow_origin != "*":
            response.headers["Vary"] = "Origin"
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = _CORS_METHODS
            response.headers["Access-Control-Allow-Headers"] = request.headers.get("Access-Control-Request-Headers", "*")
            response.headers["Access-Control-Max-Age"] = _CORS_MAX_AGE_S

    return cors_on_prepare
