"""Generation in the Ollama API (https://github.com/ollama/ollama/blob/main/docs/api.md), so Ollama
clients and Open-WebUI-style front ends work against an exo node unchanged.

Routes: ``POST /api/chat``, ``POST /api/generate`` (NDJSON streaming, the default, or one JSON
object with ``"stream": false``); ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps`` and
``GET /api/version`` are in ``ollama_models``, ``POST /api/pull`` and ``DELETE /api/delete`` in
``ollama_downloads``.
Errors are ``{"error": "message"}`` with the HTTP status.

Requests become the serving layer's ``GenerateRequest`` (``exo.api.serving``), as every dialect's
do. Model names may carry Ollama's tag: ``smollm2-135m:latest`` is ``smollm2-135m``.

Options (``"options": {...}``): ``temperature`` [0, 2], ``top_p`` (0, 1], ``top_k`` (>= 0),
``seed`` (negative: random), ``num_predict`` (>= 1; -1 and -2: up to the context length),
``stop`` (strings), ``presence_penalty`` and ``frequency_penalty`` [-2, 2] are honoured; a bad
value is a 400 naming ``options.<name>``. Runtime options that cannot change the answer
(``num_ctx``, ``num_thread``, ``num_gpu`` ...) and sampling knobs exo does not implement
(``repeat_penalty``, ``mirostat`` ...) are ignored with a log line, as Ollama itself does with
options it does not know. ``format`` ("json" or a JSON Schema), ``tools`` (``/api/chat``;
``message.tool_calls`` in the answer, ``tool`` messages with ``tool_name`` in the history),
``think`` (``message.thinking`` / ``thinking``) and ``logprobs`` / ``top_logprobs`` are
honoured; ``images``, ``suffix`` and ``template`` are rejected with 400.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Any, Literal

from aiohttp import web

from exo.api.chat_api.fallback import served_model
from exo.api.chat_api.json_body import read_json
from exo.api.chat_api.parsing import parse_request
from exo.api.chat_api.ollama_protocol import OllamaChatRequest, OllamaGenerateRequest, OllamaRequestBase, ollama_sampling
from exo.api.chat_api.ollama_models import resolve_ollama_model
from exo.api.chat_api.state import STATE_KEY
from exo.api.chat_api.utils import APIError
from exo.api.serving.pipeline import Choice, Job, Update, collect, generate as run_generation, prepare
from exo.api.serving.request import GenerateRequest, ToolCall, ToolSpec, Turn
from exo.api.serving.resolve import api_error_from
from exo.api.serving.token_handler import TokenLogprob
from exo.models.sources import ModelCard

logger = logging.getLogger(__name__)

NDJSON_HEADERS = {"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# ---------------------------------------------------------------------------- helpers


def now_rfc3339() -> str:
    """Current UTC time as Ollama writes ``created_at`` (RFC 3339, microseconds, ``Z``)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _durations(job: Job) -> dict[str, int]:
    """Ollama's timing fields (nanoseconds) and counts."""
    end = job.finished or time.perf_counter()
    first = job.first_token or end
    started = job.started or job.received
    ns = 1_000_000_000
    out = {
        "total_duration": int((end - job.received) * ns),
        "load_duration": int(max(0.0, started - job.received) * ns),
        "prompt_eval_count": job.prompt_tokens,  # the whole prompt, cached tokens included, as Ollama counts it
        "prompt_eval_duration": int((first - started) * ns),
        "eval_count": job.completion_tokens,
        "eval_duration": int((end - first) * ns),
    }
    if job.cached_tokens:  # Ollama's prompt_eval_cached_count (omitted when none)
        out["prompt_eval_cached_count"] = job.cached_tokens
    return out


