"""``GET /metrics`` (Prometheus text format, parsed with prometheus_client's own parser) and
``GET /health``, on real nodes: the dummy-engine node of ``dummy_api`` for counters that move
with requests, the two-node cluster of ``two_node_cluster`` for peers, layers and the ring."""

from __future__ import annotations

import aiohttp
import ollama
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exo.api.chat_api import ChatAPI

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
HI = [{"role": "user", "content": "hi"}]


async def scrape(base_url: str, accept: str | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of ``/metrics`` as {(name, sorted labels): value}."""
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as s, s.get(f"{base_url}/metrics", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_move_after_a_request(dummy_api):
    before = await scrape(dummy_api.api_url)
    r = await ollama.AsyncClient(host=dummy_api.api_url).chat(model=MODEL, messages=HI, options={"num_predict": 5})
    assert r.eval_count == 5
    after = await scrape(dummy_api.api_url)

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("exo_generated_tokens_total", model=MODEL) == 5
    assert delta("exo_prompt_tokens_total", model=MODEL) == r.prompt_eval_count
    assert delta("exo_time_to_first_token_seconds_count", model=MODEL) == 1
    assert delta("exo_time_to_first_token_seconds_bucket", model=MODEL, le="+Inf") == 1
    assert delta("exo_inter_token_latency_seconds_count", model=MODEL) == 4
    assert delta("exo_time_to_first_token_seconds_sum", model=MODEL) > 0
    assert delta("exo_generations_total", model=MODEL, finish_reason="length") == 1
    assert delta("exo_http_requests_total", method="POST", route="/api/chat", status="200") == 1
    assert value(after, "exo_requests_running") == 0 and value(after, "exo_requests_waiting") == 0
    assert value(after, "exo_peers") == 0
    assert value(after, "exo_layers_held") == 30  # alone, this node holds every layer


async def test_openmetrics_on_request(dummy_api):
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{dummy_api.api_url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await resp.text()).rstrip().endswith("# EOF")


async def test_each_app_has_its_own_registry(dummy_api):
    """Two APIs over one node in one process: no duplicate-metric error, separate counts."""
    api = ChatAPI(dummy_api.node, default_model=MODEL)
    await api.run("127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{api.port}"
        assert value(await scrape(base), "exo_generated_tokens_total", model=MODEL) == 0
        await ollama.AsyncClient(host=base).generate(model=MODEL, prompt="hi", options={"num_predict": 3})
        assert value(await scrape(base), "exo_generated_tokens_total", model=MODEL) == 3
    finally:
        await api.stop()


async def test_health_of_a_single_node(dummy_api):
    async with aiohttp.ClientSession() as s, s.get(f"{dummy_api.api_url}/health") as resp:
        assert resp.status == 200
        h = await resp.json()
    assert h["status"] == "ok" and h["node_id"] == dummy_api.node.id
    assert h["peers"] == {"count": 0, "ids": []}
    assert h["ring"]["complete"] is True
    assert h["ring"]["nodes"] == [{"node_id": dummy_api.node.id, "start_layer": 0, "end_layer": 29}]
    assert h["model"]["id"] == MODEL


async def test_health_and_metrics_of_a_two_node_ring(two_node_cluster):
    seen = []
    for nut in two_node_cluster:
        async with aiohttp.ClientSession() as s, s.get(f"{nut.api_url}/health") as resp:
            assert resp.status == 200
            h = await resp.json()
        assert h["peers"]["count"] == 1 and h["ring"]["complete"] is True
        ring = h["ring"]["nodes"]
        assert len(ring) == 2 and ring[0]["start_layer"] == 0 and ring[-1]["end_layer"] == 29
        assert ring[0]["end_layer"] + 1 == ring[1]["start_layer"]
        seen.append(ring)
        samples = await scrape(nut.api_url)
        assert value(samples, "exo_peers") == 1
        if h["model"]["loaded"]:
            start, end = h["model"]["layers"]
            assert value(samples, "exo_layers_held") == end - start + 1 < 30
    assert seen[0] == seen[1]  # both nodes see the same ring
