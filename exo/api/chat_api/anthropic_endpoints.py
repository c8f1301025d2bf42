"""The Anthropic Messages API (https://docs.anthropic.com/en/api/messages), so code written
for the Anthropic SDK works against an exo node by changing only its base URL.

Routes: ``POST /v1/messages`` (one ``message`` object, or with ``"stream": true`` server-sent
events ``message_start``, ``content_block_start``, ``ping``, ``content_block_delta``...,
``content_block_stop``, ``message_delta``, ``message_stop``) and
``POST /v1/messages/count_tokens``. Errors use Anthropic's format
``{"type": "error", "error": {"type", "message"}}`` (``dialects``), also mid-stream as an
``error`` event.

Supported: ``model``, ``max_tokens`` (required), ``messages`` (text, ``tool_use``,
``tool_result`` and ``thinking`` blocks; a last assistant message is a prefill that the answer
continues), ``system`` (string or text blocks), ``stop_sequences``, ``temperature`` [0, 1],
``top_p``, ``top_k``, ``seed`` (exo's extension, as in the OpenAI dialect), ``stream``, ``tools`` and ``tool_choice`` (``tool_use`` blocks, streamed
with ``input_json_delta``, ``stop_reason: "tool_use"``), ``thinking`` (``thinking`` blocks) and
``output_config.format`` (a JSON Schema the answer follows). Requests run through the serving
layer (``exo.api.serving``) as every dialect's do. Fields that cannot change a local cluster's
answer (``metadata``, ``service_tier``, ``cache_control``, ``output_config.effort``, ``speed``
...) are accepted and ignored. Server tools, containers, images and documents are rejected
with a 400 naming the parameter; unknown fields too, as Anthropic does. (Recent SDK versions
have no ``temperature`` argument: send it with ``extra_body={"temperature": 0}``.)
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, AsyncIterator

from aiohttp import web

from exo.api.chat_api.anthropic_protocol import CountTokensRequest, MessagesRequest
from exo.api.chat_api.chunks import SSE_HEADERS
from exo.api.chat_api.dialects import anthropic_error_type
from exo.api.chat_api.fallback import served_model
from exo.api.chat_api.json_body import read_json
from exo.api.chat_api.parsing import parse_request
from exo.api.chat_api.state import STATE_KEY
from exo.api.serving.pipeline import Choice, Job, Update, collect, generate, prepare
from exo.api.serving.resolve import api_error_from

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- responses


def new_message_id() -> str:
    """A fresh id in Anthropic's style, ``msg_`` and 24 hex digits."""
    return f"msg_{uuid.uuid4().hex[:24]}"


def stop_reason(c: Choice) -> str:
    """Anthropic's ``stop_reason`` of a finished choice: end_turn, max_tokens, stop_sequence or tool_use."""
    if c.finish_reason == "length":
        return "max_tokens"
    if c.finish_reason == "tool_calls":
        return "tool_use"
    if c.stop_string is not None:
        return "stop_sequence"
    return "end_turn"


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:  # cut short by the token budget
        return {}
    return value if isinstance(value, dict) else {}


def content_blocks(c: Choice) -> list[dict[str, Any]]:
    """A finished choice's content: its thinking, its text, its ``tool_use`` blocks."""
    blocks: list[dict[str, Any]] = []
    if c.reasoning:
        blocks.append({"type": "thinking", "thinking": c.reasoning, "signature": ""})
    if c.content or not c.tool_calls:
        blocks.append({"type": "text", "text": c.content})
    blocks.extend({"type": "tool_use", "id": _tool_use_id(t.id), "name": t.name, "input": _input(t.arguments)}
                  for t in c.tool_calls)
    return blocks


