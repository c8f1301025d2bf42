"""Fallback models: a generation request for a model the cluster cannot serve now is answered
by the first of its configured fallbacks that can (``model.fallbacks`` in config.yaml, e.g.
``llama-3.1-70b: [llama-3.1-8b]``), as a multi-provider chat server falls back per provider.

Where it is decided: once, in ``serving.resolve_model``, which every generation handler
of every dialect calls before it tokenizes anything (OpenAI ``/v1/chat/completions`` and
``/v1/completions``, Ollama ``/api/chat`` and ``/api/generate``, Anthropic ``/v1/messages``).
``fallback_middleware`` marks those requests (the POST paths of
``rate_limit.GENERATION_PATHS``); ``resolve_model`` outside them (``/v1/models/{id}``,
``/api/show``, token counting, ``/health/{model}``) never falls back.

When: only before generation starts. A model that becomes unservable mid-answer is handled by
the node's failover (re-partition and replay) or fails; the answer never switches model.

"Can serve now" is ``health.model_health`` (no I/O, the same predicate as ``GET
/health/{model}``): the model's ring forms over the nodes present, every member is reachable,
their memory holds the model, and its download did not fail on this node in the last
``exo.orchestration.model_service.DOWNLOAD_RETRY_AFTER`` seconds (60). A model known unservable is
skipped without a download attempt; before a fallback (or a requested model with fallbacks) whose files are not on this
machine is chosen, its header is fetched once (``Node.get_tokenizer``), so a failing download
moves on to the next candidate. A requested model without fallbacks is never skipped for an
earlier download failure: it is tried again, as there is nothing else to answer with.

Order: the requested model's fallbacks as listed, then their own fallbacks (breadth first);
each model is considered once, so cycles (``a: [b]``, ``b: [a]``) end. The first that can serve
answers: its id is the response's ``model`` (every dialect), and the response carries
``X-Exo-Fallback: <requested model id>`` (streams included). An unknown (404) or invalid (400)
requested model is never replaced. When nothing can serve, the answer is 503
``model_not_available`` naming what is missing for the model and for each fallback tried.
"""

from __future__ import annotations

import contextvars
import logging
from collections import deque
from typing import Any, Awaitable, Callable

from aiohttp import web

from exo.api.chat_api.health import model_health
from exo.api.chat_api.rate_limit import GENERATION_PATHS
from exo.api.chat_api.utils import APIError
from exo.models.sources import ModelCard, canonical_name
from exo.orchestration.errors import InvalidModelError, ModelNotFoundError, ModelUnavailableError

logger = logging.getLogger(__name__)

FALLBACK_HEADER = "X-Exo-Fallback"
# request item: the id of the model the request asked for, when a fallback answers it
FALLBACK_FROM = web.RequestKey("exo_fallback_from", str) if hasattr(web, "RequestKey") else "exo_fallback_from"

# the generation request being handled in this task (set by fallback_middleware), if any
_GENERATION_REQUEST: contextvars.ContextVar[web.Request | None] = contextvars.ContextVar(
    "exo_generation_request", default=None)


def current_generation_request() -> web.Request | None:
    """The generation request whose handler is running in this task, or None elsewhere."""
    return _GENERATION_REQUEST.get()


def fallback_from(request: web.Request) -> str | None:
    """The id of the model ``request`` asked for when a fallback answers it, else None."""
    return request.get(FALLBACK_FROM)


def served_model(request: web.Request, requested: str, card: ModelCard) -> str:
    """The ``model`` a response names: ``requested`` as the client spelt it, or the fallback's
    id (``card.model_id``) when a fallback answers."""
    return card.model_id if fallback_from(request) is not None else requested


def configured_fallbacks(fallbacks: dict[str, list[str]], model_id: str) -> list[str]:
    """The fallbacks configured for ``model_id`` (keys compared by their canonical name)."""
    want = canonical_name(model_id)
    for key, chain in fallbacks.items():
        if key == model_id or canonical_name(key) == want:
            return list(chain)
    return []


