"""The Anthropic Messages API (https://docs.anthropic.com/en/api/messages), so code written
for the Anthropic SDK works against an exo node by changing only its base URL.

Routes: ``POST /v1/messages`` (one ``message`` object, or with ``"stream": true`` server-sent
events ``message_start``, ``content_block_start``, ``ping``, ``content_block_delta``...,
``content_block_stop``, ``message_delta``, ``message_stop``) and
``POST /v1/messages/count_tokens``. Errors use Anthropic's format
``{"type": "error", "error": {"type", "message"}}`` (``dialects``), also mid-stream as an
``error`` event.

Supported: ``model``, ``max_tokens`` (required), ``messages`` (text content; a last assistant
message is a prefill that the answer continues), ``system`` (string or text blocks),
``stop_sequences``, ``temperature`` [0, 1], ``top_p``, ``top_k``, ``stream``. Fields that cannot
change a local cluster's answer (``metadata``, ``service_tier``, ``cache_control``,
``output_config.effort``, ``speed`` ...) are accepted and ignored. Tools, thinking, structured
outputs, containers, images and documents are rejected with a 400 naming the parameter; unknown
fields too, as Anthropic does. (Recent SDK versions have no ``temperature`` argument: send it
with ``extra_body={"temperature": 0}``.)
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from exo.api.chat_api.dialects import anthropic_error_type
from exo.api.chat_api.fallback import served_model
from exo.api.chat_api.models import RequestParamError, parse_request
from exo.api.chat_api.json_body import read_json
from exo.api.chat_api.serving import (
    encode_prompt, get_tokenizer, model_defaults, resolve_max_tokens, resolve_model,
)
from exo.api.chat_api.state import STATE_KEY, APIState
from exo.api.chat_api.text_generation import GenerationStats, TextStep, collect_text, generate_text
from exo.api.chat_api.utils import APIError
from exo.inference.generation import GenerationOptions
from exo.inference.tokenizers import Tokenizer
from exo.models.sources import ModelCard

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


class MessageParam(BaseModel):
    """One turn: ``user`` or ``assistant``, with text content."""

    model_config = _STRICT
    role: Literal["user", "assistant"]
    content: str | list[TextBlockParam]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class _MessagesBase(BaseModel):
    model_config = _STRICT
    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlockParam] | None = None
    tools: list[Any] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_base(self) -> "_MessagesBase":
        if self.tools:
            raise RequestParamError("tools", "tools are not supported by exo", code="unsupported_parameter")
        if self.tool_choice and self.tool_choice.get("type") not in (None, "none", "auto"):
            raise RequestParamError("tool_choice", "tool_choice is not supported by exo", code="unsupported_parameter")
        if self.thinking and self.thinking.get("type") != "disabled":
            raise RequestParamError("thinking", "extended thinking is not supported by exo", code="unsupported_parameter")
        last = self.messages[-1]
        if last.role == "assistant" and last.text() != last.text().rstrip():
            raise RequestParamError("messages", "final assistant content cannot end with trailing whitespace")
        return self

    def system_text(self) -> str | None:
        if self.system is None:
            return None
        return self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)

    def prompt(self, tokenizer: Tokenizer) -> str:
        """The prompt text: the chat template over system + messages; a last assistant message
        is a prefill appended after the generation prompt.

        Raises:
            APIError: 400 when the template rejects the conversation.
        """
        turns = [{"role": m.role, "content": m.text()} for m in self.messages]
        prefill = ""
        if turns[-1]["role"] == "assistant":
            prefill = turns.pop()["content"]
        system = self.system_text()
        if system:
            turns.insert(0, {"role": "system", "content": system})
        try:
            return tokenizer.apply_chat_template(turns, add_generation_prompt=True) + prefill
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None


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
        if self.output_config and self.output_config.get("format"):
            raise RequestParamError("output_config.format", "structured outputs are not supported by exo",
                                    code="unsupported_parameter")
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


def stop_reason(step: TextStep) -> str:
    """Anthropic's ``stop_reason`` of the last step: end_turn, max_tokens or stop_sequence."""
    if step.finish_reason == "length":
        return "max_tokens"
    if step.stop_string is not None:
        return "stop_sequence"
    return "end_turn"


