"""Ollama's model facts: ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``,
``GET /api/version`` (https://github.com/ollama/ollama/blob/main/docs/api.md).

Model names may carry Ollama's tag: ``smollm2-135m:latest`` is ``smollm2-135m``
(``model_base_name``, ``resolve_ollama_model``). ``model_facts`` reads what Ollama reports of a
model from its checkpoint's header (format, quantization, parameter count, GGUF metadata);
``model_details`` is Ollama's ``details`` object. Generation (``/api/chat``, ``/api/generate``)
is in ``ollama_endpoints``, ``/api/pull`` and ``/api/delete`` in ``ollama_downloads``.
Errors are ``{"error": "message"}`` with the HTTP status.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from exo.api.chat_api.json_body import read_json
from exo.api.chat_api.parsing import parse_request
from exo.api.serving.resolve import get_tokenizer, resolve_model
from exo.api.chat_api.state import STATE_KEY, APIState
from exo.api.chat_api.utils import APIError
from exo.models import catalogue
from exo.models.gguf import type_name
from exo.models.hub import parse_hub_name as hub_parse
from exo.models.sources import ModelCard
from exo.models.weights import TensorInfo, open_weights

logger = logging.getLogger(__name__)

DEFAULT_TAG = "latest"

LENIENT = ConfigDict(extra="ignore", strict=True)  # Ollama's server ignores fields it does not know


class OllamaShowRequest(BaseModel):
    """``POST /api/show`` body (``name`` is the older spelling of ``model``)."""

    model_config = LENIENT
    model: str | None = None
    name: str | None = None
    verbose: bool | None = None


# ---------------------------------------------------------------------------- names


def model_base_name(name: str) -> str:
    """``smollm2-135m:latest`` -> ``smollm2-135m`` (only the default tag is stripped)."""
    base, sep, tag = name.rpartition(":")
    return base if sep and tag == DEFAULT_TAG and base else name


async def resolve_ollama_model(state: APIState, name: str) -> ModelCard:
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


# ---------------------------------------------------------------------------- facts


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


# ---------------------------------------------------------------------------- handlers


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
    card = await resolve_ollama_model(state, name)
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
    """Register Ollama's model routes (``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``) on ``app``."""
    app.router.add_get("/api/tags", tags)
    app.router.add_post("/api/show", show)
    app.router.add_get("/api/ps", ps)
    app.router.add_get("/api/version", version)