def candidates(fallbacks: dict[str, list[str]], model_id: str) -> list[str]:
    """Every fallback of ``model_id`` in the order they are tried: its own, then theirs (breadth
    first), each once and never ``model_id`` itself (so cycles end)."""
    seen = {canonical_name(model_id)}
    out: list[str] = []
    queue = deque(configured_fallbacks(fallbacks, model_id))
    while queue:
        name = queue.popleft()
        if canonical_name(name) in seen:
            continue
        seen.add(canonical_name(name))
        out.append(name)
        queue.extend(configured_fallbacks(fallbacks, name))
    return out


async def unservable_reason(node: Any, card: ModelCard, fetch_header: bool) -> str | None:
    """Why the cluster cannot serve ``card``'s model now, or None when it can
    (``health.model_health``). With ``fetch_header`` and the model's files not on this machine,
    its header is downloaded first (once: it is kept), so a download that fails counts."""
    if fetch_header and card.path is None and node.download_failure(card.model_id) is None:
        try:
            await node.get_tokenizer(card.model_id)
        except ModelUnavailableError as e:
            return f"its download failed: {e}"
        except (ModelNotFoundError, InvalidModelError, FileNotFoundError) as e:
            return str(e)
    verdict = model_health(node, card.model_id)
    return verdict["reason"] if not verdict["servable"] else None


async def serving_card(state: Any, model_id: str, resolve: Callable[[str], Awaitable[ModelCard]]) -> ModelCard:
    """The card of the model that answers a request for ``model_id``: its own, or the first of
    its fallbacks that can serve now (``request[FALLBACK_FROM]`` then names ``model_id``).
    Outside a generation request: ``resolve(model_id)``, nothing more.

    Args:
        state: the ``APIState`` (its ``node`` and ``fallbacks``).
        model_id: the model the request names.
        resolve: a name -> its card, raising ``APIError`` (404, 400, 503) as ``resolve_model``.

    Raises:
        APIError: 404 / 400 of the requested model as ``resolve``; 503 "model_not_available"
            when neither it nor a fallback can serve, naming what is missing for each.
    """
    request = current_generation_request()
    if request is None:
        return await resolve(model_id)
    node, fallbacks = state.node, state.fallbacks
    try:
        card = await resolve(model_id)
    except APIError as e:
        if e.status != 503 or not candidates(fallbacks, model_id):
            raise
        requested_id, reason = canonical_name(model_id), e.message
    else:
        requested_id = card.model_id
        if candidates(fallbacks, requested_id) or candidates(fallbacks, model_id):
            reason = await unservable_reason(node, card, fetch_header=True)
        else:  # nothing else to answer with: an earlier failed download is tried again
            reason = model_health(node, card.model_id, downloads=False)["reason"]
        if reason is None:
            return card
    chain = candidates(fallbacks, requested_id) or candidates(fallbacks, model_id)
    if not chain:
        raise APIError(503, f"the model `{requested_id}` cannot be served now: {reason}", param="model",
                       code="model_not_available")
    tried = []
    for name in chain:
        try:
            fb = await resolve(name)
        except APIError as e:
            tried.append(f"`{name}`: {e.message}")
            continue
        why = await unservable_reason(node, fb, fetch_header=True)
        if why is None:
            request[FALLBACK_FROM] = requested_id
            logger.info("%s %s: %s cannot be served (%s); answered by the fallback %s",
                        request.method, request.path, requested_id, reason, fb.model_id)
            return fb
        tried.append(f"`{fb.model_id}`: {why}")
    raise APIError(503, f"the model `{requested_id}` cannot be served now: {reason}; nor can its fallbacks: "
                        f"{'; '.join(tried)}", param="model", code="model_not_available")


@web.middleware
async def fallback_middleware(request: web.Request, handler):
    """Mark a generation request (POST to a path of ``GENERATION_PATHS``) for
    ``serving_card`` while its handler runs."""
    if request.method != "POST" or request.path not in GENERATION_PATHS:
        return await handler(request)
    token = _GENERATION_REQUEST.set(request)
    try:
        return await handler(request)
    finally:
        _GENERATION_REQUEST.reset(token)


async def _add_header(request: web.Request, response: web.StreamResponse) -> None:
    requested = fallback_from(request)
    if requested is not None:
        response.headers[FALLBACK_HEADER] = requested


def setup(app: web.Application) -> None:
    """Install the middleware and the ``X-Exo-Fallback`` response header on ``app``."""
    app.middlewares.append(fallback_middleware)
    app.on_response_prepare.append(_add_header)
