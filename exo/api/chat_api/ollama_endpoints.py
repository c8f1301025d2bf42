"""The Ollama API (https://github.com/ollama/ollama/blob/main/docs/api.md), so Ollama clients and
Open-WebUI-style front ends work against an exo node unchanged.

Routes: ``POST /api/chat``, ``POST /api/generate`` (NDJSON streaming, the default, or one JSON
object with ``"stream": false``), ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``,
``GET /api/version``; ``POST /api/pull`` and ``DELETE /api/delete`` are in ``ollama_downloads``.
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

import asyncio
import collections
import datetime as dt
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from exo.api.chat_api.fallback import served_model
from exo.api.chat_api.models import parse_request
from exo.api.chat_api.json_body import read_json
from exo.api.chat_api.serving import (
    encode_prompt, get_tokenizer, model_defaults, resolve_max_tokens, resolve_model,
)
from exo.api.chat_api.state import STATE_KEY, APIState
from exo.api.chat_api.text_generation import GenerationStats, TextStep, collect_text, generate_text
from exo.api.chat_api.utils import APIError, new_id
from exo.inference.generation import SEED_MAX, GenerationOptions
from exo.inference.tokenizers import Tokenizer
from exo.models import catalogue
from exo.models.gguf import type_name
from exo.models.hub import parse_hub_name as hub_parse
from exo.models.sources import ModelCard
from exo.models.weights import TensorInfo, open_weights

logger = logging.getLogger(__name__)

NDJSON_HEADERS = {"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DEFAULT_TAG = "latest"
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

_LENIENT = ConfigDict(extra="ignore", strict=True)  # Ollama's server ignores fields it does not know


# ---------------------------------------------------------------------------- requests


class OllamaMessage(BaseModel):
    """One message of ``/api/chat``."""

    model_config = _LENIENT
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None
    thinking: str | None = None


class _OllamaBase(BaseModel):
    model_config = _LENIENT
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


class OllamaShowRequest(BaseModel):
    """``POST /api/show`` body (``name`` is the older spelling of ``model``)."""

    model_config = _LENIENT
    model: str | None = None
    name: str | None = None
    verbose: bool | None = None


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


def model_base_name(name: str) -> str:
    """``smollm2-135m:latest`` -> ``smollm2-135m`` (only the default tag is stripped)."""
    base, sep, tag = name.rpartition(":")
    return base if sep and tag == DEFAULT_TAG and base else name


async def _resolve(state: APIState, name: str) -> ModelCard:
    """The card of ``name`` (Ollama's ``:latest`` tag allowed). Raises APIError: 404 as Ollama
    words it ("model 'x' not found"), with why; 400 and 503 as ``resolve_model``."""
    try:
        return await resolve_model(state, model_base_name(name))
    except APIError as e:
        if e.status == 404:
            why = e.message.split(": ", 1)[1] if ": " in e.message else ""
            raise APIError(404, f"model '{name}' not found" + (f" ({why})" if why else ""), param="model",
                           code="model_not_found") from None
        raise


def now_rfc3339() -> str:
    """Current UTC time as Ollama writes ``created_at`` (RFC 3339, microseconds, ``Z``)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _file_facts(card: ModelCard) -> tuple[int, str, str]:
    """(size in bytes, modification time RFC 3339, digest) of the model's weights."""
    size, mtime = card.size or 0, 0.0
    try:
        if card.path is not None:
            mtime = card.path.stat().st_mtime
    except OSError:
        pass
    modified = dt.datetime.fromtimestamp(mtime, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    digest = hashlib.sha256(f"{card.model_id}:{size}:{mtime}".encode()).hexdigest()
    return size, modified, digest


_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass(frozen=True)
class ModelFacts:
    """What Ollama says of a model beyond its card: ``format`` ("gguf" or "safetensors"),
    ``quantization_level`` (``Q4_K_M``, ``F32``, ...), ``parameter_count`` and ``model_info``
    (GGUF metadata keys, as Ollama reports them)."""

    format: str = ""
    quantization_level: str = ""
    parameter_count: int = 0
    model_info: dict[str, Any] = field(default_factory=dict)


def _gguf_quant(metadata: dict[str, Any], info: dict[str, TensorInfo]) -> str:
    """The quantization of a GGUF: its ``general.file_type`` (llama.cpp's names), else the type
    holding most of its matrices' bytes."""
    file_type = metadata.get("general.file_type")
    if isinstance(file_type, int):
        from gguf.constants import LlamaFileType

        try:
            name = LlamaFileType(file_type).name
        except ValueError:
            name = "GUESSED"
        if name != "GUESSED":
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    counts: collections.Counter[int] = collections.Counter()
    for t in info.values():
        if len(t.shape) > 1:
            counts[t.qtype] += t.nbytes
    return type_name(counts.most_common(1)[0][0]) if counts else ""


def model_facts(card: ModelCard, verbose: bool = False) -> ModelFacts:
    """The facts of ``card``'s checkpoint (reads its header: call from a thread). A model whose
    files are not here yet: what the catalogue or its hub name says. Arrays in the metadata
    (the vocabulary, merges) are None unless ``verbose``, as Ollama shows them."""
    entry = catalogue.CATALOGUE.get(card.model_id)
    if card.path is None:
        ref = hub_parse(card.model_id)
        fmt = "gguf" if (entry is not None and entry.gguf) or (ref is not None and (ref.filename or ref.quant)) else \
            "safetensors" if entry is not None else ""
        quant = entry.default_quant if entry is not None and entry.gguf else (ref.quant or "") if ref is not None else ""
        return ModelFacts(fmt, quant, entry.params if entry is not None else 0,
                          {"general.architecture": card.architecture, f"{card.architecture}.block_count": card.n_layers,
                           f"{card.architecture}.context_length": card.context_length})
    w = open_weights(card.path)
    info = w.tensor_info()
    params = sum(math.prod(t.shape) for t in info.values())
    if w.format == "gguf":
        meta = w.metadata
        model_info = {k: (v if verbose or not isinstance(v, list) else None) for k, v in meta.items()}
        model_info["general.parameter_count"] = params
        return ModelFacts("gguf", _gguf_quant(meta, info), params, model_info)
    a, arch = w.args, w.args.architecture
    model_info = {
        "general.architecture": arch, "general.parameter_count": params,
        f"{arch}.block_count": a.n_layers, f"{arch}.context_length": a.max_seq_len,
        f"{arch}.embedding_length": a.hidden_size, f"{arch}.feed_forward_length": a.intermediate_size,
        f"{arch}.attention.head_count": a.n_heads, f"{arch}.attention.head_count_kv": a.n_kv_heads,
        f"{arch}.attention.key_length": a.head_dim, f"{arch}.attention.value_length": a.head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": a.rms_norm_eps, f"{arch}.rope.freq_base": a.ropes[0].theta,
        f"{arch}.vocab_size": a.vocab_size,
    }
    dtype = str(w.config.get("torch_dtype") or w.config.get("dtype") or "")
    return ModelFacts("safetensors", _DTYPES.get(dtype, dtype.upper()), params, model_info)


def _parameter_size(params: int) -> str:
    """``134515008`` -> ``"134.52M"``, ``3212749888`` -> ``"3.2B"`` (Ollama's ``HumanNumber``)."""
    if not params:
        return ""
    for unit, scale, decimals in (("B", 1e9, 1), ("M", 1e6, 2)):
        if params >= scale:
            n = params / scale
            return f"{n:.0f}{unit}" if n == int(n) else f"{n:.{decimals}f}{unit}"
    return f"{params / 1e3:.0f}K" if params >= 1e3 else str(params)


def model_details(card: ModelCard, facts: ModelFacts | None = None) -> dict[str, Any]:
    """Ollama's ``details`` object of a model (``facts``: from ``model_facts``; without them,
    what the card says)."""
    if facts is None:
        fmt = "" if card.path is None else "gguf" if card.path.suffix == ".gguf" else "safetensors"
        params = card.args.layer_params() * card.n_layers if card.args is not None else 0
        facts = ModelFacts(fmt, "", params)
    return {"parent_model": "", "format": facts.format, "family": card.architecture, "families": [card.architecture],
            "parameter_size": _parameter_size(facts.parameter_count), "quantization_level": facts.quantization_level}


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
    card = await _resolve(state, req.model)
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
    card = await _resolve(state, req.model)
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


async def tags(request: web.Request) -> web.Response:
    """``GET /api/tags``: the models whose weights are on this node (Ollama's local models), named
    with Ollama's ``:latest`` tag."""
    state = request.app[STATE_KEY]
    cards = [c for c in sorted(state.node.available_models(), key=lambda c: c.model_id)
             if state.node.model_state(c.model_id) not in ("not downloaded", "downloading")]
    facts = await asyncio.to_thread(lambda: [_facts_or_none(c) for c in cards])
    models = []
    for card, f in zip(cards, facts):
        size, modified, digest = _file_facts(card)
        name = f"{card.model_id}:{DEFAULT_TAG}"
        models.append({"name": name, "model": name, "modified_at": modified, "size": size, "digest": digest,
                       "details": model_details(card, f)})
    return web.json_response({"models": models})


def _facts_or_none(card: ModelCard) -> ModelFacts | None:
    try:
        return model_facts(card)
    except (OSError, ValueError) as e:  # its files changed under us: the card's own facts
        logger.warning("%s: %s", card.model_id, e)
        return None


async def show(request: web.Request) -> web.Response:
    """``POST /api/show``: details of any model a request may name (a catalogue id, a local
    path, a hub repo: its header is fetched, not its weights): format, family, parameter
    size and quantization, ``model_info`` (its GGUF metadata, or the same keys from a
    safetensors config; ``verbose`` includes the vocabulary), the chat template.

    Errors: 400 no model named or not a model, 404 unknown model, 503 its header cannot be
    fetched now.
    """
    state = request.app[STATE_KEY]
    req = parse_request(OllamaShowRequest, await read_json(request))
    name = req.model or req.name
    if not name:
        raise APIError(400, "Missing required parameter: 'model'", param="model", code="missing_required_parameter")
    card = await _resolve(state, name)
    tokenizer = await get_tokenizer(state, card.model_id)
    card = state.node.cached_card(card.model_id) or card  # with its path once the header came
    facts = await asyncio.to_thread(model_facts, card, bool(req.verbose))
    size, modified, _ = _file_facts(card)
    model_info = {"general.architecture": card.architecture, "general.name": card.name, **facts.model_info}
    model_info.setdefault("tokenizer.vocab_size", tokenizer.vocab_size)
    return web.json_response({
        "license": str(model_info.get("general.license") or ""),
        "modelfile": f"# exo model {card.model_id}\nFROM {card.model_id}\n",
        "parameters": "",
        "template": tokenizer.chat_template or "",
        "details": model_details(card, facts),
        "model_info": model_info,
        "capabilities": ["completion"] + (["chat"] if tokenizer.chat_template else []),
        "modified_at": modified,
        "size": size,
    })


async def ps(request: web.Request) -> web.Response:
    """``GET /api/ps``: the models this node has loaded (its shards' weights), most recently used last."""
    state = request.app[STATE_KEY]
    models = []
    for model_id, engine in state.node.shards.items():
        shard = engine.shard
        if shard is None:
            continue
        card = state.node.cached_card(model_id)
        name = f"{model_id}:{DEFAULT_TAG}"
        _, _, digest = _file_facts(card) if card else (0, "", "")
        models.append({
            "name": name, "model": name, "size": int(engine.weight_bytes()), "digest": digest,
            "details": model_details(card) if card else {}, "expires_at": "2999-01-01T00:00:00Z", "size_vram": 0,
            "context_length": card.context_length if card else None,
            "layers": [shard.start_layer, shard.end_layer],
        })
    return web.json_response({"models": models})


def exo_version() -> str:
    """exo's version."""
    import exo

    return exo.__version__


async def version(request: web.Request) -> web.Response:
    """``GET /api/version``: ``{"version": exo's version}``."""
    return web.json_response({"version": exo_version()})


def setup_routes(app: web.Application) -> None:
    """Register the Ollama routes (``/api/*``) on ``app``."""
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
    app.router.add_get("/api/tags", tags)
    app.router.add_post("/api/show", show)
    app.router.add_get("/api/ps", ps)
    app.router.add_get("/api/version", version)
