"""The steps every dialect's generation handler takes, whatever its wire format.

OpenAI (``route_handlers``), Ollama (``ollama_endpoints``) and Anthropic
(``anthropic_endpoints``) requests all go through these: ``resolve_model`` (a name to a
``ModelCard``, fallback decided there), ``get_tokenizer``, ``model_defaults`` (the sampling
defaults of a model), ``encode_prompt`` (the prompt's token ids, off the event loop),
``check_token_ids`` (ids a request gives against the vocabulary), ``resolve_max_tokens`` (the cap
against the context) and ``api_error_from`` (an exception
raised while generating as the client-facing ``APIError``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Callable, Sequence

from exo.api.chat_api.fallback import serving_card
from exo.api.chat_api.models import GenerationDefaults
from exo.api.chat_api.state import APIState
from exo.api.chat_api.utils import APIError
from exo.inference.tokenizers import Tokenizer
from exo.models.sources import ModelCard
from exo.orchestration.errors import (
    GenerationError, GenerationTimeoutError, InvalidModelError, ModelNotFoundError, ModelUnavailableError,
    NoNodeAvailableError,
)

logger = logging.getLogger(__name__)


async def resolve_model(state: APIState, requested: str | None) -> ModelCard:
    """The card of the requested model (the default when None): a catalogue id or alias, a
    local GGUF file or Hugging Face directory, or a Hugging Face repo.

    In a generation request (every dialect's), this is where fallback is decided
    (``fallback.serving_card``): a model the cluster cannot serve now is replaced by the first
    of its configured fallbacks that can, and the request is marked so that the response names
    the fallback in ``model`` and the requested model in ``X-Exo-Fallback``.

    Raises:
        APIError: 404 "model_not_found" for a name that is none of those, or a path with
            nothing there (never a silent fallback to another model); 400 "invalid_model" for
            a file or repo that is not a model exo can run (the message says why); 503
            "model_not_available" when neither the model nor a fallback can serve a generation
            now (the message names what is missing).
    """
    model_id = requested if requested is not None else state.default_model
    return await serving_card(state, model_id, functools.partial(_model_card, state))


def require_text_model(card: ModelCard) -> None:
    """Refuse an image model in a text request (chat, completions, messages, embeddings).

    Raises:
        APIError: 400 "invalid_model" naming ``model`` (each dialect words it its own way).
    """
    if card.kind != "text":
        raise APIError(400, f"The model `{card.model_id}` is an image model: it does not generate text. Image "
                            f"generation is offered by POST /v1/images/generations (OpenAI's API) only", param="model",
                       code="invalid_model")


async def _model_card(state: APIState, model_id: str) -> ModelCard:
    """``state.node.model_card`` with its errors as ``APIError`` (see ``resolve_model``)."""
    try:
        return await state.node.model_card(model_id)
    except ModelNotFoundError as e:
        raise APIError(404, f"The model `{model_id}` does not exist or is not available on this cluster: {e}",
                       param="model", code="model_not_found") from None
    except InvalidModelError as e:
        raise APIError(400, f"The model `{model_id}` cannot be served: {e}", param="model", code="invalid_model") from None
    except ModelUnavailableError as e:
        raise APIError(503, f"no node can serve the model `{model_id}` now: {e}", param="model",
                       code="model_not_available") from None


async def get_tokenizer(state: APIState, model_id: str) -> Tokenizer:
    """The model's tokenizer from the node.

    Raises:
        APIError: 404 unknown model, 503 weights not installed.
    """
    try:
        return await state.node.get_tokenizer(model_id)
    except ModelNotFoundError as e:
        raise APIError(404, str(e), param="model", code="model_not_found") from None
    except InvalidModelError as e:
        raise APIError(400, str(e), param="model", code="invalid_model") from None
    except (ModelUnavailableError, FileNotFoundError) as e:
        raise APIError(503, str(e), code="model_not_available") from None


def model_defaults(state: APIState, tokenizer: Tokenizer) -> GenerationDefaults:
    """The defaults of a request's sampling options for this model: what the server's
    configuration sets explicitly, then the model's own ``generation_config.json``
    (``Tokenizer.generation_defaults``: temperature, top_p, top_k), then OpenAI's defaults."""
    model = {k: v for k, v in (getattr(tokenizer, "generation_defaults", None) or {}).items()
             if k in ("temperature", "top_p", "top_k") and v is not None}
    configured = {k: getattr(state.defaults, k) for k in state.defaults.model_fields_set}
    if not model:
        return state.defaults
    return GenerationDefaults(**{**model, **configured})


async def encode_prompt(tokenizer: Tokenizer, render: Callable[[], str], context_length: int, param: str) -> list[int]:
    """The token ids of the prompt that ``render`` builds (a chat template's rendering, or the
    request's own text), computed in a worker thread: the event loop keeps serving every other
    request meanwhile, however long the text. A text longer than ``context_length`` tokens could
    hold (``Tokenizer.max_token_chars`` characters each) is refused before it is tokenized.

    Args:
        render: () -> the prompt text; runs in the worker thread. A ValueError from it (a
            template that rejects the conversation) is a 400 naming ``param``.
        context_length: the model's context, in tokens.
        param: the request parameter holding the prompt (``messages``, ``prompt``).

    Raises:
        APIError: 413 "context_length_exceeded" for a text that cannot fit; 400 from ``render``.
    """
    def run() -> list[int]:
        try:
            text = render()
        except ValueError as e:
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        most = context_length * tokenizer.max_token_chars
        if len(text) > most:
            raise APIError(413, f"This model's maximum context length is {context_length} tokens, but the prompt has "
                                f"{len(text)} characters: more than {context_length} tokens of this model hold (at most "
                                f"{tokenizer.max_token_chars} characters each).", param=param,
                           code="context_length_exceeded")
        return tokenizer.encode(text) if text else []

    return await asyncio.to_thread(run)


def check_token_ids(tokenizer: Tokenizer, ids: Sequence[int], param: str) -> None:
    """Refuse token ids the model's vocabulary does not have.

    Raises:
        APIError: 400 naming ``param`` and the first id outside ``[0, vocab_size)``.
    """
    bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"Invalid value for '{param}': token id {bad} is outside the vocabulary "
                            f"(0-{tokenizer.vocab_size - 1})", param=param, code="invalid_value")