def message_object(job: Job, model: str, finished: bool) -> dict[str, Any]:
    """The ``message`` object: the whole answer, or (not ``finished``) the empty message of
    ``message_start``."""
    c = job.choices[0]
    return {
        "id": job.id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content_blocks(c) if finished else [],
        "stop_reason": stop_reason(c) if finished else None,
        "stop_sequence": c.stop_string if finished else None,
        # input_tokens are those prefilled; the prompt cache's are counted apart, as Anthropic does
        "usage": {"input_tokens": job.prompt_tokens - job.cached_tokens, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": job.cached_tokens, "output_tokens": job.completion_tokens},
    }


def encode_event(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event with its name: ``event: NAME\ndata: JSON\n\n``."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode("utf-8")


class _BlockStream:
    """The content blocks of a streamed answer, opened as their first piece arrives."""

    def __init__(self, resp: web.StreamResponse):
        self.resp = resp
        self.index = -1
        self.kind: str | None = None

    async def _event(self, name: str, data: dict[str, Any]) -> None:
        await self.resp.write(encode_event(name, {"type": name, **data}))

    async def open(self, kind: str, block: dict[str, Any]) -> None:
        await self.close()
        self.index += 1
        self.kind = kind
        await self._event("content_block_start", {"index": self.index, "content_block": block})
        if self.index == 0:
            await self._event("ping", {})

    async def delta(self, delta: dict[str, Any]) -> None:
        await self._event("content_block_delta", {"index": self.index, "delta": delta})

    async def close(self) -> None:
        if self.kind is None:
            return
        if self.kind == "thinking":
            await self.delta({"type": "signature_delta", "signature": ""})
        await self._event("content_block_stop", {"index": self.index})
        self.kind = None

    async def add(self, u: Update) -> None:
        if u.reasoning:
            if self.kind != "thinking":
                await self.open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            await self.delta({"type": "thinking_delta", "thinking": u.reasoning})
        if u.content:
            if self.kind != "text":
                await self.open("text", {"type": "text", "text": ""})
            await self.delta({"type": "text_delta", "text": u.content})
        for piece in u.tool_calls:
            if piece.id is not None:
                await self.open("tool_use", {"type": "tool_use", "id": _tool_use_id(piece.id), "name": piece.name,
                                             "input": {}})
            if piece.arguments:
                await self.delta({"type": "input_json_delta", "partial_json": piece.arguments})


# ---------------------------------------------------------------------------- handlers


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: one assistant turn, as a ``message`` object or streamed events.

    Errors (Anthropic format): 400 invalid_request_error (bad or unsupported parameter, named),
    404 not_found_error (unknown model), 413 request_too_large (prompt longer than the
    context), 503 overloaded_error (no node can serve the model), 504 timeout_error.
    """
    state = request.app[STATE_KEY]
    req = parse_request(MessagesRequest, await read_json(request))
    job = await prepare(state, req.to_generate_request(), "msg")
    job.id = new_message_id()
    model = served_model(request, req.model, job.card)  # the fallback's id when one answers
    updates = generate(state, job)
    try:
        first = await updates.__anext__()  # errors before anything is sent are plain HTTP errors
        if not req.stream:
            await collect(updates)
            return web.json_response(message_object(job, model, finished=True))
        return await _stream(request, job, model, first, updates)
    finally:
        await updates.aclose()


async def _stream(request: web.Request, job: Job, model: str, first: Update,
                  updates: AsyncIterator[Update]) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    blocks = _BlockStream(resp)
    try:
        await resp.write(encode_event("message_start", {
            "type": "message_start", "message": message_object(job, model, finished=False)}))
        try:
            u: Update | None = first
            while u is not None:
                await blocks.add(u)
                u = None if u.finish_reason is not None else await anext(updates, None)
        except Exception as e:
            err = api_error_from(e)
            logger.warning("request %s failed mid-stream: %s", job.id, err.message)
            await resp.write(encode_event("error", {"type": "error", "error": {
                "type": anthropic_error_type(err.status), "message": err.message}}))
            await resp.write_eof()
            return resp
        if blocks.index == -1:  # an empty answer still has its (empty) text block
            await blocks.open("text", {"type": "text", "text": ""})
        await blocks.close()
        c = job.choices[0]
        await resp.write(encode_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": stop_reason(c), "stop_sequence": c.stop_string},
            "usage": {"output_tokens": job.completion_tokens}}))
        await resp.write(encode_event("message_stop", {"type": "message_stop"}))
        await resp.write_eof()
    except ConnectionResetError:
        logger.info("request %s: client disconnected", job.id)
    return resp


async def count_tokens(request: web.Request) -> web.Response:
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}`` of the prompt the request
    would send. Errors as for ``/v1/messages``."""
    state = request.app[STATE_KEY]
    req = parse_request(CountTokensRequest, await read_json(request))
    gen = req.to_generate_request()
    gen.max_tokens = 1
    job = await prepare(state, gen, "msg")
    return web.json_response({"input_tokens": job.prompt_tokens})


def setup_routes(app: web.Application) -> None:
    """Register ``/v1/messages`` and ``/v1/messages/count_tokens`` on ``app``."""
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
