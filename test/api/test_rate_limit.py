"""Rate limits and the bounded generation queue.

A burst beyond a client's bucket gets 429 with ``Retry-After`` (in each dialect's format, and
as the official clients' rate-limit errors); requests under the limit all succeed; buckets are
per API key; a full generation queue answers 503 instead of growing. The APIs under test are
real ``ChatAPI`` applications on 127.0.0.1 over the dummy-engine node of ``dummy_api``.
"""

from __future__ import annotations

import asyncio

import aiohttp
import anthropic
import openai
import pytest
from helpers import wait_for

from exo.api.chat_api import ChatAPI
from exo.api.chat_api.rate_limit import REQUEST_QUEUE_KEY, RateLimiter, RequestQueue, QueueFullError
from exo.config import AuthConfig, RateLimitConfig

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
HI = [{"role": "user", "content": "hi"}]
BURST = 20  # requests sent at once


async def _start(node, **kwargs) -> ChatAPI:
    api = ChatAPI(node, default_model=MODEL, **kwargs)
    await api.run("127.0.0.1", 0)
    return api


async def _burst(session: aiohttp.ClientSession, url: str, n: int, headers: dict | None = None) -> list[tuple[int, dict, dict]]:
    async def one():
        async with session.get(url, headers=headers or {}) as resp:
            return resp.status, dict(resp.headers), await resp.json()
    return await asyncio.gather(*(one() for _ in range(n)))


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


