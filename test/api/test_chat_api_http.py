"""HTTP-level tests of the ChatAPI on a real node generating with the real DummyInferenceEngine.

The node is real (launcher, Node, gRPC server, aiohttp on 127.0.0.1); only the engine computes
nothing learned, so every answer is known in advance (``expected_tokens``) and decoded with
SmolLM2's real tokenizer. The engine's knobs give what a real model rarely produces on demand:
a failing shard (before and during a stream), silence past the response timeout, slow
generations to disconnect from. End-to-end tests with the real model are in test_chat_api.py
(one node) and test_chat_api_cluster.py (a ring of two).
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from helpers import expected_text, smollm2_gguf_path, wait_for

from exo.api.chat_api.state import STATE_KEY
from exo.api.chatgpt_api import ChatGPTAPI
from exo.inference.dummy import PEAK, expected_tokens
from exo.inference.tokenizers import tokenizer_for_path

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
HI = [{"role": "user", "content": "hi"}]
CHAT = {"model": MODEL, "messages": HI, "max_tokens": 5}
EOS = 2  # SmolLM2's <|im_end|>


@pytest.fixture(scope="module")
def tok():
    return tokenizer_for_path(smollm2_gguf_path())


def chat_ids(tok, messages) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def client(nut) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=nut.base_url, api_key="unused", max_retries=0)


async def post(nut, path: str, body, raw: bool = False) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        data = body if raw else json.dumps(body)
        async with s.post(nut.api_url + path, data=data, headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json()


async def sse_events(nut, path: str, body: dict) -> list:
    """The decoded ``data:`` payloads of a streamed answer ("[DONE]" kept as a string)."""
    events = []
    async with aiohttp.ClientSession() as s:
        async with s.post(nut.api_url + path, json=body) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                line = line.decode().strip()
                if line.startswith("data: "):
                    payload = line[6:]
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def no_request_left(nut) -> None:
    """Wait until the node holds no KV cache, computes nothing and the API answers nothing."""
    state = nut.running.api.app[STATE_KEY]
    await wait_for(lambda: not nut.node.engine.cached_request_ids() and not nut.node.active_request_ids
                   and not state.active_requests, 10.0)


# ---------------------------------------------------------------------------- basics


async def test_healthcheck_models_topology(dummy_api):
    async with aiohttp.ClientSession() as s:
        async with s.get(dummy_api.api_url + "/healthcheck") as r:
            assert r.status == 200 and await r.json() == {"status": "ok"}
        async with s.get(dummy_api.base_url + "/topology") as r:
            parts = (await r.json())["partitions"][MODEL]
            assert [(p["node_id"], p["start_layer"], p["end_layer"]) for p in parts] == [("api-dummy", 0, 29)]
        async with s.get(dummy_api.base_url + "/models/nope") as r:
            body = await r.json()
            assert r.status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    c = client(dummy_api)
    await wait_for(lambda: dummy_api.node.model_state(MODEL) == "ready", 10.0)  # preloaded at start
    await wait_for(lambda: dummy_api.node.model_state("gemma3-270m") == "available", 10.0)  # its package is read at start
    states = {m.id: m.state for m in (await c.models.list()).data}
    assert states[MODEL] == "ready" and states["gemma3-270m"] == "available"  # shipped in a package, not loaded
    assert states["llama-3.2-1b"] == "not downloaded" and len(states) >= 37  # the catalogue
    m = await c.models.retrieve(MODEL)
    assert m.id == MODEL and m.owned_by == "exo" and m.n_layers == 30 and m.state == "ready"


async def test_a_node_alone_loads_its_model_before_the_first_request():
    from helpers import loopback_config

    from exo.orchestration.launcher import start_node

    running = await start_node(loopback_config(node_id="api-dummy-fresh", discovery_module="none", inference_engine="dummy"))
    try:
        async with aiohttp.ClientSession() as s:
            async def ready() -> bool:
                async with s.get(running.api_base_url + "/v1/models") as r:
                    return {m["id"]: m["state"] for m in (await r.json())["data"]}[MODEL] == "ready"

            await wait_for(ready, 10.0)
        assert running.node.engine.calls == 0  # no request ran
    finally:
        await running.stop()


async def test_model_state_follows_the_shard(dummy_api):
    from exo.inference.shard import Shard

    node, c = dummy_api.node, client(dummy_api)
    await wait_for(lambda: node.model_state(MODEL) == "ready", 10.0)
    await node.engine.ensure_shard(Shard(MODEL, 0, 9, 30))  # not this node's part of the ring
    assert (await c.models.retrieve(MODEL)).state == "available"
    await c.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)  # loads its shard again
    assert (await c.models.retrieve(MODEL)).state == "ready"


async def test_chatgpt_api_name_serves_the_same_api(dummy_api, tok):
    api = ChatGPTAPI(dummy_api.node, default_model=MODEL)
    await api.run("127.0.0.1", 0)
    try:
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{api.port}/v1", api_key="x", max_retries=0)
        r = await c.chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
        assert r.choices[0].message.content == expected_text(tok, chat_ids(tok, HI), 3)
    finally:
        await api.stop()


async def test_chat_answer_and_usage_are_exact(dummy_api, tok):
    ids = chat_ids(tok, HI)
    r = await client(dummy_api).chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected_text(tok, ids, 6)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 6, len(ids) + 6)
    await no_request_left(dummy_api)


@pytest.mark.parametrize("stream", [False, True])
async def test_eos_ends_with_stop_and_its_text_never_shows(dummy_api, tok, stream):
    ids = chat_ids(tok, HI)
    dummy_api.node.engine.forced_tokens = {len(ids) + 3: EOS}  # the 4th generated token is EOS
    want = expected_text(tok, ids, 3)
    c = client(dummy_api)
    if stream:
        chunks = [ch async for ch in await c.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=50, stream=True, stream_options={"include_usage": True})]
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        usage = chunks[-1].usage
    else:
        r = await c.chat.completions.create(model=MODEL, messages=HI, max_tokens=50)
        text, finish, usage = r.choices[0].message.content, [r.choices[0].finish_reason], r.usage
    assert text == want and "<|im_end|>" not in text
    assert finish == ["stop"] and usage.completion_tokens == 3


async def test_default_model_roles_and_content_parts(dummy_api, tok):
    messages = [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": None},
                {"role": "user", "content": "again"}]
    status, r = await post(dummy_api, "/v1/chat/completions", {"messages": messages, "max_tokens": 4})
    assert status == 200, r
    assert r["model"] == MODEL
    rendered = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": ""}, {"role": "user", "content": "again"}]
    ids = chat_ids(tok, rendered)  # the dummy's answer depends on every prompt token
    assert r["usage"]["prompt_tokens"] == len(ids)
    assert r["choices"][0]["message"]["content"] == expected_text(tok, ids, 4)


async def test_max_completion_tokens_wins_and_n_choices(dummy_api, tok):
    body = dict(CHAT, max_completion_tokens=2, max_tokens=7, n=2, top_p=0.5, top_k=3, seed=11, temperature=0.5,
                presence_penalty=0.5, frequency_penalty=-1, user="u", metadata={"a": "b"}, store=False)
    status, r = await post(dummy_api, "/v1/chat/completions", body)
    assert status == 200, r
    want = expected_text(tok, chat_ids(tok, HI), 2)
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in r["choices"]] == \
        [(0, want, "length"), (1, want, "length")]
    assert r["usage"]["completion_tokens"] == 4  # counted over both choices


async def test_streaming_equals_non_streaming(dummy_api):
    c = client(dummy_api)
    full = await c.chat.completions.create(model=MODEL, messages=HI, max_tokens=9)
    stream = await c.chat.completions.create(model=MODEL, messages=HI, max_tokens=9, stream=True,
                                             stream_options={"include_usage": True})
    chunks = [ch async for ch in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


async def test_streaming_n_choices_and_done(dummy_api, tok):
    events = await sse_events(dummy_api, "/v1/chat/completions", dict(CHAT, stream=True, n=2))
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" and "usage" not in e for e in events[:-1])
    texts = {0: "", 1: ""}
    for e in events[:-1]:
        assert len(e["choices"]) == 1  # one choice per chunk, as OpenAI streams them
        texts[e["choices"][0]["index"]] += e["choices"][0]["delta"].get("content", "")
    want = expected_text(tok, chat_ids(tok, HI), 5)
    assert texts == {0: want, 1: want}


def _stop_across_tokens(tok, tokens: list[int]) -> tuple[str, int, int]:
    """A 2-character stop string made of the last character of one token's text and the first
    of the next one's, occurring first at that boundary: (stop, its index, tokens up to it)."""
    text, prev = "", ""
    for k in range(1, len(tokens)):
        prev = tok.decode(tokens[:k])
        cur = tok.decode(tokens[: k + 1])
        if prev and len(cur) > len(prev) and "\ufffd" not in cur and not prev[-1].isspace():
            stop = prev[-1] + cur[len(prev)]
            if cur.find(stop) == len(prev) - 1:
                return stop, len(prev) - 1, k + 1
    raise AssertionError(f"no token boundary to put a stop string on in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_string_spanning_tokens(dummy_api, tok, stream):
    tokens = expected_tokens(chat_ids(tok, HI), 12)
    stop, at, consumed = _stop_across_tokens(tok, tokens)
    full = tok.decode(tokens)
    body = dict(CHAT, max_tokens=12, stop=["never-generated-zz", stop])
    if stream:
        events = await sse_events(dummy_api, "/v1/chat/completions", dict(body, stream=True))
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]]
    else:
        status, r = await post(dummy_api, "/v1/chat/completions", body)
        assert status == 200, r
        text, finish = r["choices"][0]["message"]["content"], [r["choices"][0]["finish_reason"]]
        assert r["usage"]["completion_tokens"] == consumed
    assert text == full[:at] and stop not in text
    assert finish == ["stop"]
    await no_request_left(dummy_api)  # the generation was ended on the node


