"""``GET /v1/models``, ``GET /v1/models/{model_id}``, ``GET /v1/download/progress`` and
``GET /v1/topology``.

``/v1/models`` lists the catalogue and every other model this node has resolved (a local path
or a hub repo becomes known when a request, ``GET /v1/models/{id}``, ``/api/show`` or a pull
names it), each with its ``state`` on this node, ``download`` while its files come, and its
``kind``: "text", or "image" for the Stable Diffusion pipelines of the image endpoints."""

from __future__ import annotations

import logging

from aiohttp import web

from exo.api.chat_api.responses import DownloadInfo, ModelList, ModelObject
from exo.api.chat_api.state import STATE_KEY, APIState
from exo.api.chat_api.utils import download_entry, percent
from exo.models.sources import ModelCard

logger = logging.getLogger(__name__)


def model_object(card: ModelCard, created: int, state: str, download: dict | None = None) -> ModelObject:
    """OpenAI's model object for ``card`` (plus exo's layer count, context length, source, size,
    ``state`` and, while it is "downloading", how far its ``download`` (a progress entry) is)."""
    info = None
    if state == "downloading":
        done, total = (download["bytes_done"], download["bytes_total"]) if download else (0, 0)
        info = DownloadInfo(bytes_done=done, bytes_total=total, percent=percent(done, total) if total else 0.0)
    return ModelObject(id=card.model_id, created=created, name=card.name, n_layers=card.n_layers,
                       context_length=card.context_length, architecture=card.architecture, state=state,
                       source=card.source, size=card.size, download=info, kind=card.kind)


def _state(request: web.Request) -> APIState:
    return request.app[STATE_KEY]


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the models this cluster can serve, each with its ``state``."""
    state = _state(request)
    cards = sorted(state.node.available_models(), key=lambda c: c.model_id)
    downloads = state.node.downloads()
    data = [model_object(c, state.created, state.node.model_state(c.model_id), downloads.get(c.model_id)) for c in cards]
    return web.json_response(ModelList(data=data).model_dump(mode="json"))


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model_id}``: any model name a request may use (a hub repo's slash included).

    Raises:
        APIError: 404 "model_not_found", 400 "invalid_model" (see ``resolve_model``).
    """
    from exo.api.serving.resolve import resolve_model

    state = _state(request)
    card = await resolve_model(state, request.match_info["model_id"])
    obj = model_object(card, state.created, state.node.model_state(card.model_id),
                       state.node.downloads().get(card.model_id))
    return web.json_response(obj.model_dump(mode="json"))


async def download_progress(request: web.Request) -> web.Response:
    """``GET /v1/download/progress``: this node's downloads, in progress or done since it
    started: ``{"node_id", "downloads": {model id: {state, bytes_total, bytes_done, percent,
    speed, files, error, ...}}}`` (``utils.download_entry``)."""
    node = _state(request).node
    downloads = {model_id: download_entry(e) for model_id, e in sorted(node.downloads().items())}
    return web.json_response({"node_id": node.id, "downloads": downloads})


async def topology(request: web.Request) -> web.Response:
    """``GET /v1/topology``: nodes, edges and the current partition, as the node reports them."""
    return web.json_response(_state(request).node.topology_dict())


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_get("/v1/download/progress", download_progress)
    app.router.add_get("/v1/topology", topology)
