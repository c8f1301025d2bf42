"""The Ollama API with the official ``ollama`` client, unchanged, pointed at 127.0.0.1.

The "Paris" checks run on the real node (torch engine, SmolLM2-135M, ``single_node_api``);
framing, options, model listing and errors (Ollama's ``{"error": ...}`` format) run on the
dummy-engine node (``dummy_api``: real Node, gRPC and API, no weights to run, so fast).
"""

from __future__ import annotations

import json

import aiohttp
import ollama
import pytest

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
GREEDY = {"temperature": 0, "num_predict": 10}


@pytest.fixture
def client(single_node_api) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=single_node_api.api_url)


@pytest.fixture
def dclient(dummy_api) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=dummy_api.api_url)


async def test_chat_non_streaming_says_paris(client):
    r = await client.chat(model=MODEL, messages=PARIS, options=GREEDY)
    assert "Paris" in r.message.content
    assert r.message.role == "assistant"
    assert r.done is True and r.done_reason in ("stop", "length")
    assert r.prompt_eval_count > 0 and 1 <= r.eval_count <= 10
    assert r.total_duration >= r.eval_duration >= 0
    assert "<|im_end|>" not in r.message.content


async def test_chat_streaming_says_paris(client):
    parts = [p async for p in await client.chat(model=f"{MODEL}:latest", messages=PARIS, options=GREEDY, stream=True)]
    assert len(parts) >= 2
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert parts[-1].done_reason in ("stop", "length") and parts[-1].message.content == ""
    text = "".join(p.message.content for p in parts)
    assert "Paris" in text
    assert 1 <= parts[-1].eval_count <= 10


async def test_streaming_matches_non_streaming(dclient):
    full = await dclient.chat(model=MODEL, messages=PARIS, options=GREEDY)
    parts = [p async for p in await dclient.chat(model=MODEL, messages=PARIS, options=GREEDY, stream=True)]
    assert "".join(p.message.content for p in parts) == full.message.content
    assert parts[-1].done_reason == full.done_reason and parts[-1].eval_count == full.eval_count


async def test_generate_streaming_and_not(dclient):
    r = await dclient.generate(model=MODEL, prompt=PARIS[0]["content"], options=GREEDY)
    assert r.response and r.eval_count == 10
    assert r.done and r.context and len(r.context) == r.prompt_eval_count + r.eval_count
    parts = [p async for p in await dclient.generate(model=MODEL, prompt=PARIS[0]["content"], options=GREEDY, stream=True)]
    assert "".join(p.response for p in parts) == r.response
    assert parts[-1].done and parts[-1].context == r.context


async def test_options_num_predict_stop_seed(dclient):
    r = await dclient.generate(model=MODEL, prompt="Count from one to twenty.", options={"temperature": 0, "num_predict": 3})
    assert r.done_reason == "length" and r.eval_count == 3
    full = await dclient.generate(model=MODEL, prompt="Count from one to twenty.", options={"temperature": 0, "num_predict": 12})
    stop = next(w for w in full.response.split()[1:] if w.isascii() and w.isalpha())
    cut = await dclient.generate(model=MODEL, prompt="Count from one to twenty.",
                                options={"temperature": 0, "num_predict": 12, "stop": [stop]})
    assert stop not in cut.response and full.response.startswith(cut.response)
    assert cut.done_reason == "stop"
    sampled = {"temperature": 1.0, "top_p": 0.9, "top_k": 40, "seed": 7, "num_predict": 6}
    a = await dclient.generate(model=MODEL, prompt="Tell me a story.", options=sampled)
    b = await dclient.generate(model=MODEL, prompt="Tell me a story.", options=sampled)
    assert a.response == b.response  # the same seed gives the same sample


async def test_system_and_raw_generate(dclient):
    r = await dclient.generate(model=MODEL, system="You only answer with the word banana.", prompt="Hi",
                              options={"temperature": 0, "num_predict": 5})
    assert r.done
    raw = await dclient.generate(model=MODEL, prompt="Hi", raw=True, options={"temperature": 0, "num_predict": 3})
    assert raw.prompt_eval_count == 1  # no chat template around a raw prompt
    assert raw.eval_count == 3


