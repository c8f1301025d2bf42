"""The Anthropic Messages API with the official ``anthropic`` client, unchanged, pointed at
127.0.0.1.

The "Paris" checks run on the real node (torch engine, SmolLM2-135M, ``single_node_api``);
the event sequence, parameters and errors (Anthropic's ``{"type": "error", ...}`` format) run
on the dummy-engine node (``dummy_api``).
"""

from __future__ import annotations

import json

import aiohttp
import anthropic
import pytest

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
GREEDY = {"temperature": 0}  # this SDK version has no temperature argument; the API takes it
EVENT_ORDER = ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop",
               "message_delta", "message_stop"]


def _client(base_url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base_url, api_key="unused", max_retries=0)


@pytest.fixture
def client(single_node_api) -> anthropic.AsyncAnthropic:
    return _client(single_node_api.api_url)


@pytest.fixture
def dclient(dummy_api) -> anthropic.AsyncAnthropic:
    return _client(dummy_api.api_url)


async def test_paris_non_streaming(client):
    m = await client.messages.create(model=MODEL, max_tokens=10, messages=PARIS, extra_body=GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.content[0].type == "text" and "Paris" in m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens > 0 and 1 <= m.usage.output_tokens <= 10


async def test_paris_streaming(client):
    async with client.messages.stream(model=MODEL, max_tokens=10, messages=PARIS, extra_body=GREEDY) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert "Paris" in text and final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens")


async def test_event_sequence(dclient):
    stream = await dclient.messages.create(model=MODEL, max_tokens=6, messages=PARIS, stream=True)
    events = [e async for e in stream]  # the SDK drops "ping"
    types = [e.type for e in events]
    assert types[:2] == ["message_start", "content_block_start"]
    assert set(types[2:-3]) == {"content_block_delta"} and len(types[2:-3]) >= 1
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[0].message.usage.input_tokens > 0
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 6


async def test_raw_sse_includes_ping_and_event_names(dummy_api):
    body = {"model": MODEL, "max_tokens": 3, "messages": PARIS, "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{dummy_api.api_url}/v1/messages", json=body) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            raw = await resp.text()
    events = [block.split("\n") for block in raw.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    datas = [json.loads(lines[1].removeprefix("data: ")) for lines in events]
    assert [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]] == EVENT_ORDER
    assert all(d["type"] == n for n, d in zip(names, datas))


async def test_system_stop_sequences_and_max_tokens(dclient):
    full = await dclient.messages.create(model=MODEL, max_tokens=12, messages=PARIS, system="Be brief.")
    text = full.content[0].text
    assert full.stop_reason == "max_tokens" and full.usage.output_tokens == 12
    no_system = await dclient.messages.create(model=MODEL, max_tokens=1, messages=PARIS)
    assert full.usage.input_tokens != no_system.usage.input_tokens  # our system prompt replaced the template's
    stop = next(w for w in text.split()[1:] if w.isascii() and w.isalpha())
    cut = await dclient.messages.create(model=MODEL, max_tokens=12, messages=PARIS, system="Be brief.",
                                        stop_sequences=["zzz-never", stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert stop not in cut.content[0].text and text.startswith(cut.content[0].text)
    async with dclient.messages.stream(model=MODEL, max_tokens=12, messages=PARIS, system="Be brief.",
                                       stop_sequences=[stop]) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.content[0].text == cut.content[0].text


async def test_assistant_prefill_and_count_tokens(dclient, dummy_api):
    m = await dclient.messages.create(model=MODEL, max_tokens=2, messages=PARIS + [{"role": "assistant", "content": "The"}])
    assert m.usage.output_tokens == 2
    counted = await dclient.messages.count_tokens(model=MODEL, messages=PARIS)
    plain = await dclient.messages.create(model=MODEL, max_tokens=1, messages=PARIS)
    assert counted.input_tokens == plain.usage.input_tokens


async def test_errors_in_anthropic_format(dclient, dummy_api):
    with pytest.raises(anthropic.NotFoundError) as e:
        await dclient.messages.create(model="claude-no-such-model", max_tokens=5, messages=PARIS)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        await dclient.messages.create(model=MODEL, max_tokens=5, messages=PARIS, extra_body={"temperature": 1.5})
    assert e.value.body["error"]["type"] == "invalid_request_error" and "temperature" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        await dclient.messages.create(model=MODEL, max_tokens=5, messages=PARIS,
                                      tools=[{"name": "f", "description": "no input_schema"}])
    assert "tools[0].input_schema" in e.value.body["error"]["message"]
    async with aiohttp.ClientSession() as s:
        for body in (b"{oops", b'{"model": "smollm2-135m", "messages": []}', b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}]}'):
            async with s.post(f"{dummy_api.api_url}/v1/messages", data=body) as resp:
                err = await resp.json()
                assert resp.status == 400
                assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error", err
        async with s.post(f"{dummy_api.api_url}/v1/messages", json={"model": MODEL, "max_tokens": 3, "messages": PARIS,
                                                                     "surprise": 1}) as resp:
            assert resp.status == 400 and "surprise" in (await resp.json())["error"]["message"]


async def test_failures_before_and_during_the_stream(dclient, dummy_api):
    from helpers import wait_for

    engine = dummy_api.node.engine
    engine.fail_layer = 0  # the prefill fails (the fixture resets the knobs)
    with pytest.raises(anthropic.InternalServerError) as e:
        await dclient.messages.create(model=MODEL, max_tokens=5, messages=PARIS)
    assert e.value.body["error"]["type"] == "api_error" and "DummyEngineError" in e.value.body["error"]["message"]
    tok = await dummy_api.node.get_tokenizer(MODEL)
    prompt_len = len(tok.encode(tok.apply_chat_template(PARIS)))
    engine.fail_layer, engine.fail_at_position = 29, prompt_len + 2  # the 3rd decode step fails
    types = []
    with pytest.raises(anthropic.APIStatusError) as e:
        async for ev in await dclient.messages.create(model=MODEL, max_tokens=100, messages=PARIS, stream=True):
            types.append(ev.type)
    assert types[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert "message_stop" not in types and "DummyEngineError" in str(e.value)
    await wait_for(lambda: not engine.cached_request_ids() and not dummy_api.node.active_request_ids, 15)


async def test_client_disconnect_ends_the_request(dummy_api):
    from helpers import wait_for

    engine = dummy_api.node.engine
    engine.token_delay = 0.05
    async with aiohttp.ClientSession() as s:
        resp = await s.post(f"{dummy_api.api_url}/v1/messages",
                            json={"model": MODEL, "max_tokens": 1000, "messages": PARIS, "stream": True})
        assert (await resp.content.readline()).startswith(b"event: message_start")
        resp.close()
    await wait_for(lambda: not engine.cached_request_ids() and not dummy_api.node.active_request_ids, 15)
