"""Tool calls and reasoning in all three dialects, on a real node whose DummyInferenceEngine is
told which tokens to produce (``forced_tokens``): the answer text is known exactly, so the
split into reasoning, content and calls, streamed and not, is checked against it with the real
``openai``, ``anthropic`` and ``ollama`` clients. The calls pass through the request's grammar
too (a forced token the grammar forbade could not be sampled). Real-model checks of the same
features: test_constrained_output_api.py.
"""

from __future__ import annotations

import json

import aiohttp
import anthropic
import ollama
import openai
import pytest

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
THOUGHT = "<think>The user wants Paris.</think>\n\nParis it is."


@pytest.fixture(autouse=True)
def whole_vocabulary(dummy_api):
    """The dummy engine's logits over SmolLM2's whole vocabulary (the forced tokens are any of it)."""
    engine = dummy_api.node.engine
    before, engine.vocab_size = engine.vocab_size, 49152
    yield
    engine.vocab_size = before


def oai(nut) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=nut.base_url, api_key="unused", max_retries=0)


async def force(nut, text: str, prompt_tokens: int) -> int:
    """Make the dummy engine answer ``text`` then EOS after a prompt of ``prompt_tokens``
    tokens; the tokens to ask for."""
    tok = await nut.node.get_tokenizer(MODEL)
    ids = tok.backend.encode(text, add_special_tokens=False).ids + [tok.eos_token_ids[0]]
    nut.node.engine.forced_tokens = {prompt_tokens + i: t for i, t in enumerate(ids)}
    return len(ids) + 4


async def openai_prompt_tokens(nut, **kwargs) -> int:
    r = await oai(nut).chat.completions.create(model=MODEL, max_tokens=1, **kwargs)
    return r.usage.prompt_tokens


async def test_openai_reasoning_content_streamed_and_not(dummy_api):
    n = await force(dummy_api, THOUGHT, await openai_prompt_tokens(dummy_api, messages=ASK))
    r = await oai(dummy_api).chat.completions.create(model=MODEL, messages=ASK, max_tokens=n)
    msg = r.choices[0].message
    assert msg.reasoning_content == "The user wants Paris." and msg.content == "Paris it is."
    assert r.choices[0].finish_reason == "stop"
    reasoning = content = ""
    async for chunk in await oai(dummy_api).chat.completions.create(model=MODEL, messages=ASK, max_tokens=n, stream=True):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    assert (reasoning, content) == ("The user wants Paris.", "Paris it is.")


async def test_anthropic_thinking_blocks_streamed_and_not(dummy_api):
    prompt = (await anthropic.AsyncAnthropic(base_url=dummy_api.api_url, api_key="x").messages.count_tokens(
        model=MODEL, messages=ASK)).input_tokens
    n = await force(dummy_api, THOUGHT, prompt)
    client = anthropic.AsyncAnthropic(base_url=dummy_api.api_url, api_key="x", max_retries=0)
    m = await client.messages.create(model=MODEL, max_tokens=n, messages=ASK)
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == "The user wants Paris." and m.content[1].text == "Paris it is."
    async with client.messages.stream(model=MODEL, max_tokens=n, messages=ASK) as stream:
        final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "The user wants Paris." and final.content[1].text == "Paris it is."


