"""``GET /health``: what a reverse proxy or an operator needs to know about this node.

200 with ``"status": "ok"`` while the node can serve its default model (``model_health``: a
complete ring, no failed download), 503 with ``"status": "unavailable"`` and the ``reason``
otherwise, so a load balancer's health check takes the node out
of rotation. The body always carries the details:

    {"status", "reason", "node_id", "model": {"id", "loaded", "layers": [start, end] | null},
     "peers": {"count", "ids"}, "ring": {"complete", "nodes": [{"node_id", "start_layer", "end_layer"}]},
     "auth_required"}

``ring.complete``: the partition of the default model covers layers 0..n-1 without gap or
overlap, every node in it is this node or a connected peer, and the memory of its nodes holds
the model; ``ring.reason`` says what is missing when it is not complete. ``auth_required`` tells
a web page whether it must send an API key.

``GET /health/{model}``: whether that model can be served now (``model_health``), 200 or 503:

    {"status": "ok" | "unavailable", "model", "servable", "reason", "ring", "fallbacks"}

``reason`` (null when servable) names what is missing: the nodes of its ring that are gone, the
memory (layers, bytes) the nodes present lack, or its failed download. ``fallbacks``: the
configured fallbacks of the model (see ``fallback``). The same predicate decides whether a
generation request for the model is answered by a fallback, so the two never disagree.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from exo.api.chat_api.state import STATE_KEY

logger = logging.getLogger(__name__)


def ring_status(node: Any, model_id: str) -> dict[str, Any]:
    """``{"complete": bool, "nodes": [...], "reason": str | None}`` for ``model_id``'s ring as
    ``node`` sees it now (no I/O: a model whose card ``node`` has not resolved is incomplete).

    ``reason`` (None when complete) names what is missing: no ring (why no node can hold a
    layer), members that are not reachable, layers no member holds, or the memory the members
    lack (``PartitionPlan.shortfall``). ``error`` repeats a failure to partition at all.
    """
    try:
        card = node.cached_card(model_id)
        if card is None:
            why = f"{model_id} is not resolved yet"
            return {"complete": False, "nodes": [], "error": why, "reason": why}
        plan = node.partition_plan(card) if hasattr(node, "partition_plan") else None
        ring = plan.ring if plan is not None else node.partition(card)
    except Exception as e:  # no node can hold a layer, a node without partition()
        return {"complete": False, "nodes": [], "error": str(e), "reason": f"no ring can form: {e}"}
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
    unreachable = sorted(p.node_id for p in ring if p.node_id not in reachable)
    shortfall = getattr(plan, "shortfall", None)
    reason = None
    if not ring:
        reason = "its ring is empty"
    elif unreachable:
        reason = f"node(s) {', '.join(unreachable)} of its ring are not reachable"
    elif not contiguous:
        reason = f"its ring does not hold every layer of {card.n_layers} once: {nodes}"
    elif shortfall:
        reason = f"it does not fit in the memory of the nodes present: {shortfall}"
    return {"complete": reason is None, "nodes": nodes, "reason": reason}


def model_health(node: Any, model_id: str, downloads: bool = True) -> dict[str, Any]:
    """Whether ``node``'s cluster can serve ``model_id`` now, without I/O:
    ``{"model", "servable": bool, "reason": str | None, "ring": ring_status(...)}``.

    Not servable when its ring is not complete (``ring_status``) or, with ``downloads``, its
    download failed on this node less than ``DOWNLOAD_RETRY_AFTER`` seconds ago
    (``Node.download_failure``). ``reason`` says so, and names the peers that left recently
    (``Node.lost_peers``), if any.
    """
    ring = ring_status(node, model_id)
    failure = node.download_failure(model_id) if downloads and hasattr(node, "download_failure") else None
    reason = f"its download failed: {failure}" if failure else ring["reason"]
    lost = node.lost_peers() if hasattr(node, "lost_peers") else []
    if reason and lost:
        reason += f" (node(s) {', '.join(lost)} left the cluster recently)"
    return {"model": model_id, "servable": reason is None, "reason": reason, "ring": ring}


def health_report(node: Any, default_model: str, auth_required: bool) -> dict[str, Any]:
    """The body of ``GET /health``."""
    shard = getattr(getattr(node, "engine", None), "shard", None)
    peers = sorted(getattr(node, "peers", None) or {})
    verdict = model_health(node, default_model)
    ring = verdict["ring"]
    return {
        "status": "ok" if verdict["servable"] else "unavailable",
        "reason": verdict["reason"],
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


async def health_of_model(request: web.Request) -> web.Response:
    """``GET /health/{model}``: 200 when the cluster can serve that model now, else 503, with
    why (see the module's docstring). The model's name may contain "/" (a hub repo).

    Errors: 404 for a name that is no model (as ``resolve_model``), 400 for a file exo cannot
    run; a model whose header cannot be downloaded is 503 with the reason.
    """
    from exo.api.chat_api.fallback import configured_fallbacks
    from exo.api.serving.resolve import resolve_model
    from exo.api.chat_api.utils import APIError

    state = request.app[STATE_KEY]
    name = request.match_info["model"]
    try:
        card = await resolve_model(state, name)
    except APIError as e:
        if e.status != 503:
            raise
        body = {"model": name, "servable": False, "reason": e.message, "ring": None}
    else:
        body = model_health(state.node, card.model_id)
    body = {"status": "ok" if body["servable"] else "unavailable", **body,
            "fallbacks": configured_fallbacks(state.fallbacks, body["model"])}
    return web.json_response(body, status=200 if body["servable"] else 503)


def setup(app: web.Application) -> None:
    """Serve ``GET /health`` and ``GET /health/{model}`` on ``app``."""
    app.router.add_get("/health", health)
    app.router.add_get("/health/{model:.+}", health_of_model)
