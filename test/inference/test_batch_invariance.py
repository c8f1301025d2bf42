"""Batch invariance of the torch engine (issue 23): a request's decode logits are the same, bit
for bit, whether its step runs alone or in a batch of 2, 8 or 16 requests, so that a seeded
request at temperature 1 samples the same tokens at any load.

On a CPU with AMX the native kernels multiply products of 8 rows or more on the tile unit, in
bfloat16 with each activation split into two parts; a batched row then differed from the
single-row float32 path by ~1e-5 and a seeded request's tokens changed with the load. This
machine has no AMX, so the kernels' emulated AVX-512/AMX build (``load_emulated_kernels``)
stands in for them: the engine's decode steps run on it in place of ``torch.ops.exo_gguf``.
Dense float32 weights go through torch's BLAS, whose blocking depends on the number of rows.
"""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch

from exo.inference.shard import Shard
from exo.inference.step_scheduler import DecodeStep
from exo.inference.torch.engine import TorchInferenceEngine, _RequestState
from exo.inference.torch.kernels import gguf_kernels_error, load_emulated_kernels

MODEL = "smollm2-135m"
BATCHES = (2, 8, 16)
# distinct prompts of distinct lengths (the KV caches of a batch differ in length)
PROMPTS = [[1] + [(97 * i + 13 * j) % 49000 + 100 for j in range(4 + i)] for i in range(max(BATCHES))]


@pytest.fixture(scope="module")
def engines():
    """Engines by weights ("gguf", "dense") on the whole model, batch invariant (the default),
    built on first use and closed after the module."""
    if gguf_kernels_error() is not None:
        pytest.skip(f"the native kernels cannot be built: {gguf_kernels_error()}")
    held: dict[str, TorchInferenceEngine] = {}
    yield held
    for engine in held.values():
        asyncio.run(engine.close())


async def _engine(engines: dict, weights: str) -> TorchInferenceEngine:
    if weights not in engines:
        engine = TorchInferenceEngine(device="cpu", weights=weights)
        await engine.ensure_shard(Shard.full(MODEL, 30))
        engines[weights] = engine
    return engines[weights]


async def _prefilled(engine: TorchInferenceEngine) -> dict[str, list]:
    """Each prompt prefilled on ``engine`` as its own request: request id -> its KV caches."""
    shard = engine.shard
    out = {}
    for i, p in enumerate(PROMPTS):
        rid = f"inv-{i}"
        await engine.infer_tensor(rid, shard, np.array([p], dtype=np.int64), 0)
        out[rid] = copy.deepcopy(engine._requests[rid].caches)
    return out


def _decode(engine: TorchInferenceEngine, caches: dict[str, list], rows: list[int]) -> list[np.ndarray]:
    """One decode step of the requests ``rows`` (indices into PROMPTS) in one batch, each from a
    copy of its prefilled caches; its logits (vocab,) per row."""
    steps = []
    for i in rows:
        rid = f"inv-{i}"
        engine._requests[rid] = _RequestState(copy.deepcopy(caches[rid]))
        steps.append(DecodeStep(rid, np.array([[7 + i]], dtype=np.int64), len(PROMPTS[i]), None))
    out = engine._decode_batch(steps)  # on this thread: no step of the engine's own runs meanwhile
    for r in out:
        if isinstance(r, Exception):
            raise r
    return out


def _batch_rows(target: int, size: int) -> list[int]:
    """A batch of ``size`` requests holding ``target`` at about its middle among the others."""
    others = [i for i in range(len(PROMPTS)) if i != target][:size - 1]
    others.insert(size // 2, target)
    return others


@pytest.mark.asyncio
@pytest.mark.parametrize("kernels", ["native", "emulated_amx", "dense"])
async def test_a_request_gets_the_same_logits_alone_and_in_batches_of_2_8_16(engines, kernels, monkeypatch):
    engine = await _engine(engines, "dense" if kernels == "dense" else "gguf")
    caches = await _prefilled(engine)  # on this machine's own kernels
    if kernels == "emulated_amx":
        emulated = load_emulated_kernels()
        assert emulated.amx_rows() == 8  # products of 8 rows or more would take the AMX path
        monkeypatch.setattr(torch.ops, "exo_gguf", emulated)
    # the emulated AMX kernels are slow (a minute for both targets): one row, not the first
    for target in (5,) if kernels == "emulated_amx" else (0, 5):
        alone = _decode(engine, caches, [target])[0]
        for size in BATCHES:
            rows = _batch_rows(target, size)
            batched = _decode(engine, caches, rows)[rows.index(target)]
            assert np.array_equal(batched, alone), (kernels, target, size, float(np.abs(batched - alone).max()))


@pytest.mark.asyncio
async def test_the_faster_path_is_there_when_invariance_is_off(engines, monkeypatch):
    """batch_invariant=False: a batch of 8 takes the (emulated) AMX path, whose rows differ
    from the single-row path in the last bits, within the float32 path's error bound."""
    engine = await _engine(engines, "gguf")
    caches = await _prefilled(engine)
    monkeypatch.setattr(torch.ops, "exo_gguf", load_emulated_kernels())
    monkeypatch.setattr(engine, "batch_invariant", False)
    monkeypatch.setattr(engine._model, "batch_invariant", False)
    alone = _decode(engine, caches, [0])[0]
    batched = _decode(engine, caches, _batch_rows(0, 8))[_batch_rows(0, 8).index(0)]
    assert not np.array_equal(batched, alone)
    np.testing.assert_allclose(batched, alone, atol=5e-3)