async def test_ollama_thinking_streamed_and_not(dummy_api):
    client = ollama.AsyncClient(host=dummy_api.api_url)
    r = await client.chat(model=MODEL, messages=ASK, options={"num_predict": 1})
    n = await force(dummy_api, THOUGHT, r.prompt_eval_count)
    r = await client.chat(model=MODEL, messages=ASK, think=True, options={"num_predict": n})
    assert r.message.thinking == "The user wants Paris." and r.message.content == "Paris it is."
    thinking = content = ""
    async for part in await client.chat(model=MODEL, messages=ASK, think=True, stream=True, options={"num_predict": n}):
        thinking += part.message.thinking or ""
        content += part.message.content or ""
    assert (thinking, content) == ("The user wants Paris.", "Paris it is.")


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}])
async def test_openai_tool_call_streamed_fragments_reassemble(dummy_api, choice):
    kwargs = dict(messages=ASK, tools=[WEATHER], tool_choice=choice)
    n = await force(dummy_api, CALL, await openai_prompt_tokens(dummy_api, **kwargs))
    r = await oai(dummy_api).chat.completions.create(model=MODEL, max_tokens=n, **kwargs)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    [call] = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    pieces: dict[int, dict] = {}
    finish = None
    async for chunk in await oai(dummy_api).chat.completions.create(model=MODEL, max_tokens=n, stream=True, **kwargs):
        ch = chunk.choices[0]
        finish = ch.finish_reason or finish
        for d in ch.delta.tool_calls or []:
            p = pieces.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert p["id"] is None and d.function.name  # id and name come once, first
                p["id"], p["name"] = d.id, d.function.name
            p["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls" and list(pieces) == [0]
    assert pieces[0]["name"] == "get_weather" and json.loads(pieces[0]["arguments"]) == {"city": "Paris"}


async def test_openai_text_then_no_call_with_auto(dummy_api):
    kwargs = dict(messages=ASK, tools=[WEATHER], tool_choice="auto")
    n = await force(dummy_api, "It is sunny.", await openai_prompt_tokens(dummy_api, **kwargs))
    r = await oai(dummy_api).chat.completions.create(model=MODEL, max_tokens=n, **kwargs)
    assert r.choices[0].message.content == "It is sunny." and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"


async def test_anthropic_tool_use_streamed_and_not(dummy_api):
    tools = [{"name": "get_weather", "description": "The weather in a city.",
              "input_schema": WEATHER["function"]["parameters"]}]
    client = anthropic.AsyncAnthropic(base_url=dummy_api.api_url, api_key="x", max_retries=0)
    prompt = (await client.messages.count_tokens(model=MODEL, messages=ASK, tools=tools)).input_tokens
    n = await force(dummy_api, CALL, prompt)
    m = await client.messages.create(model=MODEL, max_tokens=n, messages=ASK, tools=tools,
                                     tool_choice={"type": "any"})
    assert m.stop_reason == "tool_use"
    [use] = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id.startswith("toolu_")
    async with client.messages.stream(model=MODEL, max_tokens=n, messages=ASK, tools=tools,
                                      tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        final = await stream.get_final_message()
    [use] = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and use.input == {"city": "Paris"}
    # the second turn: the result goes back, the model answers
    n = await force(dummy_api, "Sunny.", (await client.messages.count_tokens(model=MODEL, tools=tools, messages=ASK + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]}])).input_tokens)
    m = await client.messages.create(model=MODEL, max_tokens=n, tools=tools, messages=ASK + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]}])
    assert m.stop_reason == "end_turn" and m.content[0].text == "Sunny."


async def test_ollama_tool_calls_streamed_and_not(dummy_api):
    client = ollama.AsyncClient(host=dummy_api.api_url)
    r = await client.chat(model=MODEL, messages=ASK, tools=[WEATHER], options={"num_predict": 1})
    n = await force(dummy_api, CALL, r.prompt_eval_count)
    r = await client.chat(model=MODEL, messages=ASK, tools=[WEATHER], options={"num_predict": n})
    [call] = r.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    calls = []
    async for part in await client.chat(model=MODEL, messages=ASK, tools=[WEATHER], stream=True,
                                        options={"num_predict": n}):
        calls += part.message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
    # the result goes back as a tool message
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                     "arguments": {"city": "Paris"}}}]}, {"role": "tool", "tool_name": "get_weather", "content": "sunny"}]
    r = await client.chat(model=MODEL, messages=history, tools=[WEATHER], options={"num_predict": 2})
    assert r.done


async def test_openai_two_turns_with_a_tool_result(dummy_api):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    n = await force(dummy_api, "It is sunny.", await openai_prompt_tokens(dummy_api, messages=history, tools=[WEATHER]))
    r = await oai(dummy_api).chat.completions.create(model=MODEL, max_tokens=n, messages=history, tools=[WEATHER])
    assert r.choices[0].message.content == "It is sunny."


