"""``POST /v1/chat/completions`` and ``POST /v1/completions``: the OpenAI dialect.

Each handler translates its request into the serving layer's ``GenerateRequest``
(``models``), runs it through ``exo.api.serving.pipeline`` and frames the updates: server-sent
events of ``chat.completion.chunk`` / ``text_completion`` objects, or one JSON response.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

from aiohttp import web

from exo.api.chat_api.chunks import (
    SSE_HEADERS,
    ChoiceUpdate,
    ChunkKind,
    StreamMeta,
    build_chunk,
    chat_logprobs,
    completion_logprobs,
    encode_sse,
)
from exo.api.chat_api.json_body import read_json
from exo.api.chat_api.models import ChatCompletionRequest, CompletionRequest
from exo.api.chat_api.parsing import parse_request
from exo.api.chat_api.rate_limit import check_generations
from exo.api.chat_api.responses import (
    ChatChoice,
    ChatCompletion,
    ChatResponseMessage,
    Completion,
    CompletionChoice,
    FunctionCall,
    ToolCallObject,
    Usage,
)
from exo.api.chat_api.state import STATE_KEY, APIState
from exo.api.serving.pipeline import Job, Update, collect, generate, prepare
from exo.api.serving.resolve import api_error_from

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- handlers


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: OpenAI chat completions, streamed (SSE) or not, with
    tools, response formats, logprobs and reasoning.

    Errors (OpenAI format): 400 invalid body or parameter, 404 unknown model, 413 prompt longer
    than the model's context, 503 no node can serve the model, 504 no token within the
    response timeout, 500 generation failed.
    """
    state = request.app[STATE_KEY]
    req = parse_request(ChatCompletionRequest, await read_json(request))
    check_generations(request.app, 1, req.num_choices)
    job = await prepare(state, req.to_generate_request(), "chatcmpl")
    return await _answer(request, state, job, "chat", bool(req.stream), req.include_usage, bool(req.logprobs))


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``: OpenAI (legacy) text completions, streamed or not.

    Each prompt gets ``n`` choices, indexed ``prompt_index * n + i``. Errors as for chat.
    """
    state = request.app[STATE_KEY]
    req = parse_request(CompletionRequest, await read_json(request))
    check_generations(request.app, len(req.prompts()), req.num_choices)
    job = await prepare(state, req.to_generate_request(), "cmpl")
    return await _answer(request, state, job, "completion", bool(req.stream), req.include_usage, req.logprobs is not None)


def _usage(job: Job) -> Usage:
    return Usage.of(job.prompt_tokens, job.completion_tokens, job.cached_tokens)


async def _answer(request: web.Request, state: APIState, job: Job, kind: ChunkKind, stream: bool, include_usage: bool,
                  want_logprobs: bool) -> web.StreamResponse:
    updates = generate(state, job)
    try:
        if stream:
            return await _stream(request, job, updates, kind, include_usage, want_logprobs)
        await collect(updates)
        return web.json_response(_body(job, kind, want_logprobs).model_dump(mode="json"))
    finally:
        await updates.aclose()


def _body(job: Job, kind: ChunkKind, want_logprobs: bool) -> ChatCompletion | Completion:
    model = job.card.model_id
    if kind == "chat":
        choices = []
        for c in job.choices:
            calls = [ToolCallObject(id=t.id, function=FunctionCall(name=t.name, arguments=t.arguments)) for t in c.tool_calls]
            message = ChatResponseMessage(content=c.content if c.content or not calls else None, tool_calls=calls or None,
                                          reasoning_content=c.reasoning or None)
            choices.append(ChatChoice(index=c.index, message=message,
                                      logprobs=chat_logprobs(c.logprobs) if want_logprobs else None,
                                      finish_reason=c.finish_reason))  # type: ignore[arg-type]
        return ChatCompletion(id=job.id, created=job.created, model=model, usage=_usage(job), choices=choices)
    return Completion(
        id=job.id, created=job.created, model=model, usage=_usage(job),
        choices=[
            CompletionChoice(index=c.index, text=c.prefix + c.content,
                             logprobs=completion_logprobs(c.logprobs, len(c.prefix)) if want_logprobs else None,
                             finish_reason=c.finish_reason)  # type: ignore[arg-type]
            for c in job.choices
        ],
    )


def _chunk_update(job: Job, u: Update, want_logprobs: bool) -> ChoiceUpdate:
    return ChoiceUpdate(index=u.index, text=u.content or None if u.tool_calls or u.reasoning else u.content,
                        finish_reason=u.finish_reason, logprobs=u.logprobs if want_logprobs and u.logprobs else None,
                        text_offset_base=len(job.choices[u.index].prefix), reasoning=u.reasoning or None,
                        tool_calls=u.tool_calls or None)


async def _stream(request: web.Request, job: Job, updates: AsyncIterator[Update], kind: ChunkKind, include_usage: bool,
                  want_logprobs: bool) -> web.StreamResponse:
    first = await updates.__anext__()  # before answering, so that an early failure is a plain JSON error
    meta = StreamMeta(kind, job.id, job.created, job.card.model_id, include_usage)
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    try:
        try:
            for c in job.choices:  # one chunk per choice, as OpenAI streams them
                if kind == "chat":
                    await resp.write(encode_sse(build_chunk(meta, [ChoiceUpdate(c.index, text="", role="assistant")])))
                elif c.prefix:
                    await resp.write(encode_sse(build_chunk(meta, [ChoiceUpdate(c.index, text=c.prefix)])))
            u: Update | None = first
            while u is not None:
                if not u.is_empty:
                    await resp.write(encode_sse(build_chunk(meta, [_chunk_update(job, u, want_logprobs)])))
                u = await anext(updates, None)
            if include_usage:
                await resp.write(encode_sse(build_chunk(meta, [], usage=_usage(job))))
        except ConnectionResetError:
            raise
        except Exception as e:
            err = api_error_from(e)
            logger.warning("request %s failed mid-stream: %s", job.id, err.message)
            await resp.write(encode_sse(err.body()))
        await resp.write(encode_sse("[DONE]"))
        await resp.write_eof()
    except ConnectionResetError:
        logger.info("request %s: client disconnected", job.id)
    return resp


def setup_routes(app: web.Application) -> None:
    for prefix in ("/v1", ""):  # the un-prefixed paths are the old exo's, kept for old clients
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
        app.router.add_post(f"{prefix}/completions", completions)
