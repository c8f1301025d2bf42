"""Pieces the framework engines share: input checks, the per-request KV cache map, and an
engine base class over a sharded model built from a ``ModelArgs`` (``exo.models.architectures``).

Framework-free (numpy only), so an engine module imports its own ML package and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Generic, Protocol, TypeVar

import numpy as np

from exo.inference.inference_engine import WIRE_HIDDEN_DTYPE, InferenceEngine
from exo.inference.shard import Shard
from exo.models.architectures import ModelArgs, UnsupportedModelError

logger = logging.getLogger(__name__)


class _HasOffset(Protocol):
    offset: int


C = TypeVar("C", bound=_HasOffset)


def validate_input(shard: Shard, x: np.ndarray, hidden_size: int, vocab_size: int) -> None:
    """Check ``x`` against the ``InferenceEngine`` contract for ``shard``.

    Raises:
        ValueError: token ids not of shape (1, T), integer, in ``[0, vocab_size)`` on the first
            shard; hidden states not of shape (1, T, hidden_size) and floating elsewhere.
    """
    if shard.is_first_layer:
        if x.ndim != 2 or x.shape[0] != 1 or x.shape[1] < 1 or not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"the first shard takes token ids of shape (1, T) and an integer dtype, got {x.shape} {x.dtype}")
        if x.min() < 0 or x.max() >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}), got range [{x.min()}, {x.max()}]")
    elif x.ndim != 3 or x.shape[0] != 1 or x.shape[1] < 1 or x.shape[2] != hidden_size or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"shard {shard.start_layer}-{shard.end_layer} takes hidden states of shape (1, T, {hidden_size}) "
                         f"and a float dtype, got {x.shape} {x.dtype}")


class RequestCaches(Generic[C]):
    """The KV caches of the requests an engine serves, keyed by request id.

    Bounds: at most ``max_requests`` caches (the least recently used is evicted beyond it) and
    none idle longer than ``ttl`` seconds. Steps run on the engine's worker thread while the
    event loop reads ``ids()`` and calls ``pop()``: a lock guards the map.
    """

    def __init__(self, max_requests: int = 64, ttl: float = 600.0):
        self.max_requests, self.ttl = max_requests, ttl
        self._caches: OrderedDict[str, C] = OrderedDict()
        self._last_used: dict[str, float] = {}
        self._lock = threading.Lock()

    def for_step(self, request_id: str, position: int, n_tokens: int, max_seq_len: int, new_cache: Callable[[], C]) -> C:
        """The cache a step of ``n_tokens`` at ``position`` runs on (a fresh one at position 0).

        Raises:
            KeyError: ``position > 0`` and the request has no cache here.
            ValueError: ``position`` differs from the cache's length, or the request would
                exceed ``max_seq_len`` tokens.
        """
        self.evict_idle()
        with self._lock:
            return self._for_step(request_id, position, n_tokens, max_seq_len, new_cache)

    def _for_step(self, request_id: str, position: int, n_tokens: int, max_seq_len: int, new_cache: Callable[[], C]) -> C:
        cache = self._caches.get(request_id)
        if position + n_tokens > max_seq_len:
            raise ValueError(f"request {request_id}: {position + n_tokens} tokens exceed the context of {max_seq_len}")
        if position == 0:
            self._caches.pop(request_id, None)
            cache = new_cache()
        elif cache is None:
            raise KeyError(f"request {request_id} has no KV cache on this node (position {position})")
        elif cache.offset != position:
            raise ValueError(f"request {request_id}: position {position} but the KV cache holds {cache.offset} tokens")
        self._caches[request_id] = cache
        self._caches.move_to_end(request_id)
        self._last_used[request_id] = time.monotonic()
        while len(self._caches) > self.max_requests:
            evicted, _ = self._caches.popitem(last=False)
            self._last_used.pop(evicted, None)
            logger.warning("evicting the KV cache of request %s (more than %d requests)", evicted, self.max_requests)
        return cache

    def evict_idle(self) -> None:
        """Free the caches idle for more than ``ttl`` seconds."""
        now = time.monotonic()
        with self._lock:
            idle = [r for r, t in self._last_used.items() if now - t > self.ttl]
        for rid in idle:
            logger.info("freeing the idle KV cache of request %s", rid)
            self.pop(rid)

    def pop(self, request_id: str) -> None:
        with self._lock:
            self._caches.pop(request_id, None)
            self._last_used.pop(request_id, None)

    def clear(self) -> None:
        with self._lock:
            self._caches.clear()
            self._last_used.clear()

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._caches)


class ShardedModel(Protocol):
    """What ``ShardedModelEngine`` needs of a framework's sharded model."""

    args: ModelArgs
    shard: Shard

    def new_cache(self) -> Any: ...

    def __call__(self, x: np.ndarray, cache: Any, final_hidden: bool = False) -> np.ndarray: ...

    def load_tensors(self, tensors: dict[str, np.ndarray]) -> None: ...

    def weight_bytes(self) -> int: ...


