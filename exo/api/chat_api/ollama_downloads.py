"""Ollama's model management on an exo node: ``POST /api/pull`` and ``DELETE /api/delete``
(https://github.com/ollama/ollama/blob/main/docs/api.md#pull-a-model).

``/api/pull`` downloads every file of a model to this node (``Node.pull``: the Hugging Face
cache; nothing to do for a local path or a model a package ships) and streams NDJSON lines as
Ollama does::

    {"status": "pulling manifest"}
    {"status": "pulling 8eeb52dfb3bb", "digest": "sha256:8eeb52dfb3bb...", "total": N, "completed": M}   (per file, as bytes arrive)
    {"status": "verifying sha256 digest"}
    {"status": "writing manifest"}
    {"status": "success"}

A file's digest is its sha256 when the hub gives one (LFS files), else the sha256 of its repo
and name. The progress comes from the node's download registry, polled every
``POLL_SECONDS`` (a line only when a file's bytes changed). An error after the stream began
is a last line ``{"error": "..."}``; with ``"stream": false`` the answer is one object, either
``{"status": "success"}`` or an error with its HTTP status (404 unknown model, 400 not a model
exo can run, 503 it cannot be downloaded now: the message says why). A pull goes on when its
client goes away (another pull of the same model joins it).

``/api/delete`` (``{"model": name}``) removes a downloaded model's files from this node and
unloads it: 200, 404 when the name is unknown or nothing of it is downloaded, 400 for a local
path or a model a package ships (exo never deletes a user's own files), 409 while it is being
downloaded or used.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any, Iterator

from aiohttp import web
from pydantic import BaseModel

from exo.api.chat_api.parsing import parse_request
from exo.api.chat_api.ollama_endpoints import NDJSON_HEADERS, _ndjson
from exo.api.chat_api.ollama_models import LENIENT, model_base_name
from exo.api.chat_api.json_body import read_json
from exo.api.chat_api.state import STATE_KEY
from exo.api.chat_api.utils import APIError
from exo.models.sources import ModelCard, canonical_name
from exo.orchestration.errors import (
    InvalidModelError, ModelBusyError, ModelNotFoundError, ModelUnavailableError, NodeStoppingError,
)

logger = logging.getLogger(__name__)

#: Seconds between two looks at the download's progress while streaming a pull.
POLL_SECONDS = 0.25


class OllamaPullRequest(BaseModel):
    """``POST /api/pull`` body (``name`` is the older spelling of ``model``; ``insecure`` is
    accepted and means nothing here)."""

    model_config = LENIENT
    model: str | None = None
    name: str | None = None
    stream: bool = True
    insecure: bool | None = None


class OllamaDeleteRequest(BaseModel):
    """``DELETE /api/delete`` body."""

    model_config = LENIENT
    model: str | None = None
    name: str | None = None


def _model_name(req: OllamaPullRequest | OllamaDeleteRequest) -> str:
    name = req.model or req.name
    if not name:
        raise APIError(400, "Missing required parameter: 'model'", param="model", code="missing_required_parameter")
    return name


def _node_error(e: Exception, name: str) -> APIError:
    """The HTTP error of a node's pull or delete failure (Ollama words a missing model its way)."""
    if isinstance(e, ModelNotFoundError):
        return APIError(404, f"model '{name}' not found ({e})", param="model", code="model_not_found")
    if isinstance(e, InvalidModelError):
        return APIError(400, str(e), param="model", code="invalid_model")
    if isinstance(e, ModelBusyError):
        return APIError(409, str(e), param="model", code="model_busy")
    if isinstance(e, (ModelUnavailableError, NodeStoppingError)):
        return APIError(503, str(e), param="model", code="model_not_available")
    logger.error("pull or delete of %s failed", name, exc_info=e)
    return APIError(500, f"internal server error: {type(e).__name__}: {e}", code="internal_error")