def resolve_max_tokens(requested: int | None, server_default: int | None, prompt_tokens: int,
                       context_length: int, prompt_param: str) -> int:
    """Tokens to generate at most: request value > server default > the rest of the context,
    clamped to the room the context leaves after the prompt.

    Raises:
        APIError: 413 "context_length_exceeded" when the prompt leaves no room.
    """
    room = context_length - prompt_tokens
    if room < 1:
        raise APIError(413, f"This model's maximum context length is {context_length} tokens, but the prompt has "
                            f"{prompt_tokens} tokens.", param=prompt_param, code="context_length_exceeded")
    wanted = requested if requested is not None else server_default if server_default is not None else room
    return min(wanted, room)


def api_error_from(e: BaseException) -> APIError:
    """The client-facing error of an exception raised while generating."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ModelNotFoundError):
        return APIError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, ModelUnavailableError):
        return APIError(503, str(e), code="model_not_available")
    if isinstance(e, NoNodeAvailableError):
        return APIError(503, f"no node can serve this request: {e}", code="no_node_available")
    if isinstance(e, GenerationTimeoutError):
        return APIError(504, f"the cluster did not answer in time: {e}", code="timeout")
    if isinstance(e, GenerationError):
        return APIError(500, f"generation failed: {e}", code="generation_error")
    if isinstance(e, asyncio.TimeoutError):
        return APIError(504, "the cluster did not answer in time", code="timeout")
    if isinstance(e, ValueError):
        return APIError(400, str(e), code="invalid_value")
    logger.error("request failed", exc_info=e)
    return APIError(500, f"internal server error: {type(e).__name__}: {e}", code="internal_error")
