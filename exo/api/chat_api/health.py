"""``GET /health``: what a reverse proxy or an operator needs to know about this node.

200 with ``"status": "ok"`` while the node can serve its default model (a complete ring), 503
with ``"status": "unavailable"`` otherwise, so a load balancer's health check takes the node out
of rotation. The body always carries the details:

    {"status", "node_id", "model": {"id", "loaded", "layers": [start, end] | null},
     "peers": {"count", "ids"}, "ring": {"complete", "nodes": [{"node_id", "start_layer", "end_layer"}]},
     "auth_required"}

``ring.complete``: the partition of the default model covers layers 0..n-1 without gap or
overlap, and every node in it is this node or a connected peer. ``auth_required`` tells a web
page whether it must send an API key.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from exo.api.chat_api.state import STATE_KEY

logger = logging.getLogger(__name__)


def ring_status(node: Any, model_id: str) -> dict[str, Any]:
    """``{"complete": bool, "nodes": [...]}`` for ``model_id``'s ring as ``node`` sees it."""
    try:
        card = node.cached_card(model_id)
        if card is None:
            return {"complete": False, "nodes": [], "error": f"{model_id} is not resolved yet"}
        ring = node.partition(card)
    except Exception as e:  # no node can hold a layer, a node without partition()
        return {"complete": False, "nodes": [], "error": str(e)}
    nodes = [{"node_id": p.node_id, "start_layer": p.start_layer, "end_layer": p.end_layer} for p in ring]
    expected = 0
    contiguous = True
    for p in ring:
        if p.start_layer != expected or p.end_layer < p.start_layer:
            contiguous = False
            break
        expected = p.end_layer + 1
    contiguous = contiguous and expected == card.n_layers
    reachable = {node.id, *(getattr(node, "peers", None) or {})}
    return {"complete": bool(ring) and contiguous and all(p.node_id in reachable for p in ring), "nodes": nodes}


def health_report(node: Any, default_model: str, auth_required: bool) -> dict[str, Any]:
    """The body of ``GET /health``."""
    shard = getattr(getattr(node, "engine", None), "shard", None)
    peers = sorted(getattr(node, "peers", None) or {})
    ring = ring_status(node, default_model)
    return {
        "status": "ok" if ring["complete"] else "unavailable",
        "node_id": node.id,
        "model": {
            "id": default_model,
            "loaded": shard is not None and shard.model_id == default_model,
            "layers": [shard.start_layer, shard.end_layer] if shard is not None else None,
        },
        "peers": {"count": len(peers), "ids": peers},
        "ring": ring,
        "auth_required": auth_required,
    }


async def health(request: web.Request) -> web.Response:
    """``GET /health``: 200 when this node can serve its default model, else 503."""
    from exo.api.chat_api.auth import AUTH_CONFIG_KEY

    state = request.app[STATE_KEY]
    auth = request.app.get(AUTH_CONFIG_KEY)
    body = health_report(state.node, state.default_model, bool(auth and auth.enabled))
    return web.json_response(body, status=200 if body["status"] == "ok" else 503)


def setup(app: web.Application) -> None:
    """Serve ``GET /health`` on ``app``."""
    app.router.add_get("/health", health)
