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
``top_p``, ``top_k``, ``stream``, ``tools`` and ``tool_choice`` (``tool_use`` blocks, streamed
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
from typing import Any, AsyncIterator, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from exo.api.chat_api.dialects import anthropic_error_type
from exo.api.chat_api.fallback import served_model
from exo.api.chat_api.json_body import read_json
from exo.api.chat_api.models import RequestParamError, parse_request
from exo.api.chat_api.state import STATE_KEY
from exo.api.serving.pipeline import Choice, Job, Update, collect, generate, prepare
from exo.api.serving.request import GenerateRequest, ResponseFormat, Sampling, ToolCall, ToolChoice, ToolSpec, Turn
from exo.api.serving.resolve import api_error_from

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_STOP_SEQUENCES = 16

_STRICT = ConfigDict(extra="forbid", strict=True)


# ---------------------------------------------------------------------------- requests


class TextBlockParam(BaseModel):
    """``{"type": "text", "text": ...}`` (``cache_control`` and ``citations`` accepted, unused)."""

    model_config = _STRICT
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None
    citations: list[Any] | None = None


class ToolUseBlockParam(BaseModel):
    """An assistant's earlier call: ``{"type": "tool_use", "id", "name", "input"}``."""

    model_config = _STRICT
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlockParam(BaseModel):
    """A user's answer to a call: ``{"type": "tool_result", "tool_use_id", "content"}``."""

    model_config = _STRICT
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlockParam] = ""
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class ThinkingBlockParam(BaseModel):
    """An assistant's earlier reasoning (``signature`` accepted, not checked)."""

    model_config = _STRICT
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


Block = TextBlockParam | ToolUseBlockParam | ToolResultBlockParam | ThinkingBlockParam


class MessageParam(BaseModel):
    """One turn: ``user`` or ``assistant``, with text, tool and thinking blocks."""

    model_config = _STRICT
    role: Literal["user", "assistant"]
    content: str | list[Block]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(b.text for b in self.content if isinstance(b, TextBlockParam))

    def to_turns(self, index: int) -> list[Turn]:
        """The turns of this message: tool results become ``tool`` turns, in order."""
        param = f"messages[{index}]"
        if isinstance(self.content, str):
            return [Turn(self.role, self.content, param=param)]
        if self.role == "assistant":
            calls = [ToolCall(b.id, b.name, json.dumps(b.input, ensure_ascii=False))
                     for b in self.content if isinstance(b, ToolUseBlockParam)]
            reasoning = "".join(b.thinking for b in self.content if isinstance(b, ThinkingBlockParam)) or None
            return [Turn("assistant", self.text(), calls, reasoning=reasoning, param=param)]
        turns = [Turn("tool", b.text(), tool_call_id=b.tool_use_id, param=f"{param}.content[{j}]")
                 for j, b in enumerate(self.content) if isinstance(b, ToolResultBlockParam)]
        text = self.text()
        if text or not turns:
            turns.append(Turn("user", text, param=param))
        return turns


class ToolParam(BaseModel):
    """A client tool: ``name``, ``description``, ``input_schema`` (server tools are refused)."""

    model_config = _STRICT
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoiceParam(BaseModel):
    """``{"type": "auto" | "any" | "tool" | "none", "name", "disable_parallel_tool_use"}``."""

    model_config = _STRICT
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name(self) -> "ToolChoiceParam":
        if self.type == "tool" and not self.name:
            raise RequestParamError("name", "tool_choice of type 'tool' needs the tool's name")
        return self


class ThinkingParam(BaseModel):
    """``{"type": "enabled", "budget_tokens"}`` or ``{"type": "disabled"}``."""

    model_config = _STRICT
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)


class _MessagesBase(BaseModel):
    model_config = _STRICT
    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlockParam] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingParam | None = None

    @model_validator(mode="after")
    def _check_base(self) -> "_MessagesBase":
        last = self.messages[-1]
        if last.role == "assistant" and last.text() != last.text().rstrip():
            raise RequestParamError("messages", "final assistant content cannot end with trailing whitespace")
        return self

    def system_text(self) -> str | None:
        if self.system is None:
            return None
        return self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)

    def to_generate_request(self) -> GenerateRequest:
        """The request for the serving layer: system first, a last assistant message as the
        prefill the answer continues."""
        turns: list[Turn] = [Turn("system", self.system_text() or "", param="system")] if self.system_text() else []
        for i, m in enumerate(self.messages):
            turns.extend(m.to_turns(i))
        prefill = ""
        if turns[-1].role == "assistant" and not turns[-1].tool_calls:
            prefill = turns.pop().content
        choice = self.tool_choice
        mode = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}[choice.type] if choice else "auto"
        thinking = None if self.thinking is None else self.thinking.type != "disabled"
        return GenerateRequest(
            model=self.model, turns=turns, prefill=prefill,
            tools=[ToolSpec(t.name, t.description or "", t.input_schema, f"tools[{i}]") for i, t in enumerate(self.tools or [])],
            tool_choice=ToolChoice(mode, choice.name if choice else None),  # type: ignore[arg-type]
            parallel_tool_calls=not (choice and choice.disable_parallel_tool_use),
            thinking=thinking if thinking is not None else False,
        )


class MessagesRequest(_MessagesBase):
    """``POST /v1/messages`` body."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stream: bool | None = None
    output_config: dict[str, Any] | None = None
    container: Any = None
    # accepted and ignored: they cannot change the answer of a local cluster
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None
    diagnostics: dict[str, Any] | None = None
    inference_geo: str | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None

    @model_validator(mode="after")
    def _check_stops(self) -> "MessagesRequest":
        for s in self.stop_sequences or []:
            if s == "":
                raise RequestParamError("stop_sequences", "stop sequences must not be empty")
        fmt = (self.output_config or {}).get("format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "json_schema"
                                or not isinstance(fmt.get("schema"), dict)):
            raise RequestParamError("output_config.format", 'must be {"type": "json_schema", "schema": {...}}')
        if self.container is not None:
            raise RequestParamError("container", "containers (code execution) are not supported by exo",
                                    code="unsupported_parameter")
        return self


class CountTokensRequest(_MessagesBase):
    """``POST /v1/messages/count_tokens`` body."""


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
        "usage": {"input_tokens": job.prompt_tokens, "output_tokens": job.completion_tokens},
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


def _generate_request(req: MessagesRequest) -> GenerateRequest:
    gen = req.to_generate_request()
    gen.max_tokens = req.max_tokens
    gen.stop = list(req.stop_sequences or [])
    gen.sampling = Sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
    fmt = (req.output_config or {}).get("format")
    if fmt is not None:
        gen.response_format = ResponseFormat("json_schema", fmt["schema"])
    return gen


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: one assistant turn, as a ``message`` object or streamed events.

    Errors (Anthropic format): 400 invalid_request_error (bad or unsupported parameter, named),
    404 not_found_error (unknown model), 413 request_too_large (prompt longer than the
    context), 503 overloaded_error (no node can serve the model), 504 timeout_error.
    """
    state = request.app[STATE_KEY]
    req = parse_request(MessagesRequest, await read_json(request))
    job = await prepare(state, _generate_request(req), "msg")
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
