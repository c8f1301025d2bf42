"""Rate limiting per client, and a bounded queue of generations.

* ``TokenBucket`` / ``RateLimiter``: a token bucket per client (a valid API key, else the
  client's address): ``capacity`` requests at once, refilled at ``rate`` requests per second
  (the token bucket of RFC 2697 / RFC 2698, committed burst size = capacity). An empty bucket
  answers 429 with ``Retry-After`` (whole seconds until a token is back).
* ``RequestQueue``: at most ``max_running`` generations at once and ``max_waiting`` more
  waiting for a slot; a request arriving when the queue is full (or waiting past the timeout)
  gets 503 with ``Retry-After`` instead of the queue growing without limit.

* ``check_generations``: one request asks for at most ``max_generations_per_request``
  generations (prompts x ``n``): a 400 before anything is tokenized.

Both apply to API paths only (not the web page, not public paths such as the health checks);
the queue applies to generating requests (chat, completions, messages, generate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from exo.api.chat_api.auth import AUTH_CONFIG_KEY, KEY_ID, is_public, is_service_path
from exo.api.chat_api.dialects import dialect_of, error_response
from exo.api.chat_api.utils import APIError
from exo.config import AuthConfig, RateLimitConfig

logger = logging.getLogger(__name__)

# POST paths that run a generation on the ring
GENERATION_PATHS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/chat/completions", "/completions",
    "/v1/messages", "/api/chat", "/api/generate",
})


@dataclass
class TokenBucket:
    """One client's bucket.

    Attributes:
        tokens: requests that may be made now (fractional while refilling).
        updated: clock time (seconds) ``tokens`` was computed at.
    """

    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by client identity.

    Args:
        rate: tokens (requests) added per second to each bucket (> 0).
        capacity: bucket size: requests a client may make at once (>= 1).
        max_clients: buckets kept; the least recently used is dropped beyond it (a dropped
            client starts again with a full bucket).
        clock: monotonic time in seconds (injectable for tests).

    Raises:
        ValueError: rate <= 0 or capacity < 1.
    """

    def __init__(self, rate: float, capacity: int, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError(f"rate must be > 0 requests per second, got {rate}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 request, got {capacity}")
        self.rate = rate
        self.capacity = capacity
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def acquire(self, client: str) -> float:
        """Take one token from ``client``'s bucket.

        Returns:
            0.0 when the request may proceed, else the seconds until a token is available.
        """
        now = self._clock()
        b = self._buckets.get(client)
        if b is None:
            b = TokenBucket(float(self.capacity), now)
            self._buckets[client] = b
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            b.tokens = min(float(self.capacity), b.tokens + (now - b.updated) * self.rate)
            b.updated = now
            self._buckets.move_to_end(client)
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)


class QueueFullError(Exception):
    """The request queue is full, or a request waited past the queue timeout."""