class ShardedModelEngine(InferenceEngine):
    """An ``InferenceEngine`` over a framework's sharded model: loading any checkpoint
    ``exo.models.sources.open_model`` opens (its ``ModelArgs`` and the shard's canonical
    tensors), refusing the variants the engine does not implement, input checks, one KV cache
    per request (``RequestCaches``), all framework calls on ``executor``'s thread.

    Subclasses set ``name``, ``executor`` (one worker thread, shared by the engines of the
    class: ML frameworks keep global state) and ``supported_architectures`` (from
    ``ENGINE_SUPPORT``, which ``unsupported_reason`` reads: peers judge an engine by its name),
    and implement ``_build_model``.

    Args:
        max_requests: most requests holding a KV cache at once; the least recently used is
            evicted beyond it.
        request_ttl: seconds after which an idle request's KV cache is freed.
    """

    executor: ThreadPoolExecutor
    supported_architectures: frozenset[str] = frozenset()

    def __init__(self, max_requests: int = 64, request_ttl: float = 600.0):
        self._model: ShardedModel | None = None
        self._shard: Shard | None = None
        self._requests: RequestCaches = RequestCaches(max_requests, request_ttl)
        self._load_lock = asyncio.Lock()

    def _build_model(self, args: ModelArgs, shard: Shard) -> ShardedModel:
        """An empty model of ``shard`` (runs on the executor thread)."""
        raise NotImplementedError

    def _after_load(self, model: ShardedModel) -> None:
        """Hook run on the executor thread once the weights are in (e.g. compile graphs)."""

    def _describe(self) -> str:
        return self.name

    @property
    def shard(self) -> Shard | None:
        return self._shard

    async def ensure_shard(self, shard: Shard) -> None:
        """Load ``shard`` (see ``InferenceEngine.ensure_shard``).

        Raises:
            UnsupportedModelError: the model is of an architecture or variant this engine does
                not implement (``unsupported_reason``), or exo reads no such checkpoint.
            ValueError: ``shard.n_layers`` differs from the model's.
            exo.models.sources.ModelNotFound, FileNotFoundError: no such model here.
        """
        async with self._load_lock:
            if self._shard == shard:
                return
            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(self.executor, self._load, shard)
            self._model, self._shard = model, shard
            self._requests.clear()

    def _load(self, shard: Shard) -> ShardedModel:
        from exo.models.sources import open_model

        t0 = time.perf_counter()
        weights = open_model(shard.model_id)
        args = weights.args
        reason = self.unsupported_reason(args)
        if reason is not None:
            raise UnsupportedModelError(f"{shard.model_id}: {reason}")
        if args.n_layers != shard.n_layers:
            raise ValueError(f"shard says {shard.n_layers} layers but {shard.model_id} has {args.n_layers}")
        self._model = None  # drop the previous shard's weights before loading the next
        self._requests.clear()
        model = self._build_model(args, shard)
        tensors = weights.load_shard(shard.start_layer, shard.end_layer)
        model.load_tensors(tensors)
        del tensors
        t1 = time.perf_counter()
        self._after_load(model)
        logger.info("loaded %s (%s) layers %d-%d on %s in %.1f s (+%.1f s warming up), %.1f MiB of weights",
                    shard.model_id, args.architecture, shard.start_layer, shard.end_layer, self._describe(),
                    t1 - t0, time.perf_counter() - t1, model.weight_bytes() / 2**20)
        return model

    def weight_bytes(self) -> int:
        return self._model.weight_bytes() if self._model is not None else 0

    async def infer_tensor(self, request_id: str, shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
        if self._shard != shard:
            await self.ensure_shard(shard)
        model = self._model
        validate_input(shard, x, model.args.hidden_size, model.args.vocab_size)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._infer, model, request_id, x, position)

    async def infer_final_hidden(self, request_id: str, shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
        """``InferenceEngine.infer_final_hidden``: the last shard returns the final-normed hidden
        states (1, T, hidden) float32 (the model's ``final_hidden``)."""
        if self._shard != shard:
            await self.ensure_shard(shard)
        model = self._model
        validate_input(shard, x, model.args.hidden_size, model.args.vocab_size)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._infer, model, request_id, x, position, True)

    def _infer(self, model: ShardedModel, request_id: str, x: np.ndarray, position: int,
               final_hidden: bool = False) -> np.ndarray:
        cache = self._requests.for_step(request_id, position, x.shape[1], model.args.max_seq_len, model.new_cache)
        out = model(x, cache, final_hidden) if final_hidden else model(x, cache)
        return np.asarray(out, dtype=np.float32 if model.shard.is_last_layer else WIRE_HIDDEN_DTYPE)

    async def clear_request(self, request_id: str) -> None:
        self._requests.pop(request_id)

    def cached_request_ids(self) -> set[str]:
        return self._requests.ids()

    async def close(self) -> None:
        """Drop the model and every KV cache (the shared worker thread stays for other engines)."""
        self._requests.clear()
        self._model = None
