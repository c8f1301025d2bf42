"""The OpenAI API of a running cluster, checked with the official ``openai`` client.

* A ring of two real nodes (``two_node_cluster``: mDNS + gRPC on 127.0.0.1, SmolLM2-135M split
  between them): every request field, streamed and not, entering through either node; 16
  concurrent greedy requests each answered exactly as alone; a client disconnect frees the
  request's KV cache on every node of the ring.
* A ring of two real nodes with the real DummyInferenceEngine (own cluster secret, so the two
  clusters never mix): an error on the node that is not the API's reaches the client within
  seconds, as an error, before or during a stream; many concurrent requests over HTTP.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import openai
import pytest
import pytest_asyncio
from helpers import NodeUnderTest, expected_text, loopback_config, wait_for

from exo.api.chat_api.state import STATE_KEY
from exo.inference.dummy import expected_tokens
from exo.models.sources import STORE

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
FOX = [{"role": "user", "content": "Write a story about a fox."}]
STORY = [{"role": "system", "content": "You are a storyteller."},
         {"role": "user", "content": [{"type": "text", "text": "Tell me a story "}, {"type": "text", "text": "about a fox."}]}]


def client(nut: NodeUnderTest, timeout: float = 120.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=nut.base_url, api_key="unused", max_retries=0, timeout=timeout)


async def no_cache_anywhere(nodes: list[NodeUnderTest], timeout: float = 15.0) -> None:
    """Wait until no node of ``nodes`` holds a KV cache or computes a request."""
    await wait_for(lambda: all(not n.node.engine.cached_request_ids() and not n.node.active_request_ids for n in nodes),
                   timeout)


def stop_across_tokens(texts: list[str]) -> tuple[str, int]:
    """A 3-character stop string spanning at least two tokens (``texts``: each token's text): the
    last two characters before a token boundary and the first after it, where it first occurs
    and not at the very start. Returns (stop, its index)."""
    full, pos = "".join(texts), 0
    for k in range(1, len(texts)):
        pos += len(texts[k - 1])
        stop = full[pos - 2: pos + 1]
        if pos >= 3 and texts[k] and full.find(stop) == pos - 2 and "\ufffd" not in stop:
            return stop, pos - 2
    raise AssertionError(f"no token boundary to put a stop string on in {texts}")


# ---------------------------------------------------------------------------- every field, real model


async def test_every_chat_field_streamed_and_not(two_node_cluster):
    a, b = (client(n) for n in two_node_cluster)
    kwargs = dict(model=MODEL, messages=STORY, temperature=0.8, top_p=0.95, extra_body={"top_k": 40}, seed=1234,
                  max_completion_tokens=12, presence_penalty=0.3, frequency_penalty=0.3, n=2, logprobs=True,
                  top_logprobs=3, user="tester")
    first = await a.chat.completions.create(**kwargs)
    again = await b.chat.completions.create(**kwargs)  # same seed, entering through the other node
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    assert again.usage == first.usage
    tok = await two_node_cluster[0].node.get_tokenizer(MODEL)
    rendered = [{"role": "system", "content": "You are a storyteller."},
                {"role": "user", "content": "Tell me a story about a fox."}]
    assert first.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(rendered)))
    assert [c.index for c in first.choices] == [0, 1]
    n_tokens = 0
    for c in first.choices:
        assert c.finish_reason in ("stop", "length")
        content = c.logprobs.content
        n_tokens += len(content)
        assert len(content) <= 12 and (c.finish_reason == "stop" or len(content) == 12)
        assert b"".join(bytes(t.bytes) for t in content).decode("utf-8") == c.message.content
        for t in content:
            assert t.logprob <= 0 and len(t.top_logprobs) == 3
            assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    assert first.usage.completion_tokens == n_tokens
    assert first.usage.total_tokens == first.usage.prompt_tokens + n_tokens

    stream = await a.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    texts, tokens, finish = ["", ""], [[], []], [None, None]
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            tokens[c.index] += [t.token for t in (c.logprobs.content if c.logprobs else [])]
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.message.content for c in first.choices]
    assert tokens == [[t.token for t in c.logprobs.content] for c in first.choices]
    assert finish == [c.finish_reason for c in first.choices]
    assert chunk.choices == [] and chunk.usage == first.usage


async def test_multi_token_stop_streamed_and_not(two_node_cluster):
    a, b = (client(n) for n in two_node_cluster)
    full = await a.chat.completions.create(model=MODEL, messages=FOX, temperature=0, max_tokens=16, logprobs=True)
    texts = [t.token for t in full.choices[0].logprobs.content]
    assert "".join(texts) == full.choices[0].message.content
    stop, at = stop_across_tokens(texts)
    want = full.choices[0].message.content[:at]
    r = await b.chat.completions.create(model=MODEL, messages=FOX, temperature=0, max_tokens=16,
                                        stop=["never-generated-zz", stop])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < full.usage.completion_tokens
    text = ""
    async for chunk in await a.chat.completions.create(model=MODEL, messages=FOX, temperature=0, max_tokens=16,
                                                       stop=stop, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            last = chunk.choices[0].finish_reason or None
    assert text == want and last == "stop"
    await no_cache_anywhere(two_node_cluster)


async def test_sampling_fields_are_honoured(two_node_cluster):
    a = client(two_node_cluster[1])
    base = dict(model=MODEL, messages=FOX, max_tokens=10)
    greedy = (await a.chat.completions.create(**base, temperature=0)).choices[0].message.content
    # top_k=1 and a tiny top_p leave one candidate: hot sampling is greedy again
    assert (await a.chat.completions.create(**base, temperature=1.5, extra_body={"top_k": 1}, seed=5)).choices[0].message.content == greedy
    assert (await a.chat.completions.create(**base, temperature=1.5, top_p=1e-6, seed=5)).choices[0].message.content == greedy
    # strong penalties on the words already said change the greedy answer
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        assert (await a.chat.completions.create(**base, temperature=0, **penalty)).choices[0].message.content != greedy
    r = await a.chat.completions.create(**dict(base, max_tokens=3), temperature=0, n=2)
    assert [c.finish_reason for c in r.choices] == ["length", "length"] and r.usage.completion_tokens == 6
    assert r.choices[0].message.content == r.choices[1].message.content == greedy[: len(r.choices[0].message.content)]


async def test_completions_streamed_and_not(two_node_cluster):
    a, b = (client(n) for n in two_node_cluster)
    prompts = ["The capital of France is", "1, 2, 3,"]
    r = await a.completions.create(model=MODEL, prompt=prompts, temperature=0, max_tokens=5, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    for c, p in zip(r.choices, prompts):
        assert c.text.startswith(p) and len(c.text) > len(p)
    assert r.usage.completion_tokens <= 10
    lp = await b.completions.create(model=MODEL, prompt=prompts[1], temperature=0, max_tokens=5, logprobs=2)
    assert prompts[1] + lp.choices[0].text == r.choices[1].text
    assert "".join(lp.choices[0].logprobs.tokens) == lp.choices[0].text
    assert all(len(alt) == 2 for alt in lp.choices[0].logprobs.top_logprobs)
    stop, at = stop_across_tokens(lp.choices[0].logprobs.tokens)
    pieces = [c.choices[0].text async for c in await a.completions.create(
        model=MODEL, prompt=prompts[1], temperature=0, max_tokens=5, stop=stop, stream=True)]
    assert "".join(pieces) == lp.choices[0].text[:at]


# ---------------------------------------------------------------------------- concurrency, real model


TOPICS = ["the sea", "a cat", "Paris", "robots", "bread", "winter", "a dragon", "music", "trains", "the moon",
          "coffee", "a forest", "rain", "chess", "a lighthouse", "bees"]


async def test_16_concurrent_greedy_requests_each_get_their_own_answer(two_node_cluster):
    clients = [client(n, timeout=240.0) for n in two_node_cluster]

    async def ask(i: int) -> tuple[str, int]:
        r = await clients[i % 2].chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Write one sentence about {TOPICS[i]}."}],
            temperature=0, max_tokens=8)
        return r.choices[0].message.content, r.usage.completion_tokens

    alone = [await ask(i) for i in range(len(TOPICS))]
    together = await asyncio.wait_for(asyncio.gather(*(ask(i) for i in range(len(TOPICS)))), 300)
    assert together == alone
    assert len(set(alone)) > 8  # different prompts, different answers
    await no_cache_anywhere(two_node_cluster)


# ---------------------------------------------------------------------------- disconnect, real model


async def test_client_disconnect_frees_the_kv_cache_on_every_node(two_node_cluster):
    stream = await client(two_node_cluster[0]).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long essay about rivers."}],
        temperature=0, max_tokens=500, stream=True)
    received = 0
    async for _ in stream:
        received += 1
        if received == 4:
            break
    for n in two_node_cluster:  # the request is in flight: each node holds its KV cache
        assert n.node.engine.cached_request_ids(), n.node.id
    await stream.close()  # the client hangs up mid-stream
    await no_cache_anywhere(two_node_cluster)
    assert not two_node_cluster[0].running.api.app[STATE_KEY].active_requests


# ---------------------------------------------------------------------------- a dummy ring


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def dummy_ring() -> AsyncIterator[list[NodeUnderTest]]:
    """Two dummy-engine nodes that found each other over mDNS; [0] is the API node."""
    from exo.orchestration.launcher import start_node

    nodes = []
    try:
        for name in ("dring-a", "dring-b"):
            nodes.append(await start_node(loopback_config(node_id=name, inference_engine="dummy", response_timeout=60.0,
                                                          cluster_secret="api-cluster-tests")))
        card = STORE.card(MODEL)
        await wait_for(lambda: all(len(n.node.partition(card)) == 2 for n in nodes), 20)
        await wait_for(lambda: all(n.node.model_state(MODEL) == "ready" for n in nodes), 20)
        yield [NodeUnderTest(n) for n in nodes]
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


def _shard_of(nut: NodeUnderTest):
    return nut.node.engine.shard


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("when", ["prefill", "decode"])
async def test_error_on_the_other_node_reaches_the_client_within_seconds(dummy_ring, stream, when):
    origin, other = dummy_ring
    tok = await origin.node.get_tokenizer(MODEL)
    messages = [{"role": "user", "content": f"fail at {when}"}]
    ids = tok.encode(tok.apply_chat_template(messages))
    engine = other.node.engine
    engine.fail_layer = _shard_of(other).end_layer
    engine.fail_at_position = 0 if when == "prefill" else len(ids) + 2  # after 3 tokens
    c = client(origin, timeout=60.0)
    t0 = time.monotonic()
    try:
        if stream and when == "decode":
            chunks = []
            with pytest.raises(openai.APIError) as e:
                async for chunk in await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=50,
                                                                    stream=True):
                    chunks.append(chunk)
            text, want = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), expected_text(tok, ids, 3)
            if other.node.id == other.node.partition(STORE.card(MODEL))[-1].node_id:
                assert text == want  # all the failing last node sent before its error
            else:  # tokens sent by the other node may still be on their way when the error arrives
                assert want.startswith(text)
        else:
            with pytest.raises(openai.InternalServerError) as e:
                await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=50, stream=stream)
        elapsed = time.monotonic() - t0
    finally:
        engine.fail_layer, engine.fail_at_position = None, 0
    assert "dring-b" in str(e.value) and "DummyEngineError" in str(e.value)
    assert elapsed < 10.0  # an error, not the 60 s response timeout
    await no_cache_anywhere(dummy_ring)
    r = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)  # the ring keeps serving
    assert r.choices[0].message.content == expected_text(tok, ids, 4)


async def test_many_concurrent_requests_on_a_dummy_ring(dummy_ring):
    tok = await dummy_ring[0].node.get_tokenizer(MODEL)
    clients = [client(n) for n in dummy_ring]

    async def ask(i: int) -> None:
        messages = [{"role": "user", "content": f"request {i}"}]
        ids = tok.encode(tok.apply_chat_template(messages))
        r = await clients[i % 2].chat.completions.create(model=MODEL, messages=messages, max_tokens=20, n=1 + i % 2)
        for c in r.choices:
            assert c.message.content == expected_text(tok, ids, 20), i

    await asyncio.wait_for(asyncio.gather(*(ask(i) for i in range(48))), 120)
    await no_cache_anywhere(dummy_ring)


async def test_tokens_reach_the_origin_in_order(dummy_ring):
    """The last node sends each token to the origin while the next step already runs; with a fast
    engine the next token's delivery used to overtake it, and the origin lost or swapped tokens."""
    from exo.inference.generation import GenerationOptions

    card = STORE.card(MODEL)
    origin = next(n for n in dummy_ring if n.node.id == n.node.partition(card)[0].node_id)  # not the last node
    for i in range(30):
        prompt = [1, 100 + i, 200]
        got = []
        async for r in origin.node.generate(MODEL, prompt, GenerationOptions(max_tokens=50)):
            got += r.tokens
        assert got == expected_tokens(prompt, 50), i
