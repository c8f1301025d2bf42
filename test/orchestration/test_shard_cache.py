"""The shards a node holds: an LRU cache of engines, one per model, bounded by count, idle time
and memory; a model in use is never evicted, the default model last."""

from __future__ import annotations

import time

import numpy as np
import pytest

from exo.inference.dummy import DummyInferenceEngine
from exo.inference.shard import Shard
from exo.orchestration.shards import ShardCache

pytestmark = pytest.mark.asyncio(loop_scope="session")

A, B, C, D = "smollm2-135m", "gemma3-270m", "m-c", "m-d"


async def hold(cache: ShardCache, model: str, **kwargs) -> DummyInferenceEngine:
    engine = await cache.engine_for(model, **kwargs)
    engine._shard = Shard(model, 0, 0, 1)  # what ensure_shard would leave (no card needed here)
    return engine


async def test_the_least_recently_used_idle_model_makes_room():
    made = []
    cache = ShardCache(DummyInferenceEngine(), lambda: made.append(1) or DummyInferenceEngine(), max_models=3)
    for m in (A, B, C):
        await hold(cache, m)
    cache.touch(A)  # now B is the least recently used
    await hold(cache, D)
    assert set(cache.shards()) == {A, C, D} and len(made) == 2  # B's engine was reused for D


async def test_a_model_in_use_is_never_evicted():
    cache = ShardCache(DummyInferenceEngine(), DummyInferenceEngine, max_models=2)
    a = await hold(cache, A)
    await a.infer_tensor("r1", a.shard, np.array([[5, 6]]), 0)  # a request holds a KV cache on A
    b = await hold(cache, B)
    cache.begin(B)  # a step of B is running
    await hold(cache, C)  # over the bound for a while: both are in use
    assert set(cache.shards()) == {A, B, C}
    cache.end(B)
    await a.clear_request("r1")
    await hold(cache, D)  # now idle, the least recently used go until D fits
    assert set(cache.shards()) == {C, D} and b.shard.model_id == D  # B's engine now holds D


async def test_the_default_model_goes_last_and_never_for_idleness():
    cache = ShardCache(DummyInferenceEngine(), DummyInferenceEngine, max_models=2, idle_ttl=0.05)
    await hold(cache, A, pinned={A})
    await hold(cache, B, pinned={A})
    await hold(cache, C, pinned={A})  # B (not pinned) goes, though A was used before it
    assert set(cache.shards()) == {A, C}
    deadline = time.monotonic() + 0.06
    while time.monotonic() < deadline:  # let both go idle past the TTL
        pass
    assert await cache.evict_idle(pinned={A}) == [C]
    assert set(cache.shards()) == {A}


async def test_memory_bounds_the_weights_held():
    class Sized(DummyInferenceEngine):
        def weight_bytes(self) -> int:
            return 100 if self.shard is not None else 0

    cache = ShardCache(Sized(), Sized, max_models=5, memory=250)
    await hold(cache, A)
    await hold(cache, B)
    await hold(cache, C, incoming_bytes=100)  # 200 held + 100 > 250: A goes first
    assert set(cache.shards()) == {B, C}


async def test_one_engine_without_a_factory_swaps_models():
    only = DummyInferenceEngine()
    cache = ShardCache(only)
    assert await hold(cache, A) is only
    assert await hold(cache, B) is only and set(cache.shards()) == {B}
    await only.infer_tensor("r", only.shard, np.array([[1]]), 0)
    with pytest.raises(RuntimeError, match="in use"):
        await cache.engine_for(C)
