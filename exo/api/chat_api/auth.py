"""API keys: requests to a protected path must carry a configured key.

A key is read from ``Authorization: Bearer KEY`` (OpenAI and Ollama clients) or ``x-api-key:
KEY`` (Anthropic clients). A missing or wrong key gets 401 in the dialect of the path (see
``dialects``) with ``WWW-Authenticate: Bearer``. Which paths are public is decided by
``AuthConfig``: its ``public_paths`` (default: the health checks) and, with ``web_ui_public``,
the web page and its files. CORS preflight requests never need a key (browsers send them
without credentials); ``cors_preflight_middleware`` answers them before this middleware runs.

Keys are compared in constant time (``hmac.compare_digest``). The key's identity for rate
limiting and logs is a short SHA-256 digest, never the key itself.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from exo.api.chat_api.dialects import dialect_of, error_response
from exo.config import AuthConfig

logger = logging.getLogger(__name__)

AUTH_CONFIG_KEY: web.AppKey[AuthConfig] = web.AppKey("exo_auth_config", AuthConfig)
# request item: digest of the valid key the request carried, if any
KEY_ID = web.RequestKey("exo_api_key_id", str) if hasattr(web, "RequestKey") else "exo_api_key_id"

# paths served by the API itself (everything else is the web page and its files)
_SERVICE_PREFIXES = ("/v1/", "/api/", "/chat/", "/health/")
_SERVICE_PATHS = frozenset({"/v1", "/api", "/completions", "/embeddings", "/metrics", "/health", "/healthcheck"})


def is_service_path(path: str) -> bool:
    """True for API paths (``/v1/...``, ``/api/...``, completions, metrics, health); False for
    the web page and its static files."""
    return path in _SERVICE_PATHS or path.startswith(_SERVICE_PREFIXES)


def matches_any(path: str, patterns: list[str]) -> bool:
    """``path`` equals a pattern, or matches one with ``*`` wildcards (``fnmatch``)."""
    return any(path == p or ("*" in p and fnmatch.fnmatchcase(path, p)) for p in patterns)


def is_public(path: str, cfg: AuthConfig) -> bool:
    """True when ``path`` needs no key under ``cfg`` (whether or not keys are configured)."""
    if matches_any(path, cfg.public_paths):
        return True
    return cfg.web_ui_public and not is_service_path(path)


def key_id(key: str) -> str:
    """A short, non-reversible identity of a key (12 hex digits of its SHA-256)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def presented_key(request: web.Request) -> str | None:
    """The key a request carries: ``Authorization: Bearer KEY`` or ``x-api-key: KEY``."""
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = request.headers.get("x-api-key", "").strip()
    return key or None


def check_key(key: str | None, keys: list[str]) -> bool:
    """True when ``key`` is one of ``keys`` (constant-time comparison of each)."""
    if key is None:
        return False
    given = key.encode("utf-8")
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k.encode("utf-8"))
    return ok


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Reject requests to protected paths without a valid key (401, the path's dialect).

    A request with a valid key gets ``request[KEY_ID]`` (used for per-key rate limits).
    """
    cfg = request.app[AUTH_CONFIG_KEY]
    if not cfg.enabled:
        return await handler(request)
    key = presented_key(request)
    valid = check_key(key, cfg.api_keys)
    if valid:
        request[KEY_ID] = key_id(key)  # type: ignore[index,arg-type]
    if valid or request.method == "OPTIONS" or is_public(request.path, cfg):
        return await handler(request)
    if key is None:
        message = ("Missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'")
        code = "missing_api_key"
    else:
        message = "Incorrect API key provided"
        code = "invalid_api_key"
    logger.info("401 %s %s from %s: %s", request.method, request.path, request.remote, code)
    return error_response(dialect_of(request.path), 401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


def setup(app: web.Application, cfg: AuthConfig) -> None:
    """Install the key check on ``app`` (it passes everything when ``cfg`` has no keys)."""
    app[AUTH_CONFIG_KEY] = cfg
    app.middlewares.append(auth_middleware)
