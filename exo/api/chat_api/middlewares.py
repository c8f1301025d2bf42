"""aiohttp middlewares: CORS for browser clients (errors: ``dialects.dialect_error_middleware``)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

_CORS_METHODS = "GET, POST, OPTIONS"
_CORS_MAX_AGE_S = "86400"


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
