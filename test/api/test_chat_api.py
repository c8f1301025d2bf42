"""End-to-end tests of the API with the real Node, torch engine and SmolLM2-135M model, one node.

The official ``openai`` client talks to a single node on 127.0.0.1. Generations are greedy
(temperature 0) and short, so each request takes about a second on CPU. Every request field
through a ring of two nodes: test_chat_api_cluster.py; exact answers, errors and the HTTP
surface with the dummy engine: test_chat_api_http.py.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
from helpers import wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture
def client(single_node_api) -> openai.OpenAI:
    return openai.OpenAI(base_url=single_node_api.base_url, api_key="x", max_retries=0)


@pytest.fixture
def aclient(single_node_api) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=single_node_api.base_url, api_key="x", max_retries=0)


async def test_paris_non_streaming(single_node_api, client):
    r = await asyncio.to_thread(client.chat.completions.create, model=MODEL, messages=PARIS, temperature=0, max_tokens=10)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    tok = await single_node_api.node.get_tokenizer(MODEL)
    prompt_ids = tok.encode(tok.apply_chat_template(PARIS, add_generation_prompt=True))
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= r.usage.completion_tokens <= 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert "<|im_end|>" not in r.choices[0].message.content


async def test_streaming_matches_non_streaming(aclient):
    kwargs = dict(model=MODEL, messages=PARIS, temperature=0, max_tokens=10)
    full = await aclient.chat.completions.create(**kwargs)
    stream = await aclient.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


async def test_client_disconnect_ends_the_request(single_node_api, aclient):
    from exo.api.chat_api.state import STATE_KEY

    node = single_node_api.node
    stream = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Write a long essay."}],
                                                   temperature=0, max_tokens=500, stream=True)
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    assert node.engine.cached_request_ids()  # generating
    await stream.close()  # the client hangs up mid-stream
    state = single_node_api.running.api.app[STATE_KEY]
    await wait_for(lambda: not node.engine.cached_request_ids() and not node.active_request_ids
                   and not state.active_requests, 10.0)


async def test_model_state_loading_then_ready():
    """A node that starts alone loads its model at once; /v1/models shows it loading, then ready."""
    import aiohttp
    from helpers import loopback_config

    from exo.orchestration.launcher import start_node

    running = await start_node(loopback_config(node_id="api-torch-fresh", discovery_module="none"))
    seen: list[str] = []
    try:
        async with aiohttp.ClientSession() as s:
            async def ready() -> bool:
                async with s.get(running.api_base_url + "/v1/models") as r:
                    state = {m["id"]: m["state"] for m in (await r.json())["data"]}["smollm2-135m"]
                if not seen or seen[-1] != state:
                    seen.append(state)
                return state == "ready"

            await wait_for(ready, 60.0)
    finally:
        await running.stop()
    assert seen[-2:] == ["loading", "ready"] and "loading" in seen
