"""Inputs a hostile client sends, each once a 500 (issue 23): every one now gets a 4xx in its
dialect's own format naming the parameter, or a correct answer, and the node keeps serving.

The node is the real dummy-engine node of ``conftest.dummy_api`` (launcher, Node, gRPC,
aiohttp on 127.0.0.1); requests go over real HTTP, and the protocol-level cases over a raw
socket, as a broken client would send them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import aiohttp
import pytest
from helpers import expected_text, smollm2_gguf_path

from exo.inference.tokenizers import tokenizer_for_path

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok():
    return tokenizer_for_path(smollm2_gguf_path())

# one generating route of each dialect with a body that is valid as it stands
ROUTES = {
    "openai-chat": ("/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 3}),
    "openai-completions": ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3}),
    "anthropic": ("/v1/messages", {"model": MODEL, "messages": HI, "max_tokens": 3}),
    "ollama-chat": ("/api/chat", {"model": MODEL, "messages": HI, "stream": False, "options": {"num_predict": 3}}),
    "ollama-generate": ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 3}}),
}


def assert_dialect_error(path: str, status: int, body, param: str | None = None) -> None:
    """``body`` is an error of ``path``'s dialect; its message (and OpenAI's ``param``) names ``param``."""
    if path.startswith("/api/"):
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        message = body["error"]
    elif path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"], body
        message = body["error"]["message"]
    else:
        assert set(body["error"]) >= {"message", "type", "param", "code"}, body
        message = body["error"]["message"]
        if param is not None:
            assert body["error"]["param"] == param, body
    if param is not None:
        assert param in message, body


async def post_raw(nut, path: str, data: bytes) -> tuple[int, str, object]:
    async with aiohttp.ClientSession() as s:
        async with s.post(nut.api_url + path, data=data, headers={"Content-Type": "application/json"}) as r:
            text = await r.text()
            return r.status, r.headers.get("Content-Type", ""), json.loads(text) if text else None


async def answers(nut) -> None:
    """The node still answers a plain chat request."""
    status, _, body = await post_raw(nut, "/v1/chat/completions", json.dumps(ROUTES["openai-chat"][1]).encode())
    assert status == 200, body


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_json_nested_a_thousand_levels_deep_is_a_400(dummy_api, route):
    path, _ = ROUTES[route]
    for depth in (1000, 100_000):
        status, ctype, body = await post_raw(dummy_api, path, b'{"messages": ' + b"[" * depth + b"]" * depth + b"}")
        assert status == 400 and ctype.startswith("application/json"), (status, body)
        assert_dialect_error(path, status, body)
        assert "nested" in json.dumps(body)
    await answers(dummy_api)


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_a_lone_surrogate_in_a_text_field_is_a_400_naming_it(dummy_api, route):
    path, good = ROUTES[route]
    body = json.loads(json.dumps(good))
    if "messages" in body:
        body["messages"] = [{"role": "user", "content": "a\ud800b"}]
        param = "messages[0].content"
    else:
        body["prompt"] = "a\ud800b"
        param = "prompt"
    data = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as the escape \ud800
    assert b"\\ud800" in data
    status, _, answer = await post_raw(dummy_api, path, data)
    assert status == 400, answer
    assert_dialect_error(path, status, answer, param)
    # a surrogate pair is a character like any other
    ok = data.replace(b"\\ud800", b"\\ud83d\\ude00")
    status, _, answer = await post_raw(dummy_api, path, ok)
    assert status == 200, answer


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_nan_and_infinity_are_a_400_naming_the_parameter(dummy_api, route):
    path, good = ROUTES[route]
    if route.startswith("ollama"):
        names = ["options.temperature", "options.top_p", "options.repeat_penalty", "options.presence_penalty"]
    else:
        names = ["temperature", "top_p"]
    for name in names:
        for literal in (b"NaN", b"Infinity", b"-Infinity"):
            body = json.loads(json.dumps(good))
            target = body
            *parents, leaf = name.split(".")
            for p in parents:
                target = target.setdefault(p, {})
            target[leaf] = "@@"
            data = json.dumps(body).encode().replace(b'"@@"', literal)
            status, _, answer = await post_raw(dummy_api, path, data)
            assert status == 400, (name, literal, answer)
            assert_dialect_error(path, status, answer, name)


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_a_temperature_too_small_for_float32_is_greedy(dummy_api, route):
    path, good = ROUTES[route]
    outputs = []
    for temperature in (0.0, 1e-39, 5e-324, 1e-6):
        body = json.loads(json.dumps(good))
        if route.startswith("ollama"):
            body["options"]["temperature"] = temperature
        else:
            body["temperature"] = temperature
        status, _, answer = await post_raw(dummy_api, path, json.dumps(body).encode())
        assert status == 200, (temperature, answer)
        outputs.append(json.dumps({k: v for k, v in answer.items() if k in ("choices", "content", "message", "response")}
                                  if isinstance(answer, dict) else answer, sort_keys=True))
    assert len(set(outputs)) == 1, outputs  # the dummy engine's answer is the same at any temperature


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 3, "temperature": 1.0}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3, "temperature": 1.0, "n": 2}),
])
async def test_a_negative_seed_is_a_seed_and_one_outside_int64_a_400(dummy_api, path, body):
    for seed in (-1, -(2**63), 2**63 - 1):
        status, _, answer = await post_raw(dummy_api, path, json.dumps(dict(body, seed=seed)).encode())
        assert status == 200, (seed, answer)
    for seed in (2**63, -(2**63) - 1, 2**64):
        status, _, answer = await post_raw(dummy_api, path, json.dumps(dict(body, seed=seed)).encode())
        assert status == 400, (seed, answer)
        assert_dialect_error(path, status, answer, "seed")


async def raw_exchange(nut, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to the API port; the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", nut.running.api.port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), 10)
        return status, headers, body
    finally:
        writer.close()


@pytest.mark.parametrize("request_bytes", [
    b"G@T /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",  # an invalid method token
    b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a request line over 8,190 bytes
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",  # a header line too long
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
])
async def test_errors_aiohttp_answers_itself_are_json(dummy_api, request_bytes):
    status, headers, body = await raw_exchange(dummy_api, request_bytes)
    assert 400 <= status < 500
    assert headers["content-type"].startswith("application/json"), (headers, body)
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    await answers(dummy_api)


# ---------------------------------------------------------------------------- work off the event loop


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_a_15_mb_chat_body_stalls_neither_health_nor_running_streams(dummy_api, tok):
    """Once tokenized on the event loop before the context check: /health stalled 10-13 s."""
    dummy_api.node.engine.token_delay = 0.01
    n_tokens = 150
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x " * 7_500_000}]}).encode()
    assert 15_000_000 <= len(big) < 16 * 1024 * 1024  # under the body limit
    gaps: list[list[float]] = [[] for _ in range(4)]
    streams_started = asyncio.Event()

    async def stream(i: int) -> list[int]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"stream {i}"}], "max_tokens": n_tokens,
                "stream": True}
        tokens = []
        async with aiohttp.ClientSession() as s:
            async with s.post(dummy_api.api_url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                last = time.perf_counter()
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        chunk = json.loads(line[6:])
                        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            tokens.append(chunk["choices"][0]["delta"]["content"])
                            now = time.perf_counter()
                            gaps[i].append(now - last)
                            last = now
                            if len(tokens) == 5 and i == 3:
                                streams_started.set()
        return tokens

    tasks = [asyncio.create_task(stream(i)) for i in range(4)]
    await asyncio.wait_for(streams_started.wait(), 30)
    rss_before = _rss_bytes()
    peak = rss_before
    latencies: list[float] = []
    big_done = asyncio.Event()

    async def poll_health() -> None:
        nonlocal peak
        async with aiohttp.ClientSession() as s:
            while not big_done.is_set():
                t0 = time.perf_counter()
                async with s.get(dummy_api.api_url + "/health") as r:
                    await r.read()
                latencies.append(time.perf_counter() - t0)
                peak = max(peak, _rss_bytes())
                await asyncio.sleep(0.01)

    poller = asyncio.create_task(poll_health())
    try:
        status, _, answer = await post_raw(dummy_api, "/v1/chat/completions", big)
    finally:
        big_done.set()
        await poller
    texts = await asyncio.gather(*tasks)
    assert status == 413 and answer["error"]["code"] == "context_length_exceeded", answer
    assert answer["error"]["param"] == "messages"
    latencies.sort()
    median = latencies[len(latencies) // 2]
    assert len(latencies) >= 3 and median < 0.1 and latencies[-1] < 1.0, latencies
    logger.info("/health during a 15 MB body: median %.1f ms, max %.1f ms over %d requests; RSS +%.0f MiB",
                median * 1e3, latencies[-1] * 1e3, len(latencies), (_rss_bytes() - rss_before) / 2**20)
    for i, t in enumerate(texts):  # every stream got every token
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": f"stream {i}"}], add_generation_prompt=True))
        assert "".join(t) == expected_text(tok, ids, n_tokens), i
        assert max(gaps[i][1:]) < 1.0, max(gaps[i])
    assert peak - rss_before < 1 << 30, f"RSS grew by {(peak - rss_before) / 2**20:.0f} MiB"
    logger.info("peak RSS growth during the 15 MB body: %.0f MiB", (peak - rss_before) / 2**20)


async def test_a_prompt_longer_than_any_context_is_refused_before_tokenizing(dummy_api):
    long = "x" * (8192 * 81 + 1)  # more characters than 8,192 tokens of SmolLM2 hold (81 at most each)
    for path, body in (("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": long}]}),
                       ("/v1/completions", {"model": MODEL, "prompt": long}),
                       ("/v1/messages", {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": long}]}),
                       ("/v1/messages/count_tokens", {"model": MODEL, "messages": [{"role": "user", "content": long}]}),
                       ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": long}]}),
                       ("/api/generate", {"model": MODEL, "prompt": long})):
        status, _, answer = await post_raw(dummy_api, path, json.dumps(body).encode())
        assert status == 413, (path, answer)
        assert_dialect_error(path, status, answer)


# ---------------------------------------------------------------------------- work per request


async def test_one_request_starts_at_most_max_generations_per_request(dummy_api):
    calls = dummy_api.node.engine.calls
    status, _, answer = await post_raw(dummy_api, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": ["a"] * 64, "n": 16, "max_tokens": 1}).encode())
    assert status == 400 and answer["error"]["param"] == "n" and "1024" in answer["error"]["message"], answer
    status, _, answer = await post_raw(dummy_api, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": ["a"] * 17, "max_tokens": 1}).encode())
    assert status == 400 and answer["error"]["param"] == "prompt", answer
    assert dummy_api.node.engine.calls == calls  # nothing reached the ring
    status, _, answer = await post_raw(dummy_api, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": ["a"] * 4, "n": 4, "max_tokens": 1}).encode())
    assert status == 200 and len(answer["choices"]) == 16


async def test_a_model_name_too_long_for_the_file_system_is_a_404(dummy_api):
    name = "x" * 5000  # once OSError ENAMETOOLONG from the local-path check: a 500
    for method, path, body in (("POST", "/v1/chat/completions", {"model": name, "messages": HI}),
                               ("POST", "/api/show", {"model": name}),
                               ("DELETE", "/api/delete", {"model": name}),
                               ("POST", "/v1/messages", {"model": "/" + name, "messages": HI, "max_tokens": 1})):
        async with aiohttp.ClientSession() as s:
            async with s.request(method, dummy_api.api_url + path, json=body) as r:
                assert r.status == 404, (path, await r.text())
                assert_dialect_error(path, r.status, await r.json())


async def test_the_image_routes_refuse_any_body_with_a_4xx(dummy_api):
    for data in (b"[" * 5000 + b"]" * 5000, b'{"model": NaN}', b"\xff"):  # once a RecursionError: a 500
        status, _, answer = await post_raw(dummy_api, "/v1/images/generations", data)
        assert status == 400, answer
        assert_dialect_error("/v1/images/generations", status, answer)