async def test_tags_show_ps_version(dclient, dummy_api):
    tags = await dclient.list()
    by_name = {m.model: m for m in tags.models}  # the models whose weights are on this node
    # the two packages' models (and any local path another module named to this process's store),
    # never a catalogue model whose weights are not here
    assert {f"{MODEL}:latest", "gemma3-270m:latest"} <= set(by_name)
    assert "qwen2.5-0.5b:latest" not in by_name and "llama-3.2-1b:latest" not in by_name
    assert by_name[f"{MODEL}:latest"].details.family == "llama" and by_name[f"{MODEL}:latest"].size > 0
    assert by_name["gemma3-270m:latest"].details.family == "gemma3"
    show = await dclient.show(f"{MODEL}:latest")
    assert show.modelinfo["llama.block_count"] == 30
    assert "im_start" in show.template
    loaded = {m.model: m for m in (await dclient.ps()).models}  # loaded by the requests above (and others')
    assert loaded[f"{MODEL}:latest"].context_length == 8192
    async with aiohttp.ClientSession() as s, s.get(f"{dummy_api.api_url}/api/version") as resp:
        import exo
        assert resp.status == 200 and (await resp.json()) == {"version": exo.__version__}


async def test_errors_in_ollama_format(dclient, dummy_api):
    with pytest.raises(ollama.ResponseError) as e:
        await dclient.chat(model="no-such-model", messages=PARIS)
    assert e.value.status_code == 404 and "no-such-model" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        await dclient.chat(model=MODEL, messages=PARIS, options={"temperature": "hot"})
    assert e.value.status_code == 400 and "options.temperature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        await dclient.chat(model=MODEL, messages=PARIS, options={"top_p": 0})
    assert e.value.status_code == 400 and "options.top_p" in e.value.error
    url = dummy_api.api_url
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/api/chat", json={"model": MODEL, "messages": PARIS, "format": "yaml"}) as resp:
            assert resp.status == 400 and "format" in (await resp.json())["error"]
        for path, body in (("/api/chat", b"{not json"), ("/api/chat", b'{"messages": []}'),
                           ("/api/generate", b'{"model": "smollm2-135m", "prompt": 5}'), ("/api/nothing-here", b"{}")):
            async with s.post(url + path, data=body) as resp:
                err = await resp.json()
                assert resp.status in (400, 404, 405), (path, resp.status)
                assert set(err) == {"error"} and isinstance(err["error"], str), err


async def test_empty_messages_answer_load(dclient):
    r = await dclient.chat(model=MODEL, messages=[])
    assert r.done and r.done_reason == "load"


async def test_ndjson_framing(dummy_api):
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{dummy_api.api_url}/api/chat",
                          json={"model": MODEL, "messages": PARIS, "options": {"temperature": 0, "num_predict": 4}}) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in (await resp.text()).splitlines() if line]
    assert lines[-1]["done"] is True and lines[-1]["message"]["content"] == ""
    assert all(line["done"] is False for line in lines[:-1])


async def _no_request_left(nut) -> None:
    from helpers import wait_for

    from exo.api.chat_api.state import STATE_KEY

    state = nut.running.api.app[STATE_KEY]
    await wait_for(lambda: not state.active_requests and not nut.node.engine.cached_request_ids()
                   and not nut.node.active_request_ids, 15)


async def test_failures_before_and_during_the_stream(dclient, dummy_api):
    engine = dummy_api.node.engine
    engine.fail_layer = 0  # the prefill fails: a plain HTTP error (the fixture resets the knobs)
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as e:
            r = await dclient.chat(model=MODEL, messages=PARIS, stream=stream)
            if stream:
                [p async for p in r]
        assert e.value.status_code == 500 and "DummyEngineError" in e.value.error
    tok = await dummy_api.node.get_tokenizer(MODEL)
    prompt_len = len(tok.encode(tok.apply_chat_template(PARIS)))
    engine.fail_layer, engine.fail_at_position = 29, prompt_len + 2  # the 3rd decode step fails
    parts = []
    with pytest.raises(ollama.ResponseError) as e:
        async for p in await dclient.chat(model=MODEL, messages=PARIS, stream=True, options={"num_predict": 100}):
            parts.append(p)
    assert parts and not parts[-1].done and "DummyEngineError" in e.value.error
    await _no_request_left(dummy_api)


async def test_client_disconnect_ends_the_request(dummy_api):
    dummy_api.node.engine.token_delay = 0.05
    async with aiohttp.ClientSession() as s:
        resp = await s.post(f"{dummy_api.api_url}/api/generate",
                            json={"model": MODEL, "prompt": "go on", "options": {"num_predict": 1000}})
        assert json.loads(await resp.content.readline())["done"] is False
        resp.close()  # the client goes away mid-stream
    await _no_request_left(dummy_api)