async def test_logprobs(dummy_api, tok):
    tokens = expected_tokens(chat_ids(tok, HI), 5)
    r = await client(dummy_api).chat.completions.create(model=MODEL, messages=HI, max_tokens=5, logprobs=True,
                                                        top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [bytes(c.bytes) for c in content] == [tok.token_bytes(t) for t in tokens]
    assert "".join(c.token for c in content if "\ufffd" not in c.token) in r.choices[0].message.content
    for c in content:
        assert c.logprob == pytest.approx(0.0, abs=1e-9)  # the dummy puts all the mass on its token
        assert [t.token for t in c.top_logprobs][0] == c.token and len(c.top_logprobs) == 2
        assert c.top_logprobs[1].logprob == pytest.approx(-PEAK, abs=1e-3)
    status, r = await post(dummy_api, "/v1/chat/completions", CHAT)
    assert r["choices"][0]["logprobs"] is None


# ---------------------------------------------------------------------------- completions


async def test_completions(dummy_api, tok):
    c = client(dummy_api)
    r = await c.completions.create(model=MODEL, prompt=["A", "B"], max_tokens=2, echo=True)
    assert [ch.text for ch in r.choices] == [p + expected_text(tok, tok.encode(p), 2) for p in "AB"]
    assert [ch.index for ch in r.choices] == [0, 1] and r.choices[0].finish_reason == "length"
    assert r.object == "text_completion" and r.usage.prompt_tokens == 2 and r.usage.completion_tokens == 4
    # a prompt of token ids, with log-probabilities
    ids = tok.encode("The capital of France is")
    tokens = expected_tokens(ids, 4)
    r = await c.completions.create(model=MODEL, prompt=ids, max_tokens=4, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == tok.decode(tokens) and len(lp.tokens) == 4
    assert lp.text_offset[0] == 0 and all(x == pytest.approx(0.0, abs=1e-9) for x in lp.token_logprobs)
    # streamed, with the prompt echoed first
    stream = await c.completions.create(model=MODEL, prompt="A", max_tokens=3, stream=True, echo=True)
    texts = [ch.choices[0].text async for ch in stream]
    assert texts[0] == "A" and "".join(texts) == "A" + expected_text(tok, tok.encode("A"), 3)


async def test_completions_stop(dummy_api, tok):
    tokens = expected_tokens(tok.encode("A"), 12)
    stop, at, _ = _stop_across_tokens(tok, tokens)
    r = await client(dummy_api).completions.create(model=MODEL, prompt="A", max_tokens=12, stop=stop)
    assert r.choices[0].text == tok.decode(tokens)[:at] and r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("body, param", [
    (dict(CHAT, temperature="hot"), "temperature"),
    (dict(CHAT, temperature=3), "temperature"),
    (dict(CHAT, max_tokens=0), "max_tokens"),
    (dict(CHAT, max_completion_tokens=-1), "max_completion_tokens"),
    (dict(CHAT, top_p=0), "top_p"),
    (dict(CHAT, top_k=-2), "top_k"),
    (dict(CHAT, n=0), "n"),
    (dict(CHAT, n=17), "n"),
    (dict(CHAT, seed="1"), "seed"),
    (dict(CHAT, presence_penalty=2.5), "presence_penalty"),
    (dict(CHAT, frequency_penalty=-3), "frequency_penalty"),
    (dict(CHAT, stream="yes"), "stream"),
    (dict(CHAT, frobnicate=1), "frobnicate"),
    (dict(CHAT, stop=""), "stop"),
    (dict(CHAT, stop=[1]), "stop[0]"),
    (dict(CHAT, stop=["x"] * 17), "stop"),
    (dict(CHAT, logprobs="yes"), "logprobs"),
    (dict(CHAT, top_logprobs=2), "top_logprobs"),
    (dict(CHAT, logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(CHAT, stream_options={"include_usage": True}), "stream_options"),
    (dict(CHAT, stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (dict(CHAT, tools=[{"type": "function", "function": {"description": "no name"}}]), "tools[0].function.name"),
    (dict(CHAT, logit_bias={"one": 5}), "logit_bias"),
    (dict(CHAT, logit_bias={"1": 101}), "logit_bias"),
    (dict(CHAT, model=7), "model"),
    (dict(CHAT, messages=[]), "messages"),
    (dict(CHAT, messages="hi"), "messages"),
    (dict(CHAT, messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
    (dict(CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0].type"),
    (dict(CHAT, messages=[{"role": "user"}]), "messages[0].content"),
    (dict(CHAT, messages=[{"role": "user", "content": "x", "extra": 1}]), "messages[0].extra"),
    ({"model": MODEL}, "messages"),
])
async def test_chat_400_names_the_parameter(dummy_api, body, param):
    calls = dummy_api.node.engine.calls
    status, r = await post(dummy_api, "/v1/chat/completions", body)
    assert status == 400, r
    assert r["error"]["param"] == param
    assert param in r["error"]["message"]
    assert r["error"]["type"] == "invalid_request_error"
    assert dummy_api.node.engine.calls == calls  # nothing reached the ring


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL, "prompt": [[]]}, "prompt"),
    ({"model": MODEL, "prompt": [999999]}, "prompt"),
    ({"model": MODEL, "prompt": ["a", [5]]}, "prompt[1]"),
    ({"model": MODEL, "prompt": "A", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "A", "logprobs": 6}, "logprobs"),
    ({"model": MODEL, "prompt": "A", "logprobs": True}, "logprobs"),
    ({"model": MODEL, "prompt": "A", "echo": 1}, "echo"),
    ({"model": MODEL, "prompt": "A", "suffix": "x"}, "suffix"),
    ({"model": MODEL, "prompt": "A", "best_of": 3}, "best_of"),
    ({"model": MODEL, "prompt": "A", "frobnicate": True}, "frobnicate"),
])
async def test_completions_400_names_the_parameter(dummy_api, body, param):
    calls = dummy_api.node.engine.calls
    status, r = await post(dummy_api, "/v1/completions", body)
    assert status == 400, r
    assert r["error"]["param"] == param and param in r["error"]["message"]
    assert dummy_api.node.engine.calls == calls


async def test_malformed_bodies_then_the_node_keeps_serving(dummy_api, tok):
    for path in ("/v1/chat/completions", "/v1/completions"):
        status, r = await post(dummy_api, path, "{not json", raw=True)
        assert status == 400 and r["error"]["code"] == "invalid_json"
        status, r = await post(dummy_api, path, [1, 2])
        assert status == 400 and r["error"]["code"] == "invalid_request_body"
        status, r = await post(dummy_api, path, b"\xff\xfe", raw=True)
        assert status == 400
    status, r = await post(dummy_api, "/v1/chat/completions", CHAT)
    assert status == 200 and r["choices"][0]["message"]["content"] == expected_text(tok, chat_ids(tok, HI), 5)


async def test_404_unknown_model_and_route(dummy_api):
    c = client(dummy_api)
    with pytest.raises(openai.NotFoundError) as e:
        await c.chat.completions.create(model="gpt-4o", messages=HI)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as e:
        await c.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    status, r = await post(dummy_api, "/v1/nothing/here", {})
    assert status == 404 and r["error"]["code"] == "not_found"
    async with aiohttp.ClientSession() as s:
        async with s.get(dummy_api.base_url + "/chat/completions") as resp:
            assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_413_prompt_longer_than_the_context(dummy_api):
    calls = dummy_api.node.engine.calls
    long = "x " * 9000  # > 8192 tokens
    status, r = await post(dummy_api, "/v1/chat/completions", dict(CHAT, messages=[{"role": "user", "content": long}]))
    assert status == 413 and r["error"]["code"] == "context_length_exceeded" and r["error"]["param"] == "messages"
    status, r = await post(dummy_api, "/v1/completions", {"model": MODEL, "prompt": long})
    assert status == 413 and r["error"]["param"] == "prompt"
    assert dummy_api.node.engine.calls == calls


async def test_503_when_no_node_has_the_weights_and_the_hub_is_out_of_reach(dummy_api):
    # a catalogue model not on this machine, with the hub offline (HF_HUB_OFFLINE=1 in the suite)
    c = client(dummy_api)
    listed = {m.id: m for m in (await c.models.list()).data}
    assert listed["qwen2.5-0.5b"].model_extra["state"] == "not downloaded"
    for path, body in (("/v1/chat/completions", {"model": "qwen2.5-0.5b", "messages": HI}),
                       ("/v1/completions", {"model": "qwen2.5-0.5b", "prompt": "x"})):
        status, r = await post(dummy_api, path, body)
        assert status == 503 and r["error"]["code"] == "model_not_available" and "qwen2.5-0.5b" in r["error"]["message"]
        assert r["error"]["type"] == "service_unavailable_error"


@pytest.mark.parametrize("stream", [False, True])
async def test_500_when_the_shard_fails_before_the_first_token(dummy_api, stream):
    dummy_api.node.engine.fail_layer = 0
    status, r = await post(dummy_api, "/v1/chat/completions", dict(CHAT, stream=stream))
    assert status == 500 and r["error"]["code"] == "generation_error"
    assert "api-dummy" in r["error"]["message"] and "DummyEngineError" in r["error"]["message"]
    await no_request_left(dummy_api)


async def test_error_mid_stream_is_an_error_event(dummy_api, tok):
    ids = chat_ids(tok, HI)
    dummy_api.node.engine.fail_layer, dummy_api.node.engine.fail_at_position = 29, len(ids) + 2
    events = await sse_events(dummy_api, "/v1/chat/completions", dict(CHAT, max_tokens=20, stream=True))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "generation_error" and "DummyEngineError" in events[-2]["error"]["message"]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert text == expected_text(tok, ids, 3)[: len(text)] and len(text) > 0
    status, r = await post(dummy_api, "/v1/chat/completions", dict(CHAT, max_tokens=20))
    assert status == 500 and "DummyEngineError" in r["error"]["message"]
    await no_request_left(dummy_api)


async def test_504_when_no_token_comes_in_time(dummy_api):
    dummy_api.node.engine.token_delay = 1.0
    dummy_api.running.api.app[STATE_KEY].response_timeout = 0.3
    status, r = await post(dummy_api, "/v1/chat/completions", CHAT)
    assert status == 504 and r["error"]["code"] == "timeout" and "0.3 s" in r["error"]["message"]
    await no_request_left(dummy_api)  # freed once the engine's step ends


async def test_client_disconnect_mid_stream_ends_the_request(dummy_api):
    engine = dummy_api.node.engine
    engine.token_delay = 0.02
    async with aiohttp.ClientSession() as s:
        async with s.post(dummy_api.base_url + "/chat/completions", json=dict(CHAT, max_tokens=5000, stream=True)) as r:
            assert r.status == 200
            for _ in range(4):
                await r.content.readline()
            assert engine.cached_request_ids()  # generating
            r.close()  # drop the connection mid-stream
    await no_request_left(dummy_api)


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_before_the_first_token_ends_the_request(dummy_api, stream):
    dummy_api.node.engine.token_delay = 0.5  # a slow prefill
    state = dummy_api.running.api.app[STATE_KEY]
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(s.post(dummy_api.base_url + "/chat/completions", json=dict(CHAT, stream=stream)))
        await wait_for(lambda: dummy_api.node.active_request_ids, 5.0)
        task.cancel()  # the client gives up while the node is still on the prompt
        await asyncio.gather(task, return_exceptions=True)
    await wait_for(lambda: not state.active_requests, 5.0)
    await no_request_left(dummy_api)


async def test_images_need_an_image_model(dummy_api):
    c = client(dummy_api)  # image generation itself: test_images_api.py
    with pytest.raises(openai.BadRequestError) as e:
        await c.images.generate(prompt="a cat")
    assert e.value.body["code"] == "missing_required_parameter" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as e:
        await c.images.generate(prompt="a cat", model="dall-e-3")
    assert e.value.body["code"] == "model_not_found"


# ---------------------------------------------------------------------------- CORS and web UI


async def test_cors(dummy_api):
    async with aiohttp.ClientSession() as s:
        headers = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "content-type,authorization"}
        async with s.options(dummy_api.base_url + "/chat/completions", headers=headers) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert r.headers["Access-Control-Allow-Headers"] == "content-type,authorization"
        async with s.post(dummy_api.base_url + "/chat/completions", json=dict(CHAT, stream=True)) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            await r.read()
        async with s.get(dummy_api.base_url + "/models/nope") as r:
            assert r.headers["Access-Control-Allow-Origin"] == "*"


async def test_tinychat_static_files(dummy_api):
    root = dummy_api.api_url
    async with aiohttp.ClientSession() as s:
        async with s.get(root + "/") as r:
            assert r.status == 200 and "tinychat" in await r.text()
        async with s.get(root + "/app.js") as r:
            assert r.status == 200 and await r.text() == "console.log(1)"
        for path in ("/../secret.txt", "/%2e%2e/secret.txt"):
            async with s.get(root + path) as r:
                assert r.status == 404
        async with s.get(root + "/missing.css") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
