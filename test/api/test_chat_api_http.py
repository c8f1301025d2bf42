"""HTTP-level tests of ChatAPI against a scripted fake node (fast, deterministic).

They cover what the real node rarely produces on demand: failures before and during a stream,
no node available, silence past the response timeout, and that every way a request ends
(finish, stop string, client disconnect) closes the node's generator. The end-to-end tests
with the real node and model are in test_chat_api.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import AsyncIterator, Callable

import aiohttp
import openai
import pytest
import pytest_asyncio
from helpers import wait_for

from exo.api.chat_api import ChatAPI
from exo.api.chat_api.state import STATE_KEY
from exo.api.chatgpt_api import ChatGPTAPI
from exo.inference.generation import GenerationOptions
from exo.inference.tokenizers import Tokenizer
from exo.models.registry import ModelCard
from exo.orchestration.errors import GenerationError, ModelNotFoundError, NoNodeAvailableError
from exo.orchestration.request import TokenResult

TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
CARD = ModelCard("tiny", "Tiny test model", n_layers=2, architecture="llama", context_length=64)

Script = Callable[[list[int], GenerationOptions], AsyncIterator[TokenResult]]


class FakeNode:
    """The API-facing surface of Node, generating what ``script`` yields (default: "Hello world!")."""

    id = "fake-node"

    def __init__(self, tokenizer: Tokenizer, words: list[int]):
        self.tokenizer = tokenizer
        self.words = words
        self.script: Script | None = None
        self.calls: list[tuple[str | None, list[int], GenerationOptions]] = []
        self.closed: list[str | None] = []

    def available_models(self) -> list[ModelCard]:
        return [CARD]

    def topology_dict(self) -> dict:
        return {"nodes": {self.id: {}}, "edges": [], "partitions": {"tiny": [{"node_id": self.id, "start_layer": 0, "end_layer": 1}]}}

    async def get_tokenizer(self, model_id: str) -> Tokenizer:
        if model_id != CARD.model_id:
            raise ModelNotFoundError(f"unknown model {model_id!r}")
        return self.tokenizer

    async def _default(self, prompt_ids: list[int], options: GenerationOptions) -> AsyncIterator[TokenResult]:
        for i, tok in enumerate(self.words):
            last = i + 1 >= options.max_tokens
            yield TokenResult("r", [tok], finish_reason="length" if last else None,
                              logprobs=[-0.5] if options.logprobs else [],
                              top_logprobs=[[(tok, -0.5)][: options.top_logprobs]] if options.logprobs else [])
            if last:
                return
        yield TokenResult("r", [], finish_reason="stop")

    async def generate(self, model_id: str, prompt_token_ids: list[int], options: GenerationOptions,
                       request_id: str | None = None) -> AsyncIterator[TokenResult]:
        self.calls.append((request_id, list(prompt_token_ids), options))
        try:
            script = self.script or self._default
            async for r in script(prompt_token_ids, options):
                yield r
        finally:
            self.closed.append(request_id)


class Server:
    def __init__(self, api: ChatAPI, node: FakeNode):
        self.api, self.node = api, node
        self.root = f"http://127.0.0.1:{api.port}"
        self.base_url = f"{self.root}/v1"


@pytest.fixture
def tinychat_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tinychat"
    d.mkdir()
    (d / "index.html").write_text("<html>tinychat</html>")
    (d / "app.js").write_text("console.log(1)")
    (tmp_path / "secret.txt").write_text("secret")
    return d


@pytest_asyncio.fixture
async def server(tiny_vocab, tinychat_dir) -> AsyncIterator[Server]:
    v = tiny_vocab
    tok = Tokenizer(v.tokenizer._tok, chat_template=TEMPLATE, bos_token_id=None, eos_token_ids=[v.eos],
                    special_token_ids=[v.eos])
    node = FakeNode(tok, [v.word("Hello"), v.word(" world"), v.word("!")])
    api = ChatGPTAPI(node, default_model="tiny", response_timeout=2.0, tinychat_dir=tinychat_dir)
    await api.run("127.0.0.1", 0)
    try:
        yield Server(api, node)
    finally:
        await api.stop()


async def post(srv: Server, path: str, body, raw: bool = False) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        data = body if raw else json.dumps(body)
        async with s.post(srv.root + path, data=data, headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json()


async def sse_events(srv: Server, path: str, body: dict) -> list:
    """The decoded ``data:`` payloads of a streamed answer ("[DONE]" kept as a string)."""
    events = []
    async with aiohttp.ClientSession() as s:
        async with s.post(srv.root + path, json=body) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                line = line.decode().strip()
                if line.startswith("data: "):
                    payload = line[6:]
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


# ---------------------------------------------------------------------------- basics


@pytest.mark.asyncio
async def test_healthcheck_models_topology(server):
    async with aiohttp.ClientSession() as s:
        async with s.get(server.root + "/healthcheck") as r:
            assert r.status == 200 and await r.json() == {"status": "ok"}
        async with s.get(server.base_url + "/topology") as r:
            assert (await r.json())["partitions"]["tiny"][0]["node_id"] == "fake-node"
        async with s.get(server.base_url + "/models/nope") as r:
            body = await r.json()
            assert r.status == 404 and body["error"]["code"] == "model_not_found"
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    m = await client.models.retrieve("tiny")
    assert m.id == "tiny" and m.owned_by == "exo"


@pytest.mark.asyncio
async def test_chat_non_streaming(server):
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    r = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.content == "Hello world!"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    prompt_ids = server.node.tokenizer.encode("user: hi\nassistant:")
    assert server.node.calls[0][1] == prompt_ids
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == 3
    opts = server.node.calls[0][2]
    assert opts.temperature == 0 and opts.stop_token_ids == (server.node.tokenizer.eos_token_ids[0],)
    assert opts.max_tokens == CARD.context_length - len(prompt_ids)  # default: the rest of the context
    await wait_for(lambda: len(server.node.closed) == 1, 5.0)


@pytest.mark.asyncio
async def test_missing_model_means_the_default_model(server):
    status, r = await post(server, "/v1/chat/completions", {"messages": [{"role": "developer", "content": "be brief"},
                                                                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert status == 200, r
    assert r["model"] == "tiny"
    assert server.node.calls[0][1] == server.node.tokenizer.encode("system: be brief\nuser: hi\nassistant:")


@pytest.mark.asyncio
async def test_chat_defaults_and_options_reach_the_node(server):
    body = dict(CHAT, max_completion_tokens=2, max_tokens=7, top_p=0.5, top_k=3, seed=11, presence_penalty=0.5,
                frequency_penalty=-1, n=2, user="u", metadata={"a": "b"}, store=False)
    status, r = await post(server, "/v1/chat/completions", body)
    assert status == 200, r
    assert [c["message"]["content"] for c in r["choices"]] == ["Hello world", "Hello world"]
    assert [c["finish_reason"] for c in r["choices"]] == ["length", "length"]
    assert r["usage"]["completion_tokens"] == 4
    opts = sorted((c[2] for c in server.node.calls), key=lambda o: o.seed)
    assert [o.seed for o in opts] == [11, 12]
    assert opts[0].max_tokens == 2 and opts[0].top_p == 0.5 and opts[0].top_k == 3
    assert opts[0].temperature == 1.0  # OpenAI's default
    assert opts[0].presence_penalty == 0.5 and opts[0].frequency_penalty == -1


@pytest.mark.asyncio
async def test_chat_streaming_with_openai_client(server):
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world!"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


@pytest.mark.asyncio
async def test_streaming_n_choices(server):
    events = await sse_events(server, "/v1/chat/completions", dict(CHAT, stream=True, n=2))
    assert events[-1] == "[DONE]"
    texts = {0: "", 1: ""}
    for e in events[:-1]:
        assert len(e["choices"]) == 1  # one choice per chunk
        texts[e["choices"][0]["index"]] += e["choices"][0]["delta"].get("content", "")
    assert texts == {0: "Hello world!", 1: "Hello world!"}
    await wait_for(lambda: len(server.node.closed) == 2, 5.0)


@pytest.mark.asyncio
async def test_stream_ends_with_done(server):
    events = await sse_events(server, "/v1/chat/completions", dict(CHAT, stream=True))
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert "usage" not in events[0]


@pytest.mark.asyncio
async def test_stop_string_spanning_tokens_closes_the_generation(server):
    status, r = await post(server, "/v1/chat/completions", dict(CHAT, stop=["lo wor"]))
    assert status == 200
    assert r["choices"][0]["message"]["content"] == "Hel"
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == 2
    await wait_for(lambda: len(server.node.closed) == 1, 5.0)


@pytest.mark.asyncio
async def test_logprobs(server):
    status, r = await post(server, "/v1/chat/completions", dict(CHAT, logprobs=True, top_logprobs=1))
    assert status == 200, r
    content = r["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["Hello", " world", "!"]
    assert content[1]["logprob"] == -0.5 and content[1]["top_logprobs"][0]["token"] == " world"
    assert server.node.calls[0][2].logprobs and server.node.calls[0][2].top_logprobs == 1


# ---------------------------------------------------------------------------- completions


@pytest.mark.asyncio
async def test_completions(server):
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    r = await client.completions.create(model="tiny", prompt=["A", "B"], max_tokens=2, echo=True)
    assert [c.text for c in r.choices] == ["AHello world", "BHello world"]
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 2 and r.usage.completion_tokens == 4
    r = await client.completions.create(model="tiny", prompt="A", logprobs=1, stop="!")
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "Hello world" and lp.tokens == ["Hello", " world"] and lp.text_offset == [0, 5]
    stream = await client.completions.create(model="tiny", prompt="A", stream=True, echo=True)
    texts = [c.choices[0].text async for c in stream]
    assert "".join(texts) == "AHello world!"


# ---------------------------------------------------------------------------- errors


@pytest.mark.asyncio
@pytest.mark.parametrize("body, param", [
    (dict(CHAT, temperature="hot"), "temperature"),
    (dict(CHAT, temperature=3), "temperature"),
    (dict(CHAT, max_tokens=0), "max_tokens"),
    (dict(CHAT, top_p=0), "top_p"),
    (dict(CHAT, n=0), "n"),
    (dict(CHAT, stream="yes"), "stream"),
    (dict(CHAT, frobnicate=1), "frobnicate"),
    (dict(CHAT, stop=""), "stop"),
    (dict(CHAT, top_logprobs=2), "top_logprobs"),
    (dict(CHAT, stream_options={"include_usage": True}), "stream_options"),
    (dict(CHAT, tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (dict(CHAT, messages=[]), "messages"),
    (dict(CHAT, messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
    (dict(CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0].type"),
    (dict(CHAT, messages=[{"role": "user"}]), "messages[0].content"),
    ({"model": "tiny"}, "messages"),
])
async def test_400_names_the_parameter(server, body, param):
    status, r = await post(server, "/v1/chat/completions", body)
    assert status == 400, r
    assert r["error"]["param"] == param
    assert param in r["error"]["message"]
    assert r["error"]["type"] == "invalid_request_error"
    assert server.node.calls == []


@pytest.mark.asyncio
async def test_400_invalid_json_and_completion_params(server):
    status, r = await post(server, "/v1/chat/completions", "{not json", raw=True)
    assert status == 400 and r["error"]["code"] == "invalid_json"
    status, r = await post(server, "/v1/chat/completions", [1, 2])
    assert status == 400
    status, r = await post(server, "/v1/completions", {"model": "tiny", "prompt": "A", "suffix": "x"})
    assert status == 400 and r["error"]["param"] == "suffix" and r["error"]["code"] == "unsupported_parameter"
    status, r = await post(server, "/v1/completions", {"model": "tiny", "prompt": [999999]})
    assert status == 400 and r["error"]["param"] == "prompt"
    status, r = await post(server, "/v1/completions", {"model": "tiny", "prompt": "A", "logprobs": 6})
    assert status == 400 and r["error"]["param"] == "logprobs"


@pytest.mark.asyncio
async def test_404_unknown_model_and_route(server):
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    status, r = await post(server, "/v1/nothing/here", {})
    assert status == 404 and r["error"]["code"] == "not_found"
    async with aiohttp.ClientSession() as s:
        async with s.get(server.base_url + "/chat/completions") as resp:
            assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"


@pytest.mark.asyncio
async def test_413_prompt_longer_than_context(server):
    status, r = await post(server, "/v1/chat/completions", dict(CHAT, messages=[{"role": "user", "content": "x" * 100}]))
    assert status == 413 and r["error"]["code"] == "context_length_exceeded"
    assert server.node.calls == []


@pytest.mark.asyncio
async def test_503_when_no_node_can_serve(server):
    async def none_available(prompt_ids, options):
        raise NoNodeAvailableError("weights missing everywhere")
        yield  # pragma: no cover

    server.node.script = none_available
    status, r = await post(server, "/v1/chat/completions", CHAT)
    assert status == 503 and "weights missing" in r["error"]["message"]
    status, r = await post(server, "/v1/chat/completions", dict(CHAT, stream=True))
    assert status == 503


@pytest.mark.asyncio
async def test_generation_error_before_and_during_stream(server):
    v_hello = server.node.words[0]

    async def fail_first(prompt_ids, options):
        raise GenerationError("node b: out of memory")
        yield  # pragma: no cover

    server.node.script = fail_first
    status, r = await post(server, "/v1/chat/completions", dict(CHAT, stream=True))
    assert status == 500 and "out of memory" in r["error"]["message"]

    async def fail_later(prompt_ids, options):
        yield TokenResult("r", [v_hello])
        raise GenerationError("node b: lost")

    async def error_result(prompt_ids, options):
        yield TokenResult("r", [], finish_reason="error", error="node c: crashed")

    server.node.script = error_result
    status, r = await post(server, "/v1/chat/completions", dict(CHAT, stream=True))
    assert status == 500 and "crashed" in r["error"]["message"]

    server.node.script = fail_later
    events = await sse_events(server, "/v1/chat/completions", dict(CHAT, stream=True))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "generation_error" and "lost" in events[-2]["error"]["message"]
    assert events[1]["choices"][0]["delta"]["content"] == "Hello"


@pytest.mark.asyncio
async def test_504_when_the_node_is_silent(server):
    server.api.app[STATE_KEY].response_timeout = 0.2

    async def silent(prompt_ids, options):
        await asyncio.Event().wait()
        yield  # pragma: no cover

    server.node.script = silent
    status, r = await post(server, "/v1/chat/completions", CHAT)
    assert status == 504 and r["error"]["code"] == "timeout" and "0.2 s" in r["error"]["message"]
    await wait_for(lambda: len(server.node.closed) == 1, 5.0)


@pytest.mark.asyncio
async def test_client_disconnect_closes_the_generation(server):
    server.api.app[STATE_KEY].response_timeout = 60.0  # only the disconnect may end it
    first_sent = asyncio.Event()

    async def endless(prompt_ids, options):
        while True:
            yield TokenResult("r", [server.node.words[0]])
            first_sent.set()
            await asyncio.sleep(0.01)

    server.node.script = endless
    async with aiohttp.ClientSession() as s:
        async with s.post(server.base_url + "/chat/completions", json=dict(CHAT, stream=True)) as r:
            assert r.status == 200
            await r.content.readline()
            await asyncio.wait_for(first_sent.wait(), 5.0)
            r.close()  # drop the connection mid-stream
    await wait_for(lambda: len(server.node.closed) == 1, 5.0)
    await wait_for(lambda: not server.api.app[STATE_KEY].active_requests, 5.0)


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_before_the_first_token_closes_the_generation(server, stream):
    server.api.app[STATE_KEY].response_timeout = 60.0  # only the disconnect may end it
    started = asyncio.Event()

    async def slow_prefill(prompt_ids, options):
        started.set()
        await asyncio.Event().wait()
        yield  # pragma: no cover

    server.node.script = slow_prefill
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(s.post(server.base_url + "/chat/completions", json=dict(CHAT, stream=stream)))
        await asyncio.wait_for(started.wait(), 5.0)
        task.cancel()  # the client gives up while the node is still on the prompt
        await asyncio.gather(task, return_exceptions=True)
    await wait_for(lambda: len(server.node.closed) == 1, 5.0)
    await wait_for(lambda: not server.api.app[STATE_KEY].active_requests, 5.0)


@pytest.mark.asyncio
async def test_images_are_unsupported(server):
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.images.generate(prompt="a cat")
    assert e.value.body["code"] == "unsupported"
    with pytest.raises(openai.NotFoundError) as e:
        await client.images.generate(prompt="a cat", model="dall-e-3")
    assert e.value.body["code"] == "model_not_found"


# ---------------------------------------------------------------------------- CORS and web UI


@pytest.mark.asyncio
async def test_cors(server):
    async with aiohttp.ClientSession() as s:
        headers = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "content-type,authorization"}
        async with s.options(server.base_url + "/chat/completions", headers=headers) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert r.headers["Access-Control-Allow-Headers"] == "content-type,authorization"
        async with s.post(server.base_url + "/chat/completions", json=dict(CHAT, stream=True)) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            await r.read()
        async with s.get(server.base_url + "/models/nope") as r:
            assert r.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.asyncio
async def test_tinychat_static_files(server):
    async with aiohttp.ClientSession() as s:
        async with s.get(server.root + "/") as r:
            assert r.status == 200 and "tinychat" in await r.text()
        async with s.get(server.root + "/app.js") as r:
            assert r.status == 200 and await r.text() == "console.log(1)"
        async with s.get(server.root + "/../secret.txt") as r:
            assert r.status == 404
        async with s.get(server.root + "/%2e%2e/secret.txt") as r:
            assert r.status == 404
        async with s.get(server.root + "/missing.css") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
