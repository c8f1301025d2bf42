"""Prometheus metrics of one API application (``GET /metrics``), through ``prometheus_client``.

Each application has its own ``CollectorRegistry``, so several nodes in one process (tests,
benchmarks) never collide. Generation is measured where every dialect meets the node:
``MeteredNode`` wraps the node's ``generate`` (the OpenAI, Ollama and Anthropic handlers all
call it through the app state), so nothing in the handlers needs to know about metrics.

Metrics (all prefixed ``exo_``):
    time_to_first_token_seconds (histogram, model): from the node being asked to generate
        (prompt tokenized) to the first generated token: prefill around the ring.
    inter_token_latency_seconds (histogram, model): between consecutive generated tokens
        (decode steps around the ring).
    generated_tokens_total, prompt_tokens_total (counters, model): tokens.
    generations_total (counter, model, finish_reason): finished generations by how they ended
        ("stop", "length", "error", "cancelled" for a client that went away or a stop string).
    http_requests_total (counter, method, route, status): every HTTP response.
    requests_running, requests_waiting (gauges): generations holding a slot of the request
        queue, and waiting for one (see ``rate_limit.RequestQueue``).
    peers (gauge): peers this node is connected to.
    layers_held (gauge): transformer layers of the shard this node has loaded.
"""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from exo.api.chat_api.state import STATE_KEY

logger = logging.getLogger(__name__)

# seconds; prefill of a short prompt on one CPU node is ~0.05-0.5 s, a ring over slow links more
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# seconds; one decode step of a small model is a few ms, of a large ring hundreds
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class APIMetrics:
    """The metrics of one application, in their own registry.

    Args:
        registry: where to register (default: a fresh ``CollectorRegistry``).
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.ttft = Histogram("exo_time_to_first_token_seconds", "Seconds from generation start to the first token",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("exo_inter_token_latency_seconds", "Seconds between consecutive generated tokens",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self.generated_tokens = Counter("exo_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter("exo_prompt_tokens", "Prompt tokens processed (prefill)", ["model"], registry=r)
        self.generations = Counter("exo_generations", "Generations ended, by finish reason",
                                   ["model", "finish_reason"], registry=r)
        self.http_requests = Counter("exo_http_requests", "HTTP responses", ["method", "route", "status"], registry=r)
        self.requests_running = Gauge("exo_requests_running", "Generations in progress", registry=r)
        self.requests_waiting = Gauge("exo_requests_waiting", "Generations waiting for a slot", registry=r)
        self.peers = Gauge("exo_peers", "Peers this node is connected to", registry=r)
        self.layers_held = Gauge("exo_layers_held", "Transformer layers of the shard this node has loaded", registry=r)

    def observe_tokens(self, model: str, n: int, since_start: float, since_last: float | None) -> None:
        """Record ``n`` tokens that arrived together: the first token of a generation when
        ``since_last`` is None (``since_start`` seconds after it began), else ``since_last``
        seconds after the previous tokens (spread evenly over the ``n``)."""
        if n <= 0:
            return
        if since_last is None:
            self.ttft.labels(model).observe(since_start)
        else:
            per = since_last / n
            child = self.itl.labels(model)
            for _ in range(n):
                child.observe(per)
        self.generated_tokens.labels(model).inc(n)


class MeteredNode:
    """The node as the API sees it, with ``generate`` measured; everything else is the node's.

    Args:
        node: the node (``state.APINode``).
        metrics: where to record.
    """

    def __init__(self, node: Any, metrics: APIMetrics):
        self._node = node
        self._metrics = metrics

    @property
    def wrapped(self) -> Any:
        """The node itself."""
        return self._node

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)

    async def generate(self, model_id: str, prompt_token_ids: list[int], options: Any,
                       request_id: str | None = None) -> AsyncIterator[Any]:
        """``node.generate``, recording time to first token, inter-token latency and tokens.

        Yields and raises exactly what the node's ``generate`` does; closing this iterator
        closes the node's (which ends the request on the ring).
        """
        m = self._metrics
        m.prompt_tokens.labels(model_id).inc(len(prompt_token_ids))
        start = time.perf_counter()
        last: float | None = None
        outcome = "cancelled"
        gen = self._node.generate(model_id, prompt_token_ids, options, request_id)
        try:
            async for result in gen:
                now = time.perf_counter()
                n = len(result.tokens)
                if n:
                    m.observe_tokens(model_id, n, now - start, None if last is None else now - last)
                    last = now
                if result.finish_reason is not None:
                    outcome = result.finish_reason
                yield result
        except Exception:
            outcome = "error"
            raise
        finally:
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()
            m.generations.labels(model_id, outcome).inc()


METRICS_KEY: web.AppKey[APIMetrics] = web.AppKey("exo_metrics", APIMetrics)


async def metrics_handler(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format (or OpenMetrics when the scraper asks for it)."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[METRICS_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


def _layers_held(node: Any) -> int:
    shard = getattr(getattr(node, "engine", None), "shard", None)
    return shard.end_layer - shard.start_layer + 1 if shard is not None else 0


def setup(app: web.Application) -> APIMetrics:
    """Create the app's metrics, measure its node's generations, serve ``GET /metrics``.

    Call after ``rate_limit.setup`` (the running/waiting gauges read its request queue).
    """
    from exo.api.chat_api.rate_limit import REQUEST_QUEUE_KEY

    metrics = APIMetrics()
    app[METRICS_KEY] = metrics
    state = app[STATE_KEY]
    node = state.node
    state.node = MeteredNode(node, metrics)
    queue = app.get(REQUEST_QUEUE_KEY)
    if queue is not None:
        metrics.requests_running.set_function(lambda: queue.running)
        metrics.requests_waiting.set_function(lambda: queue.waiting)
    metrics.peers.set_function(lambda: len(getattr(node, "peers", None) or {}))
    metrics.layers_held.set_function(lambda: _layers_held(node))

    async def count_response(request: web.Request, response: web.StreamResponse) -> None:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics.http_requests.labels(request.method, route, str(response.status)).inc()

    app.on_response_prepare.append(count_response)
    app.router.add_get("/metrics", metrics_handler)
    return metrics
