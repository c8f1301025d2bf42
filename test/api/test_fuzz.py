"""Seeded random requests against every route of every dialect (issue 23's fuzz test).

Each body starts from a valid one and is mutated the way a hostile or broken client mutates
it: values replaced by others of every JSON type (huge, negative, tiny, non-finite numbers,
strings with unpaired surrogates or control characters, deep nesting), keys dropped or added,
the whole body replaced by garbage. Asserted for every answer: no 5xx, every error in its
dialect's format, JSON where JSON is due; and throughout, ``/health`` answers fast.

Bounded in count (``N_REQUESTS``) and time (``BUDGET_S``); the seed makes a failure
reproducible (``EXO_FUZZ_SEED`` picks another). The node is the real dummy-engine node of
``conftest.dummy_api``, on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from typing import Any

import aiohttp
import pytest
from test_hostile_input import assert_dialect_error

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.asyncio(loop_scope="session")

SEED = int(os.environ.get("EXO_FUZZ_SEED", "23"))
N_REQUESTS = 400
BUDGET_S = 90.0
MODEL = "smollm2-135m"
HI = [{"role": "user", "content": "hi"}]
OPTS = {"temperature": 0.7, "top_p": 0.9, "seed": 1}

# (method, path, a valid body or None)
ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 4, "n": 1, "stop": ["x"],
                                      "logprobs": True, "top_logprobs": 2, **OPTS}),
    ("POST", "/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 4, "stream": True,
                                   "stream_options": {"include_usage": True}}),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": ["hi", "yo"], "max_tokens": 4, "n": 2, "echo": False,
                                 "logprobs": 1, **OPTS}),
    ("POST", "/completions", {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4, "stream": True}),
    ("POST", "/v1/messages", {"model": MODEL, "messages": HI, "max_tokens": 4, "system": "be brief",
                              "stop_sequences": ["x"], "temperature": 0.5, "top_k": 5}),
    ("POST", "/v1/messages", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                              "max_tokens": 4, "stream": True}),
    ("POST", "/v1/messages/count_tokens", {"model": MODEL, "messages": HI}),
    ("POST", "/api/chat", {"model": MODEL, "messages": HI, "stream": False,
                           "options": {"num_predict": 4, "temperature": 0.5, "seed": 3, "stop": ["x"]}}),
    ("POST", "/api/chat", {"model": MODEL, "messages": HI, "options": {"num_predict": 4}}),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "hi", "stream": False, "system": "s",
                               "options": {"num_predict": 4, "top_k": 3, "top_p": 0.5}}),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "hi", "raw": True, "context": [1, 2],
                               "options": {"num_predict": 4}}),
    ("POST", "/api/show", {"model": MODEL, "verbose": False}),
    ("POST", "/api/pull", {"model": "no-such-model-anywhere", "stream": False}),
    ("DELETE", "/api/delete", {"model": "no-such-model-anywhere"}),
    ("POST", "/v1/images/generations", {"model": "dall-e-2", "prompt": "a cat", "n": 1}),
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{MODEL}", None),
    ("GET", "/v1/topology", None),
    ("GET", "/v1/download/progress", None),
    ("GET", "/api/tags", None),
    ("GET", "/api/ps", None),
    ("GET", "/api/version", None),
    ("GET", "/health", None),
    ("GET", "/healthcheck", None),
    ("GET", "/metrics", None),
]

STRINGS = ["", "hi", MODEL, "a\ud800b", "\udfff", "\x00\x01\x1b[31m", "é😀日本", "<|im_end|>", "{{ 7*7 }}",
           "x" * 5000, "../../etc/passwd", "smollm2-135m:latest", "hf.co/a/b:Q4_K_M", "/nonexistent/model.gguf",
           "user", "assistant", "system", "tool", "text", "image"]
NUMBERS: list[Any] = [0, 1, -1, 2, 3, 16, 17, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, 0.5, -0.5,
                      1e-39, 5e-324, 1e308, -1e308, 2.5, 3.0]
NON_FINITE = ["NaN", "Infinity", "-Infinity"]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of any type; non-finite numbers as marker strings replaced in ``encode``."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice(NUMBERS)
    if kind == 3:
        return rng.choice(STRINGS)
    if kind == 4:
        return f"@@{rng.choice(NON_FINITE)}@@"
    if kind == 5:
        return "".join(chr(rng.randrange(1, 0x10FFFF)) for _ in range(rng.randrange(8)) if True)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return {rng.choice(STRINGS + ["role", "content", "type", "model"]): random_value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return [[[[[[[[rng.choice(NUMBERS)]]]]]]]] if rng.random() < 0.5 else {"a": {"b": {"c": [[{"d": [1]}]]}}}


def mutate(rng: random.Random, body: Any) -> Any:
    """``body`` with one to three random changes at random depths."""
    body = json.loads(json.dumps(body))
    for _ in range(rng.randint(1, 3)):
        target = body
        # walk down into a random container
        for _ in range(rng.randrange(4)):
            if isinstance(target, dict) and target:
                child = target[rng.choice(list(target))]
            elif isinstance(target, list) and target:
                child = rng.choice(target)
            else:
                break
            if not isinstance(child, (dict, list)):
                break
            target = child
        action = rng.randrange(4)
        if isinstance(target, dict):
            keys = list(target)
            if action == 0 and keys:
                del target[rng.choice(keys)]
            elif action == 1:
                target[rng.choice(STRINGS + ["frobnicate", "tools", "logit_bias", "format", "think"])] = random_value(rng)
            elif keys:
                target[rng.choice(keys)] = random_value(rng)
        elif isinstance(target, list):
            if action == 0 and target:
                target.pop(rng.randrange(len(target)))
            elif target:
                target[rng.randrange(len(target))] = random_value(rng)
            else:
                target.append(random_value(rng))
    return body


def encode(rng: random.Random, body: Any) -> bytes:
    """The wire bytes of ``body``, now and then broken in ways JSON itself cannot express."""
    data = json.dumps(body).encode()  # ensure_ascii: unpaired surrogates travel as \\udxxx escapes
    for literal in NON_FINITE:
        data = data.replace(f'"@@{literal}@@"'.encode(), literal.encode())
    r = rng.random()
    if r < 0.03:
        return data[: rng.randrange(len(data) + 1)]  # cut short
    if r < 0.05:
        return b"[" * 5000 + b"]" * 5000
    if r < 0.07:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    return data


async def test_random_requests_get_no_5xx_and_errors_in_their_dialect(dummy_api):
    rng = random.Random(SEED)
    health_latencies: list[float] = []
    done = asyncio.Event()
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + BUDGET_S

    async def watch_health(session: aiohttp.ClientSession) -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            async with session.get(dummy_api.api_url + "/healthcheck") as r:
                assert r.status == 200
                await r.read()
            health_latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.02)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        method, path, body = ROUTES[i % len(ROUTES)]
        data = None if body is None else encode(rng, mutate(rng, body) if rng.random() < 0.9 else body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        async with session.request(method, dummy_api.api_url + path, data=data, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=60)) as r:
            raw = await r.read()
            statuses[r.status] = statuses.get(r.status, 0) + 1
            where = f"#{i} {method} {path} {data[:300] if data else b''!r} -> {r.status} {raw[:300]!r}"
            assert r.status < 500, where
            if r.status >= 400:
                assert r.headers.get("Content-Type", "").startswith("application/json"), where
                assert_dialect_error(path, r.status, json.loads(raw))

    async with aiohttp.ClientSession() as session:
        watcher = asyncio.create_task(watch_health(session))
        try:
            sent = 0
            while sent < N_REQUESTS and time.monotonic() < deadline:
                batch = [one(session, sent + k) for k in range(4)]  # a few at once, as clients do
                await asyncio.gather(*batch)
                sent += len(batch)
        finally:
            done.set()
            await watcher
    health_latencies.sort()
    median, worst = health_latencies[len(health_latencies) // 2], health_latencies[-1]
    logger.info("fuzz: %d requests, statuses %s; /healthcheck median %.1f ms, max %.1f ms", sent,
                dict(sorted(statuses.items())), median * 1e3, worst * 1e3)
    assert sent >= 100
    assert median < 0.1 and worst < 2.0, (median, worst)
    status, = [r.status for r in [await _get(dummy_api, "/health")]]
    assert status == 200  # and the node still serves


async def _get(nut, path: str):
    async with aiohttp.ClientSession() as s:
        async with s.get(nut.api_url + path) as r:
            await r.read()
            return r
