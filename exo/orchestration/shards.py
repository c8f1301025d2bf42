"""The shards one node holds: an engine per model, kept in an LRU cache with an idle TTL.

A node serves several models at once; each model's shard lives in its own engine (each with its
KV caches and, for the torch engine, its worker thread). The cache is bounded by a count
(``max_models``, default 3), by an idle time (``idle_ttl`` seconds, default 300, as Ollama's
``keep_alive``) and by the node's memory for weights: a new shard evicts the least recently used
idle ones until it fits. A model in use (a request holds a KV cache on its engine, or a step
is running) is never evicted, even when that leaves the cache over its bounds for a while; a
pinned model (the node's default) is not evicted for idleness, and for room only after every
other idle model.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable, Collection, Sequence

from exo.config import DEFAULT_IDLE_TTL, DEFAULT_MAX_MODELS  # noqa: F401  (re-exported)
from exo.inference.inference_engine import InferenceEngine
from exo.inference.shard import Shard

logger = logging.getLogger(__name__)



class ShardCache:
    """Engines by model id, least recently used first.

    Args:
        engine: the node's first engine (used for the first model; reused after an eviction).
        create_engine: makes another engine for a further model held at once; None: the node
            holds one model at a time (its engine swaps shards).
        max_models: most models held at once.
        idle_ttl: seconds after which an idle model is dropped (pinned ones excepted).
        memory: bytes for weights (0: no bound beyond ``max_models``).
    """

    def __init__(self, engine: InferenceEngine, create_engine: Callable[[], InferenceEngine] | None = None,
                 max_models: int = DEFAULT_MAX_MODELS, idle_ttl: float = DEFAULT_IDLE_TTL, memory: int = 0):
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        if idle_ttl <= 0:
            raise ValueError(f"idle_ttl must be > 0 seconds, got {idle_ttl}")
        self.create_engine, self.max_models, self.idle_ttl, self.memory = create_engine, max_models, idle_ttl, memory
        self._engines: OrderedDict[str, InferenceEngine] = OrderedDict()
        self._last_used: dict[str, float] = {}
        self._active: dict[str, int] = {}  # model id -> steps running now
        self._spare: list[InferenceEngine] = [engine]
        self.first_engine = engine

    # ---------------------------------------------------------------- lookups

    def get(self, model_id: str) -> InferenceEngine | None:
        """The engine holding (or loading) ``model_id``, if any."""
        return self._engines.get(model_id)

    def items(self) -> list[tuple[str, InferenceEngine]]:
        return list(self._engines.items())

    def shards(self) -> dict[str, Shard]:
        """The shard each held model's engine has loaded."""
        return {m: e.shard for m, e in self._engines.items() if e.shard is not None}

    def engines(self) -> list[InferenceEngine]:
        """Every engine, held models' and spare ones."""
        return [*self._engines.values(), *self._spare]

    def cached_request_ids(self) -> set[str]:
        return {rid for e in self._engines.values() for rid in e.cached_request_ids()}

    def in_use(self, model_id: str) -> bool:
        """A request holds a KV cache on ``model_id``'s engine, or a step of it is running."""
        e = self._engines.get(model_id)
        return e is not None and (self._active.get(model_id, 0) > 0 or bool(e.cached_request_ids()))

    def weight_bytes(self) -> int:
        return sum(e.weight_bytes() for e in self._engines.values())

    # ---------------------------------------------------------------- use

    def begin(self, model_id: str) -> None:
        """A step of ``model_id`` starts (it is in use until ``end``)."""
        self._active[model_id] = self._active.get(model_id, 0) + 1
        self.touch(model_id)

    def end(self, model_id: str) -> None:
        n = self._active.get(model_id, 0) - 1
        if n > 0:
            self._active[model_id] = n
        else:
            self._active.pop(model_id, None)

    def touch(self, model_id: str) -> None:
        if model_id in self._engines:
            self._engines.move_to_end(model_id)
            self._last_used[model_id] = time.monotonic()

    async def engine_for(self, model_id: str, incoming_bytes: int = 0, pinned: Collection[str] = ()) -> InferenceEngine:
        """The engine for ``model_id``: the one holding it, or a free one after evicting least
        recently used idle models until the count and ``incoming_bytes`` more fit.

        Raises:
            RuntimeError: a further model but no ``create_engine`` and the only engine in use.
        """
        engine = self._engines.get(model_id)
        if engine is not None:
            self.touch(model_id)
            return engine
        await self._make_room(model_id, incoming_bytes, pinned)
        if self._spare:
            engine = self._spare.pop()
        elif self.create_engine is not None:
            engine = self.create_engine()
        else:
            busy = sorted(self._engines)
            raise RuntimeError(f"cannot load {model_id}: this node's only engine serves {busy} (in use)")
        self._engines[model_id] = engine
        self._last_used[model_id] = time.monotonic()
        return engine

    async def _make_room(self, model_id: str, incoming_bytes: int, pinned: Collection[str]) -> None:
        def over() -> bool:
            if len(self._engines) >= self.max_models or (self.create_engine is None and not self._spare):
                return True
            return bool(self.memory and incoming_bytes and self.weight_bytes() + incoming_bytes > self.memory)

        lru = list(self._engines)  # least recently used first, the pinned (default) model last
        for victim in [m for m in lru if m not in pinned] + [m for m in lru if m in pinned]:
            if not over():
                return
            if self.in_use(victim):
                continue
            await self.evict(victim, f"to make room for {model_id}")
        if over():
            logger.warning("holding %s beyond the cache's bounds: the models held (%s) are in use", model_id,
                           ", ".join(self._engines))

    async def evict(self, model_id: str, why: str) -> None:
        """Drop ``model_id``'s shard; its engine becomes a spare."""
        engine = self._engines.pop(model_id, None)
        self._last_used.pop(model_id, None)
        if engine is None:
            return
        logger.info("unloading %s (%s)", model_id, why)
        await engine.unload()
        self._spare.append(engine)

    async def evict_idle(self, pinned: Collection[str] = ()) -> list[str]:
        """Drop the models idle for more than ``idle_ttl`` seconds (not ``pinned``, not in use)."""
        now = time.monotonic()
        gone = [m for m, t in self._last_used.items()
                if now - t > self.idle_ttl and m not in pinned and not self.in_use(m)]
        for m in gone:
            await self.evict(m, f"idle for {self.idle_ttl:.0f} s")
        return gone

    async def clear_request(self, request_id: str, keep_tokens: Sequence[int] = ()) -> None:
        """Free ``request_id``'s KV cache in every engine, or with ``keep_tokens`` (the tokens
        it holds) keep it in the prompt cache of the engine that holds it."""
        for e in list(self._engines.values()):
            if keep_tokens:
                await e.keep_prefix(request_id, keep_tokens)
            else:
                await e.clear_request(request_id)

    async def close(self) -> None:
        for e in self.engines():
            await e.close()
