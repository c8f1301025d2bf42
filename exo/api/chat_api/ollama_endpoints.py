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
from pydantic import BaseModel, Field

from exo.api.chat_api.fallback import served_model
from exo.api.chat_api.json_body import read_json
from exo.api.chat_api.models import parse_request
from exo.api.chat_api.ollama_models import LENIENT, resolve_ollama_model
from exo.api.chat_api.state import STATE_KEY
from exo.api.chat_api.utils import APIError
from exo.api.serving.pipeline import Choice, Job, Update, collect, generate as run_generation, prepare
from exo.api.serving.request import GenerateRequest, ResponseFormat, Sampling, ToolCall, ToolSpec, Turn
from exo.api.serving.resolve import api_error_from
from exo.api.serving.token_handler import TokenLogprob
from exo.inference.generation import SEED_MAX

logger = logging.getLogger(__name__)

NDJSON_HEADERS = {"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_STOP_STRINGS = 16

# options that cannot change the answer (memory, threads, devices, batching): ignored
_RUNTIME_OPTIONS = frozenset({
    "numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
    "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep",
})
# sampling options of Ollama that exo does not implement: ignored with a warning
_UNIMPLEMENTED_OPTIONS = frozenset({
    "tfs_z", "typical_p", "repeat_last_n", "repeat_penalty", "mirostat", "mirostat_tau", "mirostat_eta",
    "penalize_newline", "min_p",
})


# ---------------------------------------------------------------------------- requests


class OllamaFunctionCall(BaseModel):
    model_config = LENIENT
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(BaseModel):
    model_config = LENIENT
    function: OllamaFunctionCall


class OllamaMessage(BaseModel):
    """One message of ``/api/chat``; a ``tool`` message names its function in ``tool_name``."""

    model_config = LENIENT
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    thinking: str | None = None
    tool_name: str | None = None


class OllamaFunction(BaseModel):
    model_config = LENIENT
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class OllamaTool(BaseModel):
    model_config = LENIENT
    type: Literal["function"] = "function"
    function: OllamaFunction


class _OllamaBase(BaseModel):
    model_config = LENIENT
    model: str = Field(min_length=1)
    stream: bool = True
    options: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: str | int | float | None = None  # models stay loaded; accepted and ignored
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def response_format(self) -> ResponseFormat:
        """``format``: "json" (any JSON object), a JSON Schema, or nothing.

        Raises:
            APIError: 400 naming ``format`` for any other value.
        """
        if self.format in (None, ""):
            return ResponseFormat()
        if self.format == "json":
            return ResponseFormat("json_object")
        if isinstance(self.format, dict):
            return ResponseFormat("json_schema", self.format)
        raise APIError(400, f"Invalid value for 'format': {self.format!r} is neither \"json\" nor a JSON Schema",
                       param="format", code="invalid_value")

    def thinking(self) -> bool | None:
        return None if self.think is None else self.think is not False


class OllamaChatRequest(_OllamaBase):
    """``POST /api/chat`` body."""

    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[OllamaTool] | None = None


class OllamaGenerateRequest(_OllamaBase):
    """``POST /api/generate`` body."""

    prompt: str = ""
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[Any] | None = None


# ---------------------------------------------------------------------------- options


def _bad_option(name: str, message: str) -> APIError:
    return APIError(400, f"Invalid value for 'options.{name}': {message}", param=f"options.{name}", code="invalid_value")


def _number(options: dict[str, Any], name: str, lo: float | None, hi: float | None, *, lo_open: bool = False,
            integer: bool = False) -> float | int | None:
    if name not in options or options[name] is None:
        return None
    v = options[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise _bad_option(name, f"must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}")
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        raise _bad_option(name, f"must be in {left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}], got {v}")
    return v


def ollama_stops(options: dict[str, Any]) -> list[str]:
    """The ``stop`` option as a list of non-empty strings.

    Raises:
        APIError: 400 naming ``options.stop``.
    """
    stop = options.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad_option("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad_option("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if any(s == "" for s in stops):
        raise _bad_option("stop", "stop strings must not be empty")
    return list(stops)


def ollama_sampling(req: _OllamaBase) -> tuple[Sampling, int | None, list[str]]:
    """Ollama ``options`` (and ``logprobs``) -> (sampling, tokens to generate at most or None
    for the default, stop strings). ``num_predict`` -1 / -2 ask for the whole context.

    Raises:
        APIError: 400 naming ``options.<name>`` for a bad value.
    """
    options = dict(req.options or {})
    for name in sorted(set(options) - {"temperature", "top_p", "top_k", "seed", "num_predict", "stop",
                                       "presence_penalty", "frequency_penalty"}):
        if name in _UNIMPLEMENTED_OPTIONS:
            logger.warning("Ollama option %s is not implemented by exo; ignored", name)
        elif name not in _RUNTIME_OPTIONS:
            logger.warning("unknown Ollama option %s; ignored", name)
    temperature = _number(options, "temperature", 0.0, 2.0)
    top_p = _number(options, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _number(options, "top_k", 0, None, integer=True)
    seed = _number(options, "seed", None, SEED_MAX, integer=True)
    presence = _number(options, "presence_penalty", -2.0, 2.0)
    frequency = _number(options, "frequency_penalty", -2.0, 2.0)
    num_predict = _number(options, "num_predict", -2, None, integer=True)
    if num_predict == 0:
        raise _bad_option("num_predict", "must be >= 1, or -1 / -2 for no limit but the context length")
    max_tokens = 2**62 if num_predict in (-1, -2) else num_predict  # clamped to the context's room
    sampling = Sampling(
        temperature=float(temperature) if temperature is not None else None,
        top_p=float(top_p) if top_p is not None else None,
        top_k=int(top_k) if top_k is not None else None,
        seed=int(seed) if seed is not None and seed >= 0 else None,
        presence_penalty=float(presence or 0.0), frequency_penalty=float(frequency or 0.0),
        logprobs=bool(req.logprobs), top_logprobs=int(req.top_logprobs or 0),
    )
    return sampling, int(max_tokens) if max_tokens is not None else None, ollama_stops(options)


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
    return {
        "total_duration": int((end - job.received) * ns),
        "load_duration": int(max(0.0, started - job.received) * ns),
        "prompt_eval_count": job.prompt_tokens,
        "prompt_eval_duration": int((first - started) * ns),
        "eval_count": job.completion_tokens,
        "eval_duration": int((end - first) * ns),
    }


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


async def _answer(request: web.Request, req: _OllamaBase, gen: GenerateRequest, kind: Literal["chat", "generate"],
                  received: float) -> web.StreamResponse:
    """Run the generation and answer in Ollama's framing (NDJSON lines or one object)."""
    state = request.app[STATE_KEY]
    job = await prepare(state, gen, "ollama", received)
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


def _load_response(req: _OllamaBase, kind: Literal["chat", "generate"]) -> web.Response:
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
    return await _answer(request, req, gen, "chat", received)


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
    return await _answer(request, req, gen, "generate", received)


def setup_routes(app: web.Application) -> None:
    """Register Ollama's generation routes (``/api/chat``, ``/api/generate``) on ``app``."""
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