def _digest(entry: dict[str, Any], file: str, f: dict[str, Any]) -> str:
    sha = f.get("sha256") or hashlib.sha256(f"{entry.get('repo_id')}/{file}".encode()).hexdigest()
    return f"sha256:{sha}"


def progress_lines(entry: dict[str, Any] | None, sent: dict[str, tuple[int, int]]) -> Iterator[dict[str, Any]]:
    """Ollama's ``pulling <digest>`` lines for the files of progress ``entry`` whose bytes
    changed since ``sent`` (file -> (total, completed) last sent; updated)."""
    if entry is None:
        return
    for file, f in entry["files"].items():
        key = (int(f["bytes_total"]), int(f["bytes_done"]))
        if sent.get(file) == key:
            continue
        sent[file] = key
        digest = _digest(entry, file, f)
        yield {"status": f"pulling {digest[7:19]}", "digest": digest, "total": key[0], "completed": key[1]}


def _card_line(card: ModelCard) -> dict[str, Any]:
    """The one ``pulling`` line of a model with nothing to download (a local file, a package's)."""
    digest = "sha256:" + hashlib.sha256(f"{card.model_id}:{card.path}".encode()).hexdigest()
    size = int(card.size or 0)
    return {"status": f"pulling {digest[7:19]}", "digest": digest, "total": size, "completed": size}


async def pull(request: web.Request) -> web.StreamResponse:
    """``POST /api/pull``: download a model to this node, streaming its progress (see the module)."""
    state = request.app[STATE_KEY]
    req = parse_request(OllamaPullRequest, await read_json(request))
    name = _model_name(req)
    base = model_base_name(name)
    model_id = canonical_name(base)
    since = time.time()
    task = asyncio.ensure_future(state.node.pull(base))
    try:
        if not req.stream:
            try:
                await task
            except (ModelNotFoundError, InvalidModelError, ModelUnavailableError, NodeStoppingError) as e:
                raise _node_error(e, name) from None
            return web.json_response({"status": "success"})
        resp = web.StreamResponse(headers=NDJSON_HEADERS)
        await resp.prepare(request)
        try:
            await resp.write(_ndjson({"status": "pulling manifest"}))
            sent: dict[str, tuple[int, int]] = {}
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_SECONDS)
                entry = state.node.downloads().get(model_id)
                if entry is not None and (entry["state"] == "downloading" or entry["started_at"] >= since):
                    for line in progress_lines(entry, sent):  # an earlier download's entry is not this pull's
                        await resp.write(_ndjson(line))
                if done:
                    break
            error = NodeStoppingError("the download was cancelled: the node is shutting down") if task.cancelled() \
                else task.exception()
            if error is not None:
                message = _node_error(error, name).message if isinstance(error, Exception) else str(error)
                logger.warning("pull of %s failed: %s", name, message)
                await resp.write(_ndjson({"error": message}))
            else:
                if not sent:
                    await resp.write(_ndjson(_card_line(task.result())))
                for status in ("verifying sha256 digest", "writing manifest", "success"):
                    await resp.write(_ndjson({"status": status}))
            await resp.write_eof()
        except ConnectionResetError:
            logger.info("pull of %s: the client went away (the download goes on)", name)
        return resp
    finally:
        if not task.done():
            task.cancel()  # stops waiting; the node's download goes on


async def delete(request: web.Request) -> web.Response:
    """``DELETE /api/delete``: remove a downloaded model from this node (see the module)."""
    state = request.app[STATE_KEY]
    req = parse_request(OllamaDeleteRequest, await read_json(request))
    name = _model_name(req)
    try:
        await state.node.delete_model(model_base_name(name))
    except (ModelNotFoundError, InvalidModelError, ModelBusyError) as e:
        raise _node_error(e, name) from None
    return web.Response(status=200)


def setup_routes(app: web.Application) -> None:
    """Register ``/api/pull`` and ``/api/delete`` on ``app``."""
    app.router.add_post("/api/pull", pull)
    app.router.add_delete("/api/delete", delete)
