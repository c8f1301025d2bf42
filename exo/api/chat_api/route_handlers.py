"""``POST /v1/chat/completions`` and ``POST /v1/completions``.

Both build a ``_Job`` (one ``_Choice`` per generation: prompt token ids, options, text stream)
and hand it to ``run_job``, which feeds a ``TokenQueue`` from ``Node.generate`` and either
streams server-sent events or collects one JSON response. Every path out of ``run_job``
(finish, stop string, error, client disconnect cancelling the handler) leaves the
``TokenQueue`` block, which closes every generator: the node ends the request on the ring.
The steps every dialect shares (resolve the model, tokenize, defaults, errors) are in ``serving``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field

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
from exo.api.chat_api.models import (
    OPENAI_DEFAULT_COMPLETIONS_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)
from exo.api.chat_api.rate_limit import check_generations
from exo.api.chat_api.responses import (
    ChatChoice,
    ChatCompletion,
    ChatResponseMessage,
    Completion,
    CompletionChoice,
    Usage,
)
from exo.api.chat_api.serving import (
    api_error_from, encode_prompt, get_tokenizer, model_defaults, resolve_max_tokens, resolve_model,
)
from exo.api.chat_api.state import STATE_KEY, APIState
from exo.api.chat_api.token_handler import ChoiceTextStream, TokenLogprob
from exo.api.chat_api.token_queue import ChoiceEvent, TokenQueue
from exo.api.chat_api.utils import APIError, new_id, unix_time
from exo.inference.generation import GenerationOptions
from exo.inference.tokenizers import Tokenizer
from exo.orchestration.errors import GenerationError

logger = logging.getLogger(__name__)


@dataclass
class _Choice:
    """One generation of a request and what it has produced so far."""

    index: int
    prompt_ids: list[int]
    options: GenerationOptions
    text: ChoiceTextStream
    prefix: str = ""  # echoed prompt (completions with echo)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class _Job:
    """Everything one request needs to run and to be answered."""

    kind: ChunkKind
    id: str
    created: int
    model: str
    choices: list[_Choice]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    want_logprobs: bool

    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, sum(c.text.completion_tokens for c in self.choices))


# ---------------------------------------------------------------------------- handlers


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: OpenAI chat completions, streamed (SSE) or not.

    Errors (OpenAI format): 400 invalid body or parameter, 404 unknown model, 413 prompt longer
    than the model's context, 503 no node can serve the model, 504 no token within the
    response timeout, 500 generation failed.
    """
    state = request.app[STATE_KEY]
    req = parse_request(ChatCompletionRequest, await read_json(request))
    check_generations(request.app, 1, req.num_choices)
    card = await resolve_model(state, req.model)
    tokenizer = await get_tokenizer(state, card.model_id)
    prompt_ids = await encode_prompt(
        tokenizer, lambda: tokenizer.apply_chat_template(req.template_messages(), add_generation_prompt=True),
        card.context_length, "messages")
    max_tokens = resolve_max_tokens(req.requested_max_tokens, state.defaults.max_tokens, len(prompt_ids),
                                    card.context_length, "messages")
    stops = req.stop_strings()
    want_logprobs = bool(req.logprobs)
    choices = [
        _Choice(i, prompt_ids, _options(req, max_tokens, tokenizer, i, state), ChoiceTextStream(tokenizer, stops, want_logprobs))
        for i in range(req.num_choices)
    ]
    job = _Job("chat", new_id("chatcmpl"), unix_time(), card.model_id, choices, len(prompt_ids),
               bool(req.stream), req.include_usage, want_logprobs)
    return await run_job(request, state, job)


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``: OpenAI (legacy) text completions, streamed or not.

    Each prompt gets ``n`` choices, indexed ``prompt_index * n + i``. Errors as for chat.
    """
    state = request.app[STATE_KEY]
    req = parse_request(CompletionRequest, await read_json(request))
    check_generations(request.app, len(req.prompts()), req.num_choices)
    card = await resolve_model(state, req.model)
    tokenizer = await get_tokenizer(state, card.model_id)
    stops = req.stop_strings()
    want_logprobs = req.logprobs is not None
    choices: list[_Choice] = []
    prompt_tokens = 0
    for p_index, prompt in enumerate(req.prompts()):
        param = "prompt" if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) else f"prompt[{p_index}]"
        if isinstance(prompt, str):
            prompt_ids = await encode_prompt(tokenizer, lambda: prompt, card.context_length, param)
            prompt_text = prompt
        else:
            bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise APIError(400, f"Invalid value for '{param}': token id {bad[0]} is outside the vocabulary "
                                    f"(0-{tokenizer.vocab_size - 1})", param=param, code="invalid_value")
            prompt_ids, prompt_text = list(prompt), tokenizer.decode(prompt)
        if not prompt_ids:
            raise APIError(400, f"Invalid value for '{param}': the prompt is empty", param=param, code="invalid_value")
        max_tokens = resolve_max_tokens(req.max_tokens, OPENAI_DEFAULT_COMPLETIONS_MAX_TOKENS,
                                        len(prompt_ids), card.context_length, param)
        prompt_tokens += len(prompt_ids)
        for i in range(req.num_choices):
            choices.append(_Choice(
                p_index * req.num_choices + i, prompt_ids, _options(req, max_tokens, tokenizer, i, state),
                ChoiceTextStream(tokenizer, stops, want_logprobs), prefix=prompt_text if req.echo else "",
            ))
    job = _Job("completion", new_id("cmpl"), unix_time(), card.model_id, choices, prompt_tokens,
               bool(req.stream), req.include_usage, want_logprobs)
    return await run_job(request, state, job)


def _options(req: ChatCompletionRequest | CompletionRequest, max_tokens: int, tokenizer: Tokenizer, index: int,
             state: APIState) -> GenerationOptions:
    try:
        return req.to_generation_options(max_tokens, tokenizer.eos_token_ids, index, model_defaults(state, tokenizer))
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None


# ---------------------------------------------------------------------------- running a job


async def run_job(request: web.Request, state: APIState, job: _Job) -> web.StreamResponse:
    """Generate every choice of ``job`` on the node and answer (SSE stream or JSON)."""
    node = state.node
    factories = [
        functools.partial(node.generate, job.model, c.prompt_ids, c.options, f"{job.id}-{c.index}")
        for c in job.choices
    ]
    state.active_requests.add(job.id)
    logger.debug("request %s: %d choice(s) of %s, %d prompt tokens", job.id, len(job.choices), job.model, job.prompt_tokens)
    try:
        async with TokenQueue(factories, name=job.id) as queue:
            if job.stream:
                return await _stream(request, state, job, queue)
            return await _collect(state, job, queue)
    finally:
        state.active_requests.discard(job.id)


async def _next_event(queue: TokenQueue, timeout: float) -> ChoiceEvent:
    try:
        return await queue.get(timeout)
    except asyncio.TimeoutError:
        raise APIError(504, f"no token from the cluster within {timeout:g} s", code="timeout") from None


def _apply(job: _Job, queue: TokenQueue, ev: ChoiceEvent) -> ChoiceUpdate | None:
    """Advance the choice of ``ev``; the update to send, or None for a finished choice.

    Raises:
        the generator's exception, or GenerationError for a result carrying an error.
    """
    choice = job.choices[ev.index]
    if choice.finish_reason is not None:  # e.g. what a choice closed at a stop string still sent
        return None
    if ev.error is not None:
        raise ev.error
    result = ev.result
    if result is None:  # the generator ended without a finish reason
        delta, finish = choice.text.finish(), "stop"
    elif result.error is not None or result.finish_reason == "error":
        raise GenerationError(result.error or "generation failed")
    else:
        delta = choice.text.add_result(result)
        finish = None
        if delta.stopped:
            finish = "stop"
            queue.cancel_choice(ev.index)
        elif result.finish_reason is not None:
            tail = choice.text.finish()
            delta.text += tail.text
            delta.logprobs.extend(tail.logprobs)
            finish = "length" if result.finish_reason == "length" else "stop"
    choice.finish_reason = finish
    choice.logprobs.extend(delta.logprobs)
    return ChoiceUpdate(
        index=choice.index,
        text=delta.text,
        finish_reason=finish,
        logprobs=delta.logprobs if job.want_logprobs and delta.logprobs else None,
        text_offset_base=len(choice.prefix),
    )


async def _collect(state: APIState, job: _Job, queue: TokenQueue) -> web.Response:
    remaining = len(job.choices)
    while remaining:
        ev = await _next_event(queue, state.response_timeout)
        try:
            update = _apply(job, queue, ev)
        except Exception as e:
            raise api_error_from(e) from None
        if update is not None and update.finish_reason is not None:
            remaining -= 1
    if job.kind == "chat":
        body = ChatCompletion(
            id=job.id, created=job.created, model=job.model, usage=job.usage(),
            choices=[
                ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text.text),
                           logprobs=chat_logprobs(c.logprobs) if job.want_logprobs else None,
                           finish_reason=c.finish_reason)  # type: ignore[arg-type]
                for c in job.choices
            ],
        )
    else:
        body = Completion(
            id=job.id, created=job.created, model=job.model, usage=job.usage(),
            choices=[
                CompletionChoice(index=c.index, text=c.prefix + c.text.text,
                                 logprobs=completion_logprobs(c.logprobs, len(c.prefix)) if job.want_logprobs else None,
                                 finish_reason=c.finish_reason)  # type: ignore[arg-type]
                for c in job.choices
            ],
        )
    return web.json_response(body.model_dump(mode="json"))


async def _stream(request: web.Request, state: APIState, job: _Job, queue: TokenQueue) -> web.StreamResponse:
    # wait for the first event before answering, so that an early failure is a plain JSON error
    ev = await _next_event(queue, state.response_timeout)
    if ev.error is not None:
        raise api_error_from(ev.error)
    if ev.result is not None and (ev.result.error is not None or ev.result.finish_reason == "error"):
        raise api_error_from(GenerationError(ev.result.error or "generation failed"))
    meta = StreamMeta(job.kind, job.id, job.created, job.model, job.include_usage)
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    try:
        try:
            for c in job.choices:  # one chunk per choice, as OpenAI streams them
                if job.kind == "chat":
                    await resp.write(encode_sse(build_chunk(meta, [ChoiceUpdate(c.index, text="", role="assistant")])))
                elif c.prefix:
                    await resp.write(encode_sse(build_chunk(meta, [ChoiceUpdate(c.index, text=c.prefix)])))
            remaining = len(job.choices)
            while True:
                update = _apply(job, queue, ev)
                if update is not None:
                    if update.text or update.finish_reason or update.logprobs:
                        await resp.write(encode_sse(build_chunk(meta, [update])))
                    if update.finish_reason is not None:
                        remaining -= 1
                if remaining == 0:
                    break
                ev = await _next_event(queue, state.response_timeout)
            if job.include_usage:
                await resp.write(encode_sse(build_chunk(meta, [], usage=job.usage())))
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
