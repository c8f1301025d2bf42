"""Fallback models and per-model health (``exo.api.chat_api.fallback``, ``GET /health/{model}``).

* Two real dummy-engine nodes (mDNS + gRPC on 127.0.0.1, their own cluster secret) whose memory
  is sized so that SmolLM2-135M needs both and Gemma 3 270M fits one, with the fallback
  ``smollm2-135m -> gemma3-270m``: after one node is killed, new requests in every dialect are
  answered by the fallback and flagged (``model``, ``X-Exo-Fallback``), ``/health/{model}``
  turns 503 for SmolLM2 with the memory that is missing, and without the fallback the 503 names
  it too.
* The dummy-engine node of ``dummy_api``: a model whose download fails (the hub out of reach)
  is answered by its fallback, and is then known unservable without another download.
* The order of fallbacks (chains, cycles) and the configuration's checks.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import pytest
from helpers import NodeUnderTest, loopback_config, wait_for
from hub_models import hub_env

from exo.api.chat_api.fallback import FALLBACK_HEADER, candidates
from exo.api.chat_api.state import STATE_KEY
from exo.config import ConfigError, parse_config
from exo.models.sources import STORE

pytestmark = pytest.mark.asyncio(loop_scope="session")

BIG, SMALL = "smollm2-135m", "gemma3-270m"
# The dummy engine keeps 4 bytes per parameter: SmolLM2 is 30 layers of 14,160,384 bytes
# (424.8 MB), Gemma 3 270M 18 layers of 22,294,528 bytes (401.3 MB). 413 MB each: SmolLM2
# needs both nodes (29 + 29 layers fit, 29 alone do not), Gemma fits one.
MEMORY = 413_000_000
USER = [{"role": "user", "content": "Hello"}]


async def post(url: str, body: dict) -> tuple[int, dict, dict | list]:
    """(status, headers, JSON body, or for a stream the list of its events' data)."""
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        text = await r.text()
        ctype = r.headers.get("Content-Type", "")
        if "event-stream" in ctype:
            data = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
        elif "ndjson" in ctype:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
        return r.status, dict(r.headers), data


async def get(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


async def kill(running) -> None:
    """As SIGKILL looks from outside: the gRPC server is gone at once, no mDNS goodbye is sent,
    and the node's own tasks stop (its API stops too, so nothing reaches it)."""
    await running.api.stop()
    await running.server.stop(grace=0)
    running.node._background.stopping = True
    for t in list(running.node._background.tasks):
        t.cancel()


def plan_sizes() -> None:
    """The premise of the sizes above, from the real cards."""
    big, small = STORE.card(BIG), STORE.card(SMALL)
    big_layer, small_layer = big.args.layer_params() * 4, small.args.layer_params() * 4
    assert MEMORY // big_layer < big.n_layers <= 2 * (MEMORY // big_layer)
    assert MEMORY // small_layer >= small.n_layers


async def test_a_lost_node_sends_new_requests_to_the_fallback_in_every_dialect():
    from exo.orchestration.launcher import start_node

    plan_sizes()
    secret, tag = uuid.uuid4().hex, uuid.uuid4().hex[:6]
    started = []
    try:
        for name in ("a", "b"):
            started.append(await start_node(loopback_config(
                node_id=f"fb{tag}-{name}", cluster_secret=secret, inference_engine="dummy", memory=MEMORY,
                default_model=BIG, health_check_interval=0.3, chat_templates={SMALL: "chatml"},
                api_options={"fallbacks": {BIG: [SMALL]}})))
        a, b = (NodeUnderTest(r) for r in started)
        big = await a.node.model_card(BIG)
        await wait_for(lambda: all(len(n.node.partition(big)) == 2 for n in (a, b)), timeout=20)

        # both nodes present: the big model answers itself
        status, headers, body = await post(a.base_url + "/chat/completions",
                                           {"model": BIG, "messages": USER, "max_tokens": 3})
        assert status == 200 and body["model"] == BIG and FALLBACK_HEADER not in headers
        status, health = await get(f"{a.api_url}/health/{BIG}")
        assert status == 200 and health["servable"] and health["reason"] is None
        assert health["fallbacks"] == [SMALL] and len(health["ring"]["nodes"]) == 2

        await kill(started[1])
        b_id = b.node.id

        async def big_unservable() -> bool:
            return (await get(f"{a.api_url}/health/{BIG}"))[0] == 503

        await wait_for(big_unservable, timeout=20)
        status, health = await get(f"{a.api_url}/health/{BIG}")
        assert health["status"] == "unavailable" and not health["servable"]
        reason = health["reason"]
        assert "does not fit in the memory of the nodes present" in reason and "1 more layer" in reason
        assert a.node.id in reason and b_id in reason  # the node present, and the one that left
        status, small_health = await get(f"{a.api_url}/health/{SMALL}")
        assert status == 200 and small_health["servable"]
        status, default_health = await get(f"{a.api_url}/health")
        assert status == 503 and default_health["reason"] == reason

        # every dialect: the fallback answers, and says so
        status, headers, body = await post(a.base_url + "/chat/completions",
                                           {"model": BIG, "messages": USER, "max_tokens": 3})
        assert status == 200, body
        assert body["model"] == SMALL and headers[FALLBACK_HEADER] == BIG
        assert body["usage"]["completion_tokens"] == 3
        status, headers, events = await post(a.base_url + "/chat/completions",
                                             {"model": BIG, "messages": USER, "max_tokens": 3, "stream": True})
        assert status == 200 and headers[FALLBACK_HEADER] == BIG and events
        assert {e["model"] for e in events} == {SMALL}
        status, headers, body = await post(a.base_url + "/completions", {"prompt": "Once", "max_tokens": 2})
        assert status == 200 and body["model"] == SMALL and headers[FALLBACK_HEADER] == BIG  # the default model
        for path, extra in (("/api/chat", {"messages": USER}), ("/api/generate", {"prompt": "Once"})):
            status, headers, body = await post(a.api_url + path, {"model": BIG, "stream": False,
                                                                   "options": {"num_predict": 2}, **extra})
            assert status == 200 and body["model"] == SMALL and headers[FALLBACK_HEADER] == BIG, (path, body)
        status, headers, lines = await post(a.api_url + "/api/chat", {"model": BIG, "messages": USER,
                                                                      "options": {"num_predict": 2}})
        assert status == 200 and headers[FALLBACK_HEADER] == BIG and {ln["model"] for ln in lines} == {SMALL}
        status, headers, body = await post(a.base_url + "/messages", {"model": BIG, "messages": USER, "max_tokens": 2})
        assert status == 200 and body["model"] == SMALL and headers[FALLBACK_HEADER] == BIG
        # asked for by name, the fallback is no fallback
        status, headers, body = await post(a.base_url + "/chat/completions",
                                           {"model": SMALL, "messages": USER, "max_tokens": 1})
        assert status == 200 and body["model"] == SMALL and FALLBACK_HEADER not in headers

        # no fallback configured: a 503 in each dialect that names what is missing
        state = a.running.api.app[STATE_KEY]
        state.fallbacks = {}
        status, headers, body = await post(a.base_url + "/chat/completions", {"model": BIG, "messages": USER})
        assert status == 503 and FALLBACK_HEADER not in headers
        assert body["error"]["code"] == "model_not_available" and "1 more layer" in body["error"]["message"]
        status, _, body = await post(a.api_url + "/api/chat", {"model": BIG, "messages": USER, "stream": False})
        assert status == 503 and "1 more layer" in body["error"]
        status, _, body = await post(a.base_url + "/messages", {"model": BIG, "messages": USER, "max_tokens": 2})
        assert status == 503 and body["error"]["type"] == "overloaded_error" and "1 more layer" in body["error"]["message"]
        # a fallback that cannot serve either: both reasons
        state.fallbacks = {BIG: ["no-such-model-zz"]}
        status, _, body = await post(a.base_url + "/chat/completions", {"model": BIG, "messages": USER})
        assert status == 503 and "1 more layer" in body["error"]["message"] and "no-such-model-zz" in body["error"]["message"]
    finally:
        await asyncio.gather(*(r.stop() for r in started), return_exceptions=True)


async def test_a_failed_download_sends_requests_to_the_fallback(dummy_api, tmp_path):
    state = dummy_api.running.api.app[STATE_KEY]
    model = f"exotest/fallback-unreachable-{uuid.uuid4().hex[:6]}"
    state.fallbacks = {model: [BIG]}
    try:
        with hub_env("http://127.0.0.1:9", tmp_path / "hf"):  # the hub out of reach
            for _ in range(2):  # the second is decided from the failure remembered
                status, headers, body = await post(dummy_api.base_url + "/chat/completions",
                                                   {"model": model, "messages": USER, "max_tokens": 2})
                assert status == 200, body
                assert body["model"] == BIG and headers[FALLBACK_HEADER] == model
            assert dummy_api.node.download_failure(model) is not None
            status, health = await get(f"{dummy_api.api_url}/health/{model}")
            assert status == 503 and "cannot reach the hub" in health["reason"] and health["fallbacks"] == [BIG]
            state.fallbacks = {}
            status, _, body = await post(dummy_api.base_url + "/chat/completions",
                                         {"model": model, "messages": USER, "max_tokens": 2})
            assert status == 503 and "cannot reach the hub" in body["error"]["message"]
    finally:
        state.fallbacks = {}
    status, health = await get(f"{dummy_api.api_url}/health/{BIG}")
    assert status == 200 and health["servable"] and health["fallbacks"] == []
    status, body = await get(f"{dummy_api.api_url}/health/no-such-model-zz")
    assert status == 404


async def test_fallback_order_follows_chains_breadth_first_and_ends_on_cycles():
    fallbacks = {"a": ["b", "c"], "b": ["d", "a"], "c": ["b", "e"], "d": ["c"]}
    assert candidates(fallbacks, "a") == ["b", "c", "d", "e"]
    assert candidates(fallbacks, "d") == ["c", "b", "e", "a"]
    assert candidates(fallbacks, "e") == []


async def test_fallbacks_in_the_configuration():
    cfg = parse_config({"model": {"fallbacks": {"llama-3.1-70b": ["llama-3.1-8b", "smollm2-135m"]}}})
    assert cfg.model.fallbacks == {"llama-3.1-70b": ["llama-3.1-8b", "smollm2-135m"]}
    assert cfg.api_options()["fallbacks"] == cfg.model.fallbacks
    with pytest.raises(ConfigError, match=r"model\.fallbacks: .*names itself"):
        parse_config({"model": {"fallbacks": {"a": ["b", "a"]}}})
    with pytest.raises(ConfigError, match=r"model\.fallbacks"):
        parse_config({"model": {"fallbacks": {"a": "b"}}})
