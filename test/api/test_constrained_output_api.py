"""Constrained output on the real model (SmolLM2-135M-Instruct, torch engine) through the real
``openai``, ``anthropic`` and ``ollama`` clients: forced tool calls and JSON-schema answers are
valid in every one of 50 seeded samples at temperature 1, streamed calls reassemble to the
non-streamed ones, a conversation continues after a tool result, and a ring of two nodes keeps
the constraint. The answers' text is the model's; only their validity is asserted.

The grammar, the parser and the pipeline are one for all dialects (a dialect only frames the
answer), so the 50-sample checks are spread over the dialects to keep the suite's time: calls
forced with ``required`` through OpenAI and with a named tool through Anthropic, a JSON Schema
answer through Ollama's ``format``, 50 samples each; the other checks (a named function through
OpenAI, ``any`` through Anthropic, OpenAI's ``json_schema``) get 5 (``EXO_CONSTRAINED_SAMPLES=50``
runs 50 everywhere).
"""

from __future__ import annotations

import asyncio
import json
import os

import anthropic
import jsonschema
import ollama
import openai
import pytest

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
SAMPLES = 50
FEW = int(os.environ.get("EXO_CONSTRAINED_SAMPLES", "5"))  # the other forcing of a dialect
N = 10  # choices per OpenAI request: requests of 10 seeded choices
ASK = [{"role": "user", "content": "Weather in Paris for three days?"}]
FORECAST = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 14}},
            "required": ["city", "days"], "additionalProperties": False}
# closed schemas (as OpenAI's strict mode wants them): an open one lets a model add properties
# until its token budget runs out, and a cut call is not valid
TOOLS = [{"type": "function", "function": {"name": "get_forecast", "parameters": FORECAST}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}}, "required": ["zone"],
             "additionalProperties": False}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MAX_TOKENS = 64


def oai(nut) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=nut.base_url, api_key="x", max_retries=0, timeout=300)


def valid_call(name: str, arguments: str | dict) -> None:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, SCHEMAS[name])


@pytest.mark.parametrize("choice, samples", [("required", SAMPLES),
                                             ({"type": "function", "function": {"name": "get_forecast"}}, FEW)])
async def test_openai_forced_tool_calls_are_valid_in_50_samples(single_node_api, choice, samples):
    client = oai(single_node_api)

    async def batch(start: int):  # choice i has seed start + i
        return await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                    n=min(N, samples - start), temperature=1, seed=start,
                                                    max_tokens=MAX_TOKENS, parallel_tool_calls=False)

    responses = [await batch(start) for start in range(0, samples, N)]
    choices = [c for r in responses for c in r.choices]
    assert len(choices) == samples
    for c in choices:
        assert c.finish_reason == "tool_calls", c
        [call] = c.message.tool_calls
        if isinstance(choice, dict):
            assert call.function.name == "get_forecast"
        valid_call(call.function.name, call.function.arguments)


async def test_openai_json_schema_answers_are_valid(single_node_api):
    client = oai(single_node_api)
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST, "strict": True}}

    async def batch(start: int):  # choice i has seed start + i
        return await client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, n=min(N, 7 + FEW - start),
                                                    temperature=1, seed=start, max_tokens=MAX_TOKENS)

    responses = [await batch(start) for start in range(7, 7 + FEW, N)]
    for c in [c for r in responses for c in r.choices]:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), FORECAST)


async def test_openai_streamed_call_reassembles_to_the_non_streamed_one(single_node_api):
    client = oai(single_node_api)
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1, max_tokens=MAX_TOKENS)
    for seed in (1,):
        whole = (await client.chat.completions.create(seed=seed, **kwargs)).choices[0].message.tool_calls
        pieces: dict[int, dict] = {}
        async for chunk in await client.chat.completions.create(seed=seed, stream=True, **kwargs):
            for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                p = pieces.setdefault(d.index, {"name": None, "arguments": ""})
                p["name"] = d.function.name or p["name"]
                p["arguments"] += d.function.arguments or ""
        assert [(p["name"], p["arguments"]) for p in pieces.values()] == \
            [(c.function.name, c.function.arguments) for c in whole]


async def test_openai_conversation_continues_after_a_tool_result(single_node_api):
    client = oai(single_node_api)
    first = await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                 temperature=0, max_tokens=MAX_TOKENS, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C, all three days."}]
    second = await client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0,
                                                  max_tokens=24)
    c = second.choices[0]
    assert c.finish_reason in ("stop", "length", "tool_calls")
    assert c.message.content or c.message.tool_calls


@pytest.mark.parametrize("choice, samples", [({"type": "tool", "name": "get_forecast"}, SAMPLES), ({"type": "any"}, FEW)])
async def test_anthropic_forced_tool_use_is_valid_in_50_samples(single_node_api, choice, samples):
    client = anthropic.AsyncAnthropic(base_url=single_node_api.api_url, api_key="x", max_retries=0, timeout=300)
    # the named tool alone (its description is the prompt's longest part, prefilled per sample);
    # "any" chooses between both
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]}
             for t in TOOLS if choice["type"] == "any" or t["function"]["name"] == choice["name"]]
    sem = asyncio.Semaphore(N)

    async def one(seed: int):
        async with sem:
            return await client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=ASK, tools=tools,
                                                tool_choice={**choice, "disable_parallel_tool_use": True},
                                                extra_body={"temperature": 1, "seed": seed})

    for m in await asyncio.gather(*(one(s) for s in range(samples))):
        assert m.stop_reason == "tool_use", m
        [use] = [b for b in m.content if b.type == "tool_use"]
        valid_call(use.name, use.input)


async def test_ollama_format_schema_is_valid_in_50_samples(single_node_api):
    client = ollama.AsyncClient(host=single_node_api.api_url, timeout=300)
    sem = asyncio.Semaphore(N)

    async def one(seed: int):
        async with sem:
            return await client.chat(model=MODEL, messages=ASK, format=FORECAST,
                                     options={"temperature": 1, "seed": seed, "num_predict": MAX_TOKENS})

    for r in await asyncio.gather(*(one(s) for s in range(SAMPLES))):
        assert r.done_reason == "stop", r
        jsonschema.validate(json.loads(r.message.content), FORECAST)


async def test_json_schema_across_a_ring_of_two(two_node_cluster):
    client = oai(two_node_cluster[0])
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST}}
    r = await client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, n=4, temperature=1,
                                             seed=5, max_tokens=MAX_TOKENS)
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), FORECAST)
