"""Embeddings in the OpenAI and Ollama dialects, computed through the ring (``Node.embed``).

Routes:

* OpenAI ``POST /v1/embeddings`` (and ``/embeddings``;
  https://platform.openai.com/docs/api-reference/embeddings/create): ``input`` a string, a list
  of strings, a list of token ids or a list of lists of token ids; ``model``; ``encoding_format``
  "float" (default) or "base64" (the little-endian float32 bytes, base64-encoded, as the openai
  client decodes them: it asks for base64 unless told otherwise); ``dimensions``; ``user``
  (ignored). Answers ``{"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
  "model", "usage": {"prompt_tokens", "total_tokens"}}``. An input longer than the model's context
  is a 413 naming ``input`` (vLLM and OpenAI refuse it too; nothing is truncated).
* Ollama ``POST /api/embed`` (https://github.com/ollama/ollama/blob/main/docs/api.md): ``model``,
  ``input`` (a string or a list of strings), ``truncate`` (default true: an input longer than the
  context is cut to it; false: a 400 naming ``input``, as Ollama answers), ``dimensions``, ``options`` and
  ``keep_alive`` (accepted, ignored). Answers ``{"model", "embeddings", "total_duration",
  "load_duration", "prompt_eval_count"}``. An empty input loads the model and answers no
  embeddings, as Ollama's ``EmbedHandler`` does.
* Ollama's older ``POST /api/embeddings``: ``model``, ``prompt`` -> ``{"embedding": [...]}``. As in
  Ollama's ``EmbeddingsHandler`` (server/routes.go), this vector is the pooled one *without* L2
  normalization (``/api/embed`` and OpenAI's normalize); an empty prompt answers ``[]``.

Every vector is the model's own pooling (``ModelCard.pooling``: mean, last token or first token
of the final-normed hidden states). ``dimensions``: a Matryoshka model (``ModelCard.matryoshka``,
e.g. Qwen3-Embedding) keeps the first ``dimensions`` values and normalizes again; any other model
allows only its full size (a 400 naming ``dimensions`` otherwise), in both dialects. The inputs
of one request run concurrently on the ring, at most ``rate_limit.max_generations_per_request``
at once. Errors are each dialect's (``dialects.dialect_error_middleware``): 400 naming the
parameter, 404 unknown model, 413 too long, 503 no node can serve it, 500 a failed ring step.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from aiohttp import web
from pydantic import BaseModel, ConfigDict

from exo.api.chat_api.fallback import served_model
from exo.api.chat_api.json_body import read_json
from exo.api.chat_api.parsing import parse_request
from exo.api.chat_api.ollama_models import LENIENT, resolve_ollama_model
from exo.api.chat_api.rate_limit import RATE_CONFIG_KEY
from exo.api.serving.resolve import (
    api_error_from, check_token_ids, encode_prompt, get_tokenizer, require_text_model, resolve_model,
)
from exo.api.chat_api.state import STATE_KEY, APIState
from exo.api.chat_api.utils import APIError, new_id
from exo.inference.pooling import truncate_dimensions
from exo.inference.tokenizers import Tokenizer
from exo.models.sources import ModelCard

logger = logging.getLogger(__name__)

ENCODING_FORMATS = ("float", "base64")


class OpenAIEmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` body (``input`` is checked by ``_openai_inputs``)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    input: Any = None
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None


class OllamaEmbedRequest(BaseModel):
    """``POST /api/embed`` body."""

    model_config = LENIENT
    model: str = ""
    input: Any = None
    truncate: bool = True
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None


class OllamaEmbeddingsRequest(BaseModel):
    """``POST /api/embeddings`` body (Ollama's older endpoint)."""

    model_config = LENIENT
    model: str = ""
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None


@dataclass(frozen=True)
class EmbeddingInput:
    """One input of a request: its text, or its token ids as the client sent them; ``param``
    names it in errors (``input[2]``)."""

    param: str
    text: str | None = None
    token_ids: tuple[int, ...] | None = None


def _bad_input(param: str, message: str) -> APIError:
    return APIError(400, f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _openai_inputs(value: Any) -> list[EmbeddingInput]:
    """OpenAI's ``input`` as a list of inputs.

    Raises:
        APIError: 400 naming ``input`` (missing, empty, a wrong type) or ``input[i]`` (an empty
            string, an empty or mixed list).
    """
    if value is None:
        raise APIError(400, "Missing required parameter: 'input'", param="input", code="missing_required_parameter")
    if isinstance(value, str):
        value = [value]
    elif _is_token_list(value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _bad_input("input", "must be a non-empty string, list of strings, list of token ids or list of lists of token ids")
    out = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if isinstance(item, str):
            if not item:
                raise _bad_input(param, "an input must not be an empty string")
            out.append(EmbeddingInput(param, text=item))
        elif _is_token_list(item):
            out.append(EmbeddingInput(param, token_ids=tuple(item)))
        else:
            raise _bad_input(param, "must be a non-empty string or a non-empty list of token ids (all inputs of one kind)")
    return out


def _ollama_inputs(value: Any) -> list[EmbeddingInput]:
    """Ollama's ``input`` (a string or a list of strings; empty strings are dropped, as Ollama does).

    Raises:
        APIError: 400 naming ``input`` for another type.
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [EmbeddingInput("input", text=value)] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [EmbeddingInput(f"input[{i}]", text=v) for i, v in enumerate(value) if v]
    raise _bad_input("input", "invalid input type: a string or a list of strings")


async def _token_ids(item: EmbeddingInput, tokenizer: Tokenizer, context_length: int, truncate: bool,
                     too_long_status: int) -> list[int]:
    """The token ids of one input, checked against the vocabulary and the context.

    Raises:
        APIError: 400 naming the input for an id outside the vocabulary; ``too_long_status``
            (OpenAI: 413, Ollama: 400) "context_length_exceeded" naming it for more tokens than
            the context holds (unless ``truncate``: then cut to it).
    """
    if item.token_ids is not None:
        check_token_ids(tokenizer, item.token_ids, item.param)
        ids = list(item.token_ids)
    else:
        text = item.text or ""
        if truncate:  # a text cut to what the context could hold at most still fills it
            text = text[:context_length * tokenizer.max_token_chars]
        try:
            ids = await encode_prompt(tokenizer, lambda: text, context_length, item.param)
        except APIError as e:
            if e.status != 413:
                raise
            raise APIError(too_long_status, e.message, param=e.param, code=e.code) from None
    if not ids:
        raise _bad_input(item.param, "the input has no tokens")
    if len(ids) > context_length:
        if truncate:
            return ids[:context_length]
        raise APIError(too_long_status, f"This model's maximum context length is {context_length} tokens, but {item.param} has "
                            f"{len(ids)} tokens.", param=item.param, code="context_length_exceeded")
    return ids


def _check_dimensions(card: ModelCard, dimensions: int | None, size: int | None) -> None:
    """Refuse a ``dimensions`` this model cannot give (``size``: its embedding size, when known).

    Raises:
        APIError: 400 naming ``dimensions``: below 1, above the size, or another than the size
            for a model that is not Matryoshka.
    """
    if dimensions is None:
        return
    if dimensions < 1:
        raise _bad_input("dimensions", f"must be >= 1, got {dimensions}")
    if size is None:
        return
    if dimensions > size:
        raise _bad_input("dimensions", f"{card.model_id} gives embeddings of {size} dimensions, got {dimensions}")
    if dimensions != size and not card.matryoshka:
        raise _bad_input("dimensions", f"{card.model_id} does not support fewer dimensions than its {size} "
                                       f"(only Matryoshka models do), got {dimensions}")


@dataclass
class Embeddings:
    """The vectors of a request's inputs, in order, and the tokens they took."""

    vectors: list[np.ndarray]
    prompt_tokens: int


async def embed_inputs(request: web.Request, state: APIState, card: ModelCard, inputs: Sequence[EmbeddingInput], *,
                       dimensions: int | None, truncate: bool, normalize: bool = True,
                       too_long_status: int = 413) -> Embeddings:
    """Tokenize each input and compute its embedding on the ring, the inputs concurrently (at most
    ``max_generations_per_request`` at once); then keep ``dimensions`` where asked.

    Raises:
        APIError: as ``_token_ids`` and ``_check_dimensions``; the mapped error of a failed ring
            request (``serving.api_error_from``).
    """
    require_text_model(card)
    size = card.args.hidden_size if card.args is not None else None
    _check_dimensions(card, dimensions, size)
    tokenizer = await get_tokenizer(state, card.model_id)
    card = state.node.cached_card(card.model_id) or card  # its context, once the header came
    ids = [await _token_ids(item, tokenizer, card.context_length, truncate, too_long_status) for item in inputs]
    limit = asyncio.Semaphore(max(1, request.app[RATE_CONFIG_KEY].max_generations_per_request))

    async def one(token_ids: list[int]) -> np.ndarray:
        async with limit:
            request_id = new_id("embd")
            state.active_requests.add(request_id)
            try:
                return await state.node.embed(card.model_id, token_ids, normalize=normalize, request_id=request_id)
            except Exception as e:
                raise api_error_from(e) from None
            finally:
                state.active_requests.discard(request_id)

    vectors = list(await asyncio.gather(*(one(i) for i in ids)))
    if dimensions is not None and vectors:
        _check_dimensions(card, dimensions, len(vectors[0]))
        if dimensions != len(vectors[0]):
            vectors = [truncate_dimensions(v, dimensions) for v in vectors]
    return Embeddings(vectors, sum(len(i) for i in ids))


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


# ---------------------------------------------------------------------------- handlers


async def openai_embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings`` (see the module docstring)."""
    state = request.app[STATE_KEY]
    req = parse_request(OpenAIEmbeddingRequest, await read_json(request))
    if req.encoding_format not in ENCODING_FORMATS:
        raise _bad_input("encoding_format", f"must be one of {list(ENCODING_FORMATS)}, got {req.encoding_format!r}")
    inputs = _openai_inputs(req.input)
    card = await resolve_model(state, req.model)
    result = await embed_inputs(request, state, card, inputs, dimensions=req.dimensions, truncate=False)
    return web.json_response({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
                 for i, v in enumerate(result.vectors)],
        "model": served_model(request, req.model or card.model_id, card),
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    })


def _missing_model() -> APIError:
    return APIError(400, "model is required", param="model", code="missing_required_parameter")


async def ollama_embed(request: web.Request) -> web.Response:
    """``POST /api/embed`` (see the module docstring)."""
    received = time.perf_counter()
    state = request.app[STATE_KEY]
    req = parse_request(OllamaEmbedRequest, await read_json(request))
    if not req.model:
        raise _missing_model()
    inputs = _ollama_inputs(req.input)
    card = await resolve_ollama_model(state, req.model)
    loaded = time.perf_counter()
    if not inputs:
        return web.json_response({"model": req.model, "embeddings": []})
    result = await embed_inputs(request, state, card, inputs, dimensions=req.dimensions, truncate=req.truncate,
                                too_long_status=400)
    return web.json_response({
        "model": req.model,
        "embeddings": [[float(x) for x in v] for v in result.vectors],
        "total_duration": int((time.perf_counter() - received) * 1e9),
        "load_duration": int((loaded - received) * 1e9),
        "prompt_eval_count": result.prompt_tokens,
    })


async def ollama_embeddings(request: web.Request) -> web.Response:
    """``POST /api/embeddings``, Ollama's older endpoint: one ``prompt``, its pooled vector not
    normalized (as Ollama's own; see the module docstring)."""
    state = request.app[STATE_KEY]
    req = parse_request(OllamaEmbeddingsRequest, await read_json(request))
    if not req.model:
        raise _missing_model()
    card = await resolve_ollama_model(state, req.model)
    if not req.prompt:
        return web.json_response({"embedding": []})
    result = await embed_inputs(request, state, card, [EmbeddingInput("prompt", text=req.prompt)], dimensions=None,
                                truncate=False, normalize=False, too_long_status=400)
    return web.json_response({"embedding": [float(x) for x in result.vectors[0]]})


def setup_routes(app: web.Application) -> None:
    """Register the embeddings routes (OpenAI's and Ollama's) on ``app``."""
    app.router.add_post("/v1/embeddings", openai_embeddings)
    app.router.add_post("/embeddings", openai_embeddings)
    app.router.add_post("/api/embed", ollama_embed)
    app.router.add_post("/api/embeddings", ollama_embeddings)