BAD = [
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}],
          tool_choice="required"), "tools"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}),
     "response_format"),
]


@pytest.mark.parametrize("extra, param", BAD)
async def test_openai_bad_tools_and_schemas_are_400s_naming_the_parameter(dummy_api, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        await oai(dummy_api).chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, **extra)
    assert e.value.body["param"] == param and param in e.value.body["message"]


async def test_openai_tool_message_without_its_call_is_a_400(dummy_api):
    with pytest.raises(openai.BadRequestError) as e:
        await oai(dummy_api).chat.completions.create(model=MODEL, max_tokens=2, messages=ASK + [
            {"role": "tool", "tool_call_id": "call_404", "content": "x"}])
    assert e.value.body["param"] == "messages[1]"


async def test_anthropic_and_ollama_bad_tools_are_400s_in_their_format(dummy_api):
    client = anthropic.AsyncAnthropic(base_url=dummy_api.api_url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(model=MODEL, max_tokens=2, messages=ASK, tool_choice={"type": "tool", "name": "x"},
                                     tools=[{"name": "f", "input_schema": {"type": "object"}}])
    assert e.value.body["error"]["type"] == "invalid_request_error" and "tool_choice" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(model=MODEL, max_tokens=2, messages=ASK + [
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_404", "content": "x"}]}])
    assert "messages[2].content[0]" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(model=MODEL, max_tokens=2, messages=ASK, tools=[{"input_schema": {"type": "object"}}])
    assert "tools[0].name" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(model=MODEL, max_tokens=2, messages=ASK, tool_choice={"type": "any"},
                                     tools=[{"name": "f", "input_schema": {"type": "objectx"}}])
    assert "tools" in e.value.body["error"]["message"] and "objectx" in e.value.body["error"]["message"]
    oclient = ollama.AsyncClient(host=dummy_api.api_url)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{dummy_api.api_url}/api/chat", json={"model": MODEL, "messages": ASK, "tools": [
                {"type": "function", "function": {"description": "no name"}}]}) as resp:
            assert resp.status == 400 and "tools[0].function.name" in (await resp.json())["error"]
    with pytest.raises(ollama.ResponseError) as e:
        await oclient.chat(model=MODEL, messages=ASK + [{"role": "tool", "tool_name": "get_weather", "content": "x"}])
    assert e.value.status_code == 400 and "messages[1]" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        await oclient.chat(model=MODEL, messages=ASK, format={"type": "objectx"})
    assert e.value.status_code == 400 and "format" in e.value.error


async def test_openai_logit_bias_moves_the_choice(dummy_api):
    tok = await dummy_api.node.get_tokenizer(MODEL)
    paris = tok.backend.encode(" Paris", add_special_tokens=False).ids[0]
    r = await oai(dummy_api).chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, logit_bias={str(paris): 100})
    assert r.choices[0].message.content == " Paris" * 3  # +100 beats the dummy model's peak of 40
    with pytest.raises(openai.BadRequestError) as e:
        await oai(dummy_api).chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, logit_bias={"99999999": 1})
    assert e.value.body["param"] == "logit_bias"


async def test_ollama_logprobs_streamed_and_not(dummy_api):
    from exo.inference.dummy import PEAK

    client = ollama.AsyncClient(host=dummy_api.api_url)
    r = await client.chat(model=MODEL, messages=ASK, logprobs=True, top_logprobs=2, options={"num_predict": 4})
    assert len(r.logprobs) == 4 and "".join(lp.token for lp in r.logprobs) == r.message.content
    for lp in r.logprobs:
        assert lp.logprob == pytest.approx(0.0, abs=1e-6) and len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0].token == lp.token and lp.top_logprobs[1].logprob == pytest.approx(-PEAK, abs=1e-3)
    streamed = []
    async for part in await client.generate(model=MODEL, prompt="hi", logprobs=True, stream=True,
                                            options={"num_predict": 4}):
        streamed += part.logprobs or []
    assert len(streamed) == 4 and all(not lp.top_logprobs for lp in streamed)