async def test_token_bucket_refill_and_retry_after():
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, capacity=3, clock=clock)  # 2 requests per second, 3 at once
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0.0  # buckets are per client
    clock.t += 0.25
    assert limiter.acquire("a") == pytest.approx(0.25)  # half a token back
    clock.t += 0.25
    assert limiter.acquire("a") == 0.0
    clock.t += 100
    assert [limiter.acquire("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refilled to capacity, not beyond
    small = RateLimiter(rate=1.0, capacity=1, max_clients=2, clock=clock)
    for c in ("x", "y", "z"):
        small.acquire(c)
    assert len(small) == 2  # the least recently seen client was dropped
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(rate=0, capacity=1)


async def test_burst_beyond_limit_gets_429_with_retry_after(dummy_api):
    # 5 at once, then one per minute: a burst of 20 gets exactly 5 through
    api = await _start(dummy_api.node, rate_limit=RateLimitConfig(requests_per_minute=1, burst=5))
    base = f"http://127.0.0.1:{api.port}"
    try:
        async with aiohttp.ClientSession() as s:
            results = await _burst(s, base + "/api/tags", BURST)
            ok = [r for r in results if r[0] == 200]
            limited = [r for r in results if r[0] == 429]
            assert len(ok) == 5 and len(limited) == BURST - 5
            for _, headers, body in limited:
                assert 1 <= int(headers["Retry-After"]) <= 60
                assert set(body) == {"error"} and "Rate limit" in body["error"]  # Ollama's format
            async with s.get(base + "/v1/models") as resp:
                body = await resp.json()
                assert resp.status == 429 and body["error"]["type"] == "rate_limit_error"  # OpenAI's format
            async with s.post(base + "/v1/messages", json={"model": MODEL, "max_tokens": 2, "messages": HI}) as resp:
                body = await resp.json()
                assert resp.status == 429 and body == {"type": "error", "error": {"type": "rate_limit_error",
                                                                                  "message": body["error"]["message"]}}
            for path in ("/health", "/healthcheck"):  # health checks are never limited
                async with s.get(base + path) as resp:
                    assert resp.status == 200
        with pytest.raises(openai.RateLimitError):
            await openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0).chat.completions.create(
                model=MODEL, messages=HI, max_tokens=2)
        with pytest.raises(anthropic.RateLimitError):
            await anthropic.AsyncAnthropic(base_url=base, api_key="x", max_retries=0).messages.create(
                model=MODEL, messages=HI, max_tokens=2)
    finally:
        await api.stop()


async def test_requests_under_the_limit_all_succeed(dummy_api):
    api = await _start(dummy_api.node, rate_limit=RateLimitConfig(requests_per_minute=60, burst=BURST))
    base = f"http://127.0.0.1:{api.port}"
    try:
        async with aiohttp.ClientSession() as s:
            async def chat():
                async with s.post(base + "/v1/chat/completions",
                                  json={"model": MODEL, "messages": HI, "max_tokens": 2}) as resp:
                    return resp.status
            statuses = await asyncio.gather(*(chat() for _ in range(BURST // 2)))
            statuses += [status for status, _, _ in await _burst(s, base + "/v1/models", BURST // 2 - 1)]
            assert statuses == [200] * (BURST - 1)
    finally:
        await api.stop()


async def test_buckets_are_per_key(dummy_api):
    api = await _start(dummy_api.node, auth=AuthConfig(api_keys=["k1", "k2"]),
                       rate_limit=RateLimitConfig(requests_per_minute=1, burst=3))
    base = f"http://127.0.0.1:{api.port}"
    try:
        async with aiohttp.ClientSession() as s:
            first = await _burst(s, base + "/v1/models", 6, {"Authorization": "Bearer k1"})
            assert sorted(status for status, _, _ in first) == [200] * 3 + [429] * 3
            second = await _burst(s, base + "/v1/models", 3, {"x-api-key": "k2"})  # same address, other key
            assert [status for status, _, _ in second] == [200] * 3
    finally:
        await api.stop()


async def test_full_queue_answers_503(dummy_api):
    dummy_api.node.engine.token_delay = 0.02  # reset by the fixture
    api = await _start(dummy_api.node, rate_limit=RateLimitConfig(max_concurrent_requests=1, max_queued_requests=1))
    base = f"http://127.0.0.1:{api.port}"
    queue = api.app[REQUEST_QUEUE_KEY]
    long_body = {"model": MODEL, "messages": HI, "max_tokens": 2000}
    short_body = {"model": MODEL, "messages": HI, "max_tokens": 2}
    try:
        async with aiohttp.ClientSession() as s:
            async def post(body):
                async with s.post(base + "/v1/chat/completions", json=body) as resp:
                    return resp.status
            running = asyncio.create_task(post(long_body))
            await wait_for(lambda: queue.running == 1, 10)
            waiting = asyncio.create_task(post(short_body))
            await wait_for(lambda: queue.waiting == 1, 10)
            async with s.get(base + "/metrics") as resp:
                text = await resp.text()
            assert "exo_requests_running 1.0" in text and "exo_requests_waiting 1.0" in text
            for path, body in (("/v1/chat/completions", short_body), ("/api/generate", {"model": MODEL, "prompt": "x"}),
                               ("/v1/messages", short_body)):
                async with s.post(base + path, json=body) as resp:
                    assert resp.status == 503 and resp.headers["Retry-After"] == "1", path
            running.cancel()  # the client goes away: its slot frees, the waiting request runs
            assert await waiting == 200
            await wait_for(lambda: queue.running == 0 and queue.waiting == 0, 10)
    finally:
        await api.stop()


async def test_queue_wait_is_bounded_in_time():
    q = RequestQueue(max_running=1, max_waiting=4, timeout=0.05)
    async with q.slot():
        with pytest.raises(QueueFullError, match="no free slot"):
            async with q.slot():
                pass
        assert q.waiting == 0 and q.running == 1
    async with q.slot():
        assert q.running == 1
    assert q.running == 0


async def test_queue_holds_its_limit_per_node_of_the_cluster():
    """Issue 22: a ring of more nodes holds more streams; the limit follows the node count."""
    nodes = [1]
    q = RequestQueue(max_running=1, max_waiting=0, timeout=0.05, nodes=lambda: nodes[0])
    async with q.slot():
        with pytest.raises(QueueFullError, match="queue is full"):
            async with q.slot():
                pass
        nodes[0] = 2  # a node joined
        async with q.slot():
            assert q.running == 2 and q.limit == 2
    assert q.running == 0