class RequestQueue:
    """Bounds the generations in progress and those waiting for a slot; waiting requests get
    slots in arrival order.

    Args:
        max_running: generations at once per node of the cluster (None: no limit; they are
            still counted): a ring of more nodes holds more requests in flight.
        max_waiting: requests that may wait for a slot (0: none wait).
        timeout: seconds a request may wait for a slot.
        nodes: the cluster's node count now (default 1).

    Attributes:
        running: requests holding a slot now.
        waiting: requests waiting for one.
    """

    def __init__(self, max_running: int | None, max_waiting: int, timeout: float, nodes: Callable[[], int] = lambda: 1):
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.timeout = timeout
        self.running = 0
        self.waiting = 0
        self._nodes = nodes
        self._freed = asyncio.Condition()

    @property
    def limit(self) -> int | None:
        """Generations at once now: ``max_running`` per node of the cluster."""
        return self.max_running * max(1, self._nodes()) if self.max_running else None

    def _full(self) -> bool:
        limit = self.limit
        return limit is not None and self.running >= limit

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the duration of the block.

        Raises:
            QueueFullError: no slot free and the queue full, or no slot within ``timeout``.
        """
        if self._full() or self.waiting:
            if self.waiting >= self.max_waiting:
                raise QueueFullError(f"{self.running} requests running and {self.waiting} waiting: the queue is full")
            self.waiting += 1
            try:
                async with asyncio.timeout(self.timeout), self._freed:
                    await self._freed.wait_for(lambda: not self._full())
            except TimeoutError:
                raise QueueFullError(f"no free slot within {self.timeout:g} s") from None
            finally:
                self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            async with self._freed:
                self._freed.notify()


RATE_LIMITER_KEY: web.AppKey[RateLimiter | None] = web.AppKey("exo_rate_limiter", RateLimiter)  # None: no rate limit
REQUEST_QUEUE_KEY: web.AppKey[RequestQueue] = web.AppKey("exo_request_queue", RequestQueue)
RATE_CONFIG_KEY: web.AppKey[RateLimitConfig] = web.AppKey("exo_rate_limit_config", RateLimitConfig)


def check_generations(app: web.Application, prompts: int, n: int) -> None:
    """Refuse a request that asks for more than ``max_generations_per_request`` generations.

    Args:
        prompts: prompts in the request (1 but for a completions list).
        n: choices per prompt.

    Raises:
        APIError: 400 naming ``n`` (or ``prompt`` when n is 1), with the limit.
    """
    limit = app[RATE_CONFIG_KEY].max_generations_per_request
    if prompts * n > limit:
        param = "n" if n > 1 else "prompt"
        asked = f"{prompts} prompts x n = {n}" if prompts > 1 else f"n = {n}"
        raise APIError(400, f"Invalid value for '{param}': this request asks for {asked}, {prompts * n} generations; "
                            f"this server runs at most {limit} per request (rate_limit.max_generations_per_request)",
                       param=param, code="invalid_value")


def client_identity(request: web.Request, trust_forwarded_for: bool = False) -> str:
    """``key:<digest>`` for a request with a valid API key, else ``addr:<address>``."""
    kid = request.get(KEY_ID)
    if kid:
        return f"key:{kid}"
    if trust_forwarded_for:
        fwd = request.headers.get("X-Forwarded-For", "")
        first = fwd.split(",")[0].strip()
        if first:
            return f"addr:{first}"
    return f"addr:{request.remote or 'unknown'}"


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """429 for a client over its rate; 503 when the generation queue is full."""
    path = request.path
    auth_cfg: AuthConfig = request.app[AUTH_CONFIG_KEY]
    if request.method == "OPTIONS" or not is_service_path(path) or is_public(path, auth_cfg):
        return await handler(request)
    cfg = request.app[RATE_CONFIG_KEY]
    limiter = request.app[RATE_LIMITER_KEY]
    if limiter is not None:
        wait = limiter.acquire(client_identity(request, cfg.trust_forwarded_for))
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            return error_response(dialect_of(path), 429,
                                  f"Rate limit exceeded: at most {cfg.requests_per_minute:g} requests per minute "
                                  f"(burst {limiter.capacity}); retry after {retry_after} s",
                                  code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)})
    if request.method != "POST" or path not in GENERATION_PATHS:
        return await handler(request)
    queue = request.app[REQUEST_QUEUE_KEY]
    try:
        async with queue.slot():
            return await handler(request)
    except QueueFullError as e:
        logger.warning("503 %s %s: %s", request.method, path, e)
        return error_response(dialect_of(path), 503, f"The server is busy: {e}; retry later",
                              code="server_busy", headers={"Retry-After": "1"})


def setup(app: web.Application, cfg: RateLimitConfig, nodes: Callable[[], int] = lambda: 1) -> None:
    """Install rate limiting and the generation queue (``auth.setup`` must run first);
    ``nodes``: the cluster's node count now, which scales the generations run at once."""
    app[RATE_CONFIG_KEY] = cfg
    app[RATE_LIMITER_KEY] = (RateLimiter(cfg.requests_per_minute / 60.0, cfg.bucket_size, cfg.max_clients)
                             if cfg.rate_enabled else None)
    app[REQUEST_QUEUE_KEY] = RequestQueue(cfg.max_concurrent_requests, cfg.max_queued_requests, cfg.queue_timeout, nodes)
    app.middlewares.append(rate_limit_middleware)
