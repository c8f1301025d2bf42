"""``GET /v1/models``, ``GET /v1/models/{model_id}`` and ``GET /v1/topology``."""

from __future__ import annotations

import logging

from aiohttp import web

from exo.api.chat_api.models import ModelList, ModelObject
from exo.api.chat_api.state import STATE_KEY, APIState
from exo.api.chat_api.utils import APIError
from exo.models.sources import ModelCard

logger = logging.getLogger(__name__)


def model_object(card: ModelCard, created: int, state: str) -> ModelObject:
    """OpenAI's model object for ``card`` (plus exo's layer count, context length and ``state``:
    "ready", "loading" or "available")."""
    return ModelObject(id=card.model_id, created=created, name=card.name, n_layers=card.n_layers,
                       context_length=card.context_length, architecture=card.architecture, state=state)


def _state(request: web.Request) -> APIState:
    return request.app[STATE_KEY]


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the models this cluster can serve, each with its ``state``."""
    state = _state(request)
    cards = sorted(state.node.available_models(), key=lambda c: c.model_id)
    data = [model_object(c, state.created, state.node.model_state(c.model_id)) for c in cards]
    return web.json_response(ModelList(data=data).model_dump(mode="json"))


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model_id}``: any model name a request may use (a hub repo's slash included).

    Raises:
        APIError: 404 "model_not_found", 400 "invalid_model" (see ``resolve_model``).
    """
    from exo.api.chat_api.route_handlers import resolve_model

    state = _state(request)
    card = await resolve_model(state, request.match_info["model_id"])
    obj = model_object(card, state.created, state.node.model_state(card.model_id))
    return web.json_response(obj.model_dump(mode="json"))


async def topology(request: web.Request) -> web.Response:
    """``GET /v1/topology``: nodes, edges and the current partition, as the node reports them."""
    return web.json_response(_state(request).node.topology_dict())


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_get("/v1/topology", topology)
