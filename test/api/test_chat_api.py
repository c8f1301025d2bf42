"""End-to-end tests of the API with the real Node, torch engine and SmolLM2-135M model.

The official ``openai`` client talks to a single node on 127.0.0.1. Generations are greedy
(temperature 0) and short, so each request takes about a second on CPU.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import openai
import pytest
import pytest_asyncio
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


async def test_max_tokens_gives_length(aclient):
    r = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}],
                                              temperature=0, max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


async def test_n_choices_equal_at_temperature_0(aclient):
    r = await aclient.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=6, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content
    # counted over both (equal) choices
    assert r.usage.completion_tokens >= 2 and r.usage.completion_tokens % 2 == 0


async def test_stop_string_ends_the_answer(aclient):
    messages = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = await aclient.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    text = full.choices[0].message.content
    assert "3" in text, text
    r = await aclient.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12, stop=["3"])
    assert r.choices[0].message.content == text[: text.index("3")]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < full.usage.completion_tokens


async def test_logprobs(aclient):
    r = await aclient.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=4,
                                              logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content).startswith(r.choices[0].message.content[:1])
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2
        assert c.top_logprobs[0].token == c.token  # greedy picks the most likely token


async def test_completions_endpoint(aclient):
    prompt = "The capital of France is"
    r = await aclient.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4, echo=True)
    assert r.choices[0].text.startswith(prompt) and len(r.choices[0].text) > len(prompt)
    assert r.usage.completion_tokens <= 4
    stream = await aclient.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4, stream=True)
    text = "".join([c.choices[0].text async for c in stream])
    assert prompt + text == r.choices[0].text


async def test_errors_name_the_parameter(aclient):
    with pytest.raises(openai.BadRequestError) as e:
        await aclient.chat.completions.create(model=MODEL, messages=PARIS, temperature=5)
    assert e.value.body["param"] == "temperature" and "temperature" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        await aclient.chat.completions.create(model=MODEL, messages=PARIS, extra_body={"bogus_field": 1})
    assert e.value.body["param"] == "bogus_field"
    with pytest.raises(openai.NotFoundError) as e:
        await aclient.chat.completions.create(model="no-such-model", messages=PARIS)
    assert e.value.body["code"] == "model_not_found"
    models = await aclient.models.list()
    assert MODEL in [m.id for m in models.data]


async def test_client_disconnect_ends_the_request(single_node_api, aclient, monkeypatch):
    node = single_node_api.node
    closed: list[str] = []
    yielded: list[int] = []
    original = node.generate

    async def observed(*args, **kwargs):
        try:
            async for r in original(*args, **kwargs):
                yielded.extend(r.tokens)
                yield r
        finally:
            closed.append("closed")

    monkeypatch.setattr(node, "generate", observed)
    stream = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Write a long essay."}],
                                                   temperature=0, max_tokens=200, stream=True)
    received = 0
    async for chunk in stream:
        received += 1
        if received == 3:
            break
    await stream.close()  # the client hangs up mid-stream
    await wait_for(lambda: closed == ["closed"], 10.0)
    await wait_for(lambda: not node.active_request_ids, 10.0)
    assert len(yielded) < 200  # ended by the disconnect, not by max_tokens
