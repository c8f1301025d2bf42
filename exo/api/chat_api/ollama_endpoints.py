"""Generation in the Ollama API (https://github.com/ollama/ollama/blob/main/docs/api.md), so Ollama
clients and Open-WebUI-style front ends work against an exo node unchanged.

Routes: ``POST /api/chat``, ``POST /api/generate`` (NDJSON streaming, the default, or one JSON
object with ``"stream": false``); ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps`` and
``GET /api/version`` are in ``ollama_models``, ``POST /api/pull`` and ``DELETE /api/delete`` in
``ollama_downloads``.
Errors are ``{"error": "message"}`` with the HTTP status.

Requests become the same internal request as the OpenAI endpoints (chat template, the node's
``generate``, ``ChoiceTextStream`` for text and stop strings, see ``text_generation``).
Model names may carry Ollama's tag: ``smollm2-135m:latest`` is ``smollm2-135m``.

Options (``"options": {...}``): ``temperature`` [0, 2], ``top_p`` (0, 1], ``top_k`` (>= 0),
``seed`` (negative: random), ``num_predict`` (>= 1; -1 and -2: up to the context length),
``stop`` (strings), ``presence_penalty`` and ``frequency_penalty`` [-2, 2] are honoured; a bad
value is a 400 naming ``options.<name>``. Runtime options that cannot change the answer
(``num_ctx``, ``num_thread``, ``num_gpu`` ...) and sampling knobs exo does not implement
(``repeat_penalty``, ``mirostat`` ...) are ignored with a log line, as Ollama itself does with
options it does not know. Request fields that would change the answer but that exo cannot honour
(``format``, ``tools``, ``images``, ``think``, ``suffix``, ``template``, ``logprobs``) are
rejected with 400.
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
from exo.api.chat_api.serving import encode_prompt, get_tokenizer, model_defaults, resolve_max_tokens
from exo.api.chat_api.state import STATE_KEY, APIState
from exo.api.chat_api.text_generation import GenerationStats, TextStep, collect_text, generate_text
from exo.api.chat_api.utils import APIError, new_id
from exo.inference.generation import SEED_MAX, GenerationOptions
from exo.inference.tokenizers import Tokenizer
from exo.models.sources import ModelCard

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


class OllamaMessage(BaseModel):
    """One message of ``/api/chat``."""

    model_config = LENIENT
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None
    thinking: str | None = None


class _OllamaBase(BaseModel):
    model_config = LENIENT
    model: str = Field(min_length=1)
    stream: bool = True
    options: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: str | int | float | None = None  # models stay loaded; accepted and ignored
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def check_unsupported(self) -> None:
        """Raises APIError 400 for fields exo cannot honour."""
        if self.format:
            raise APIError(400, "format (structured outputs) is not supported by exo", param="format",
                           code="unsupported_parameter")
        if self.think not in (None, False, "", "false"):
            raise APIError(400, f"{self.model} does not support thinking", param="think", code="unsupported_parameter")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported by exo's Ollama API; use /v1/chat/completions",
                           param="logprobs", code="unsupported_parameter")


class OllamaChatRequest(_OllamaBase):
    """``POST /api/chat`` body."""

    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Any] | None = None


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


def ollama_generation_options(options: dict[str, Any] | None, state: APIState, prompt_tokens: int, card: ModelCard,
                              tokenizer: Tokenizer) -> tuple[GenerationOptions, list[str]]:
    """Ollama ``options`` -> (the engine's options, stop strings): request value > the
    model's defaults (``model_defaults``: the server's configuration, the model's own).

    Raises:
        APIError: 400 naming ``options.<name>`` for a bad value; 413 when the prompt leaves no
            room in the model's context.
    """
    options = dict(options or {})
    for name in sorted(set(options) - {"temperature", "top_p", "top_k", "seed", "num_predict", "stop",
                                       "presence_penalty", "frequency_penalty"}):
        if name in _UNIMPLEMENTED_OPTIONS:
            logger.warning("Ollama option %s is not implemented by exo; ignored", name)
        elif name not in _RUNTIME_OPTIONS:
            logger.warning("unknown Ollama option %s; ignored", name)
    d = model_defaults(state, tokenizer)
    temperature = _number(options, "temperature", 0.0, 2.0)
    top_p = _number(options, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _number(options, "top_k", 0, None, integer=True)
    seed = _number(options, "seed", None, SEED_MAX, integer=True)
    presence = _number(options, "presence_penalty", -2.0, 2.0)
    frequency = _number(options, "frequency_penalty", -2.0, 2.0)
    num_predict = _number(options, "num_predict", -2, None, integer=True)
    if num_predict == 0:
        raise _bad_option("num_predict", "must be >= 1, or -1 / -2 for no limit but the context length")
    requested = card.context_length if num_predict in (-1, -2) else num_predict
    max_tokens = resolve_max_tokens(requested, d.max_tokens, prompt_tokens, card.context_length, "prompt")
    gen = GenerationOptions(
        max_tokens=max_tokens,
        temperature=float(temperature if temperature is not None else d.temperature),
        top_p=float(top_p if top_p is not None else d.top_p),
        top_k=int(top_k if top_k is not None else d.top_k),
        seed=int(seed) if seed is not None and seed >= 0 else None,
        stop_token_ids=tuple(tokenizer.eos_token_ids),
        presence_penalty=float(presence or 0.0),
        frequency_penalty=float(frequency or 0.0),
    )
    return gen, ollama_stops(options)


# ---------------------------------------------------------------------------- helpers


def now_rfc3339() -> str:
    """Current UTC time as Ollama writes ``created_at`` (RFC 3339, microseconds, ``Z``)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _durations(stats: GenerationStats, received: float) -> dict[str, int]:
    """Ollama's timing fields (nanoseconds) and counts."""
    end = stats.finished or time.perf_counter()
    first = stats.first_token or end
    ns = 1_000_000_000
    return {
        "total_duration": int((end - received) * ns),
        "load_duration": int(max(0.0, stats.started - received) * ns),
        "prompt_eval_count": stats.prompt_tokens,
        "prompt_eval_duration": int((first - stats.started) * ns),
        "eval_count": stats.completion_tokens,
        "eval_duration": int((end - first) * ns),
    }


# ---------------------------------------------------------------------------- generation


async def _answer(request: web.Request, state: APIState, req: _OllamaBase, card: ModelCard, tokenizer: Tokenizer,
                  prompt_ids: list[int], kind: Literal["chat", "generate"], received: float) -> web.StreamResponse:
    """Run the generation and answer in Ollama's framing (NDJSON lines or one object)."""
    options, stops = ollama_generation_options(req.options, state, len(prompt_ids), card, tokenizer)
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    request_id = new_id("ollama")
    steps = generate_text(state, card.model_id, tokenizer, prompt_ids, options, stops, request_id, stats)
    model = served_model(request, req.model, card)  # the fallback's id when one answers

    def part(text: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
        if kind == "chat":
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["response"] = text
        return body

    def final(step: TextStep, text: str) -> dict[str, Any]:
        body = part(text)
        body.update(done=True, done_reason=step.finish_reason, **_durations(stats, received))
        if kind == "generate":
            body["context"] = list(prompt_ids) + list(stats.token_ids)
        return body

    try:
        first = await steps.__anext__()  # errors before anything is sent are plain HTTP errors
        if not req.stream:
            text, step = await collect_text(first, steps)
            return web.json_response(final(step, text))
        resp = web.StreamResponse(headers=NDJSON_HEADERS)
        await resp.prepare(request)
        try:
            step = first
            while True:
                if step.text:
                    line = part(step.text)
                    line["done"] = False
                    await resp.write(_ndjson(line))
                if step.finish_reason is not None:
                    await resp.write(_ndjson(final(step, "")))
                    break
                step = await steps.__anext__()
        except ConnectionResetError:
            logger.info("request %s: client disconnected", request_id)
            return resp
        except APIError as e:
            logger.warning("request %s failed mid-stream: %s", request_id, e.message)
            await resp.write(_ndjson({"error": e.message}))
        await resp.write_eof()
        return resp
    finally:
        await steps.aclose()


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
    req.check_unsupported()
    if req.tools:
        raise APIError(400, f"{req.model} does not support tools", param="tools", code="unsupported_parameter")
    card = await resolve_ollama_model(state, req.model)
    if not req.messages:
        return _load_response(req, "chat")
    for i, m in enumerate(req.messages):
        if m.images:
            raise APIError(400, f"messages[{i}].images: images are not supported by this model",
                           param=f"messages[{i}].images", code="unsupported_parameter")
        if m.role == "tool" or m.tool_calls:
            raise APIError(400, f"messages[{i}]: tool messages are not supported", param=f"messages[{i}].role",
                           code="unsupported_parameter")
    tokenizer = await get_tokenizer(state, card.model_id)
    turns = [{"role": m.role, "content": m.content} for m in req.messages]
    prompt_ids = await encode_prompt(tokenizer, lambda: tokenizer.apply_chat_template(turns, add_generation_prompt=True),
                                     card.context_length, "messages")
    return await _answer(request, state, req, card, tokenizer, prompt_ids, "chat", received)


async def generate(request: web.Request) -> web.StreamResponse:
    """``POST /api/generate``: a completion of ``prompt`` (the chat template applied, with
    ``system`` as the system message, unless ``raw``), streamed as NDJSON or one object. The
    final object's ``context`` (token ids) continues the conversation when sent back.

    Errors as for ``/api/chat``.
    """
    received = time.perf_counter()
    state = request.app[STATE_KEY]
    req = parse_request(OllamaGenerateRequest, await read_json(request))
    req.check_unsupported()
    for name in ("suffix", "template"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported by exo", param=name, code="unsupported_parameter")
    if req.images:
        raise APIError(400, "images are not supported by this model", param="images", code="unsupported_parameter")
    card = await resolve_ollama_model(state, req.model)
    if not req.prompt and not req.context:
        return _load_response(req, "generate")
    tokenizer = await get_tokenizer(state, card.model_id)
    context = list(req.context or [])
    bad = [t for t in context if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"Invalid value for 'context': token id {bad[0]} is outside the vocabulary "
                            f"(0-{tokenizer.vocab_size - 1})", param="context", code="invalid_value")
    def render() -> str:
        if req.raw or not req.prompt:
            return req.prompt or ""
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
            [{"role": "user", "content": req.prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    prompt_ids = context + await encode_prompt(tokenizer, render, card.context_length, "prompt")
    return await _answer(request, state, req, card, tokenizer, prompt_ids, "generate", received)


def setup_routes(app: web.Application) -> None:
    """Register Ollama's generation routes (``/api/chat``, ``/api/generate``) on ``app``."""
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