def ollama_logprobs(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Log-probabilities in Ollama's form: ``[{"token", "logprob", "bytes", "top_logprobs"}]``."""
    return [{"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, b, lp in e.top]} for e in entries]


def _tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Calls as Ollama's ``message.tool_calls`` (arguments as an object)."""
    out = []
    for i, c in enumerate(calls):
        try:
            arguments = json.loads(c.arguments) if c.arguments else {}
        except ValueError:  # cut short by the token budget
            arguments = {}
        out.append({"id": c.id, "function": {"index": i, "name": c.name, "arguments": arguments}})
    return out


# ---------------------------------------------------------------------------- generation


async def _answer(request: web.Request, req: OllamaRequestBase, card: ModelCard, gen: GenerateRequest,
                  kind: Literal["chat", "generate"], received: float) -> web.StreamResponse:
    """Run the generation of ``card`` (``req.model`` resolved) and answer in Ollama's framing
    (NDJSON lines or one object)."""
    state = request.app[STATE_KEY]
    job = await prepare(state, gen, "ollama", received, card)
    model = served_model(request, req.model, job.card)  # the fallback's id when one answers
    want_logprobs = bool(req.logprobs)

    def part(content: str, thinking: str = "", calls: list[ToolCall] | None = None,
             logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
        if kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = _tool_calls(calls)
            body["message"] = message
        else:
            body["response"] = content
            if thinking:
                body["thinking"] = thinking
        if want_logprobs and logprobs:
            body["logprobs"] = ollama_logprobs(logprobs)
        return body

    def final(c: Choice, content: str, thinking: str = "", calls: list[ToolCall] | None = None,
              logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        body = part(content, thinking, calls, logprobs)
        reason = "stop" if c.finish_reason == "tool_calls" else c.finish_reason
        body.update(done=True, done_reason=reason, **_durations(job))
        if kind == "generate":
            body["context"] = list(c.prompt_ids) + list(c.text.token_ids)
        return body

    updates = run_generation(state, job)
    try:
        first = await updates.__anext__()  # errors before anything is sent are plain HTTP errors
        c = job.choices[0]
        if not req.stream:
            await collect(updates)
            return web.json_response(final(c, c.content, c.reasoning, c.tool_calls, c.logprobs))
        resp = web.StreamResponse(headers=NDJSON_HEADERS)
        await resp.prepare(request)
        try:
            u: Update | None = first
            while u is not None:
                if u.content or u.reasoning or (want_logprobs and u.logprobs):
                    line = part(u.content, u.reasoning, logprobs=u.logprobs)
                    line["done"] = False
                    await resp.write(_ndjson(line))
                if u.finish_reason is not None:
                    if c.tool_calls:  # Ollama sends whole calls, in a line of their own
                        line = part("", calls=c.tool_calls)
                        line["done"] = False
                        await resp.write(_ndjson(line))
                    await resp.write(_ndjson(final(c, "")))
                    break
                u = await anext(updates, None)
        except ConnectionResetError:
            logger.info("request %s: client disconnected", job.id)
            return resp
        except Exception as e:
            err = api_error_from(e)
            logger.warning("request %s failed mid-stream: %s", job.id, err.message)
            await resp.write(_ndjson({"error": err.message}))
        await resp.write_eof()
        return resp
    finally:
        await updates.aclose()


def _ndjson(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _load_response(req: OllamaRequestBase, kind: Literal["chat", "generate"]) -> web.Response:
    """What Ollama answers a request without messages / prompt: the model is (kept) loaded."""
    body: dict[str, Any] = {"model": req.model, "created_at": now_rfc3339(), "done": True, "done_reason": "load"}
    if kind == "chat":
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return web.json_response(body)


# ---------------------------------------------------------------------------- handlers


async def chat(request: web.Request) -> web.StreamResponse:
    """``POST /api/chat``: a chat turn, streamed as NDJSON (default) or one JSON object.

    Errors (``{"error": ...}``): 400 invalid body or option (named), 404 unknown model, 413
    prompt longer than the context, 503 no node can serve the model, 504 no token in time.
    """
    received = time.perf_counter()
    state = request.app[STATE_KEY]
    req = parse_request(OllamaChatRequest, await read_json(request))
    card = await resolve_ollama_model(state, req.model)
    if not req.messages:
        return _load_response(req, "chat")
    turns = []
    for i, m in enumerate(req.messages):
        if m.images:
            raise APIError(400, f"messages[{i}].images: images are not supported by this model",
                           param=f"messages[{i}].images", code="unsupported_parameter")
        calls = [ToolCall(f"call_{i}_{j}", c.function.name, json.dumps(c.function.arguments, ensure_ascii=False))
                 for j, c in enumerate(m.tool_calls or [])]
        turns.append(Turn(m.role, m.content, calls, None, m.tool_name, m.thinking, f"messages[{i}]"))
    sampling, max_tokens, stops = ollama_sampling(req)
    tools = [ToolSpec(t.function.name, t.function.description or "",
                      t.function.parameters if t.function.parameters is not None else {"type": "object", "properties": {}},
                      f"tools[{i}].function")
             for i, t in enumerate(req.tools or [])]
    gen = GenerateRequest(model=card.model_id, turns=turns, max_tokens=max_tokens, stop=stops, sampling=sampling,
                          tools=tools, response_format=req.response_format(), thinking=req.thinking())
    return await _answer(request, req, card, gen, "chat", received)


async def generate(request: web.Request) -> web.StreamResponse:
    """``POST /api/generate``: a completion of ``prompt`` (the chat template applied, with
    ``system`` as the system message, unless ``raw``), streamed as NDJSON or one object. The
    final object's ``context`` (token ids) continues the conversation when sent back.

    Errors as for ``/api/chat``.
    """
    received = time.perf_counter()
    state = request.app[STATE_KEY]
    req = parse_request(OllamaGenerateRequest, await read_json(request))
    for name in ("suffix", "template"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported by exo", param=name, code="unsupported_parameter")
    if req.images:
        raise APIError(400, "images are not supported by this model", param="images", code="unsupported_parameter")
    card = await resolve_ollama_model(state, req.model)
    if not req.prompt and not req.context:
        return _load_response(req, "generate")
    sampling, max_tokens, stops = ollama_sampling(req)
    gen = GenerateRequest(model=card.model_id, prefix_ids=list(req.context or []), max_tokens=max_tokens, stop=stops,
                          sampling=sampling, response_format=req.response_format(), thinking=req.thinking(),
                          param="prompt")
    if req.raw or not req.prompt:
        gen.prompts = [req.prompt]
    else:
        gen.turns = ([Turn("system", req.system)] if req.system else []) + [Turn("user", req.prompt)]
    return await _answer(request, req, card, gen, "generate", received)


def setup_routes(app: web.Application) -> None:
    """Register Ollama's generation routes (``/api/chat``, ``/api/generate``) on ``app``."""
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