def message_object(msg_id: str, model: str, text: str | None, stats: GenerationStats, step: TextStep | None) -> dict[str, Any]:
    """A ``message`` object: the whole answer, or (``text`` None, ``step`` None) the empty
    message of ``message_start``."""
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [] if text is None else [{"type": "text", "text": text}],
        "stop_reason": stop_reason(step) if step is not None else None,
        "stop_sequence": step.stop_string if step is not None else None,
        "usage": {"input_tokens": stats.prompt_tokens, "output_tokens": stats.completion_tokens},
    }


def encode_event(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event with its name: ``event: NAME\\ndata: JSON\\n\\n``."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode("utf-8")


# ---------------------------------------------------------------------------- handlers


def _options(req: MessagesRequest, state: APIState, card: ModelCard, prompt_tokens: int,
             tokenizer: Tokenizer) -> GenerationOptions:
    d = model_defaults(state, tokenizer)
    max_tokens = resolve_max_tokens(req.max_tokens, None, prompt_tokens, card.context_length, "messages")
    try:
        return GenerationOptions(
            max_tokens=max_tokens,
            temperature=req.temperature if req.temperature is not None else d.temperature,
            top_p=req.top_p if req.top_p is not None else d.top_p,
            top_k=req.top_k if req.top_k is not None else d.top_k,
            stop_token_ids=tuple(tokenizer.eos_token_ids),
        )
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: one assistant turn, as a ``message`` object or streamed events.

    Errors (Anthropic format): 400 invalid_request_error (bad or unsupported parameter, named),
    404 not_found_error (unknown model), 413 request_too_large (prompt longer than the
    context), 503 overloaded_error (no node can serve the model), 504 timeout_error.
    """
    state = request.app[STATE_KEY]
    req = parse_request(MessagesRequest, await read_json(request))
    card = await resolve_model(state, req.model)
    tokenizer = await get_tokenizer(state, card.model_id)
    prompt_ids = await encode_prompt(tokenizer, lambda: req.prompt(tokenizer), card.context_length, "messages")
    options = _options(req, state, card, len(prompt_ids), tokenizer)
    stops = list(req.stop_sequences or [])
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    msg_id = new_message_id()
    steps = generate_text(state, card.model_id, tokenizer, prompt_ids, options, stops, msg_id, stats)
    model = served_model(request, req.model, card)  # the fallback's id when one answers
    try:
        first = await steps.__anext__()  # errors before anything is sent are plain HTTP errors
        if not req.stream:
            text, step = await collect_text(first, steps)
            return web.json_response(message_object(msg_id, model, text, stats, step))
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        try:
            await resp.write(encode_event("message_start", {
                "type": "message_start", "message": message_object(msg_id, model, None, stats, None)}))
            await resp.write(encode_event("content_block_start", {
                "type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}))
            await resp.write(encode_event("ping", {"type": "ping"}))
            step = first
            try:
                while True:
                    if step.text:
                        await resp.write(encode_event("content_block_delta", {
                            "type": "content_block_delta", "index": 0,
                            "delta": {"type": "text_delta", "text": step.text}}))
                    if step.finish_reason is not None:
                        break
                    step = await steps.__anext__()
            except APIError as e:
                logger.warning("request %s failed mid-stream: %s", msg_id, e.message)
                await resp.write(encode_event("error", {"type": "error", "error": {
                    "type": anthropic_error_type(e.status), "message": e.message}}))
                await resp.write_eof()
                return resp
            await resp.write(encode_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
            await resp.write(encode_event("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason(step), "stop_sequence": step.stop_string},
                "usage": {"output_tokens": stats.completion_tokens}}))
            await resp.write(encode_event("message_stop", {"type": "message_stop"}))
            await resp.write_eof()
        except ConnectionResetError:
            logger.info("request %s: client disconnected", msg_id)
        return resp
    finally:
        await steps.aclose()


async def count_tokens(request: web.Request) -> web.Response:
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}`` of the prompt the request
    would send. Errors as for ``/v1/messages``."""
    state = request.app[STATE_KEY]
    req = parse_request(CountTokensRequest, await read_json(request))
    card = await resolve_model(state, req.model)
    tokenizer = await get_tokenizer(state, card.model_id)
    prompt_ids = await encode_prompt(tokenizer, lambda: req.prompt(tokenizer), card.context_length, "messages")
    return web.json_response({"input_tokens": len(prompt_ids)})


def setup_routes(app: web.Application) -> None:
    """Register ``/v1/messages`` and ``/v1/messages/count_tokens`` on ``app``."""
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
