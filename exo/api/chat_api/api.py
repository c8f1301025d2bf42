"""``ChatAPI``: the OpenAI-compatible HTTP API of a node, one aiohttp ``Application``.

The modules of this package each own one concern (see DESIGN.md); ``create_app`` composes
them: routes from ``route_handlers`` (completions), ``model_endpoints`` (models, topology),
``image_endpoints``; middlewares for OpenAI-format errors and CORS; and, when a directory is
given, the tinychat web UI at ``/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

from exo.api.chat_api import (
    anthropic_endpoints, embeddings, fallback, health, image_endpoints, metrics, model_endpoints, ollama_downloads, ollama_endpoints, ollama_models, route_handlers,
)
from exo.api.chat_api.auth import setup as setup_auth
from exo.api.chat_api.dialects import DialectErrorRunner, dialect_error_middleware
from exo.api.chat_api.rate_limit import setup as setup_rate_limit
from exo.api.chat_api.middlewares import cors_preflight_middleware, make_cors_on_prepare
from exo.api.chat_api.models import GenerationDefaults
from exo.api.chat_api.state import STATE_KEY, APINode, APIState
from exo.api.chat_api.utils import unix_time
from exo.config import DEFAULT_API_PORT, DEFAULT_RESPONSE_TIMEOUT, AuthConfig, RateLimitConfig

logger = logging.getLogger(__name__)

DEFAULT_CLIENT_MAX_SIZE = 16 * 1024 * 1024  # bytes of a request body


async def healthcheck(request: web.Request) -> web.Response:
    """``GET /healthcheck``: ``{"status": "ok"}`` while the API is up."""
    return web.json_response({"status": "ok"})


def _static_root(request: web.Request) -> Path:
    root = request.app[STATE_KEY].tinychat_dir
    if root is None:
        raise web.HTTPNotFound()
    return root


# revalidate every time (a 304 when unchanged): after an upgrade of exo the browser must not mix
# cached modules of the old web UI with new ones
TINYCHAT_HEADERS = {"Cache-Control": "no-cache"}


async def tinychat_index(request: web.Request) -> web.FileResponse:
    """``GET /``: the web UI's ``index.html``."""
    index = _static_root(request) / "index.html"
    if not index.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(index, headers=TINYCHAT_HEADERS)


async def tinychat_file(request: web.Request) -> web.FileResponse:
    """``GET /{path}``: a file of the web UI directory (nothing outside it)."""
    root = _static_root(request)
    target = (root / request.match_info["path"]).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(target, headers=TINYCHAT_HEADERS)


class ChatAPI:
    """The OpenAI-compatible API (chat completions, completions, models, topology, tinychat).

    Args:
        node: the node to generate with (``exo.orchestration.node.Node`` or anything with its
            API-facing methods, see ``state.APINode``).
        default_model: model id used when a request names none.
        response_timeout: seconds to wait for each next token (the first included) before
            failing the request with a timeout error.
        tinychat_dir: directory of the web UI served at ``/``; None serves no UI.
        defaults: server defaults of generation options (OpenAI's when None).
        cors_allow_origin: value of ``Access-Control-Allow-Origin`` ("*": any origin).
        shutdown_timeout: seconds ``stop`` lets requests in flight finish before cancelling them.
        auth: API keys and public paths (no keys: everything open).
        rate_limit: per-client rate and the bounded generation queue.
        fallbacks: model id -> models that answer its generation requests, in order, when the
            cluster cannot serve it now (see ``fallback``).

    Attributes:
        port: the TCP port listened on, once ``run`` returned (useful with port 0).
        app: the running ``web.Application``, once ``run`` returned.
    """

    def __init__(self, node: APINode, default_model: str, response_timeout: float = DEFAULT_RESPONSE_TIMEOUT,
                 tinychat_dir: Path | None = None, *, defaults: GenerationDefaults | None = None,
                 cors_allow_origin: str = "*", shutdown_timeout: float = 5.0,
                 auth: AuthConfig | None = None, rate_limit: RateLimitConfig | None = None,
                 fallbacks: dict[str, list[str]] | None = None):
        if response_timeout <= 0:
            raise ValueError(f"response_timeout must be > 0 seconds, got {response_timeout}")
        self.node = node
        self.default_model = default_model
        self.response_timeout = response_timeout
        self.tinychat_dir = Path(tinychat_dir).resolve() if tinychat_dir is not None else None
        self.defaults = defaults or GenerationDefaults()
        self.cors_allow_origin = cors_allow_origin
        self.shutdown_timeout = shutdown_timeout
        self.auth = auth or AuthConfig()
        self.rate_limit = rate_limit or RateLimitConfig()
        self.fallbacks = dict(fallbacks or {})
        self.port: int | None = None
        self.app: web.Application | None = None
        self._runner: DialectErrorRunner | None = None

    def create_app(self) -> web.Application:
        """A new ``web.Application`` with every route, middleware and the shared state.

        Serve it with ``handler_cancellation=True`` (as ``run`` does) so that a client
        disconnect cancels its handler, which ends the request on the ring.
        """
        app = web.Application(middlewares=[cors_preflight_middleware, dialect_error_middleware],
                              client_max_size=DEFAULT_CLIENT_MAX_SIZE)
        app[STATE_KEY] = APIState(
            node=self.node,
            default_model=self.default_model,
            response_timeout=self.response_timeout,
            defaults=self.defaults,
            tinychat_dir=self.tinychat_dir,
            created=unix_time(),
            fallbacks=self.fallbacks,
        )
        app.on_response_prepare.append(make_cors_on_prepare(self.cors_allow_origin))
        app.router.add_get("/healthcheck", healthcheck)
        # keys, limits, metrics, health (middlewares run in this order)
        setup_auth(app, self.auth)
        setup_rate_limit(app, self.rate_limit, lambda: len(self.node.topology.nodes))
        metrics.setup(app)
        fallback.setup(app)
        health.setup(app)
        ollama_endpoints.setup_routes(app)
        ollama_models.setup_routes(app)
        ollama_downloads.setup_routes(app)
        anthropic_endpoints.setup_routes(app)
        route_handlers.setup_routes(app)
        model_endpoints.setup_routes(app)
        image_endpoints.setup_routes(app)
        embeddings.setup_routes(app)
        if self.tinychat_dir is not None:
            if not (self.tinychat_dir / "index.html").is_file():
                logger.warning("no index.html in the web UI directory %s", self.tinychat_dir)
            app.router.add_get("/", tinychat_index)
            # every other path outside the API's prefixes; registered last
            app.router.add_get(r"/{path:(?!v1/|api/|healthcheck$).+}", tinychat_file)
        return app

    async def run(self, host: str = "127.0.0.1", port: int = DEFAULT_API_PORT) -> None:
        """Start serving on ``host``:``port`` (0: any free port, see ``self.port``); returns
        once listening.

        Raises:
            RuntimeError: already running.
            OSError: the address cannot be bound.
        """
        if self._runner is not None:
            raise RuntimeError("the API is already running")
        app = self.create_app()
        runner = DialectErrorRunner(app, handler_cancellation=True, shutdown_timeout=self.shutdown_timeout)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self.app = runner, app
        self.port = runner.addresses[0][1]
        logger.info("ChatAPI listening on http://%s:%d (default model %s)", host, self.port, self.default_model)

    async def stop(self) -> None:
        """Stop serving: requests in flight get ``shutdown_timeout`` seconds, then are cancelled
        (which ends them on the ring). Does nothing when not running."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            logger.info("ChatAPI on port %s stopped", self.port)
