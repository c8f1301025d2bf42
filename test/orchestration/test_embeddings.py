"""Embedding requests through the ring, on real nodes (real gRPC on loopback, real zeroconf bound
to 127.0.0.1) running the deterministic dummy engine: its final hidden states at position j are
``[token_j, j, layers run, 0, ...]``, so the pooled vector tells that every layer ran exactly
once on the prompt, and which positions were pooled."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import wait_for
from test_failover import GiB, MODEL, cluster, kill

from exo.inference.dummy import HIDDEN_SIZE
from exo.inference.pooling import l2_normalize, pool
from exo.orchestration.errors import GenerationError

asyncio_test = pytest.mark.asyncio(loop_scope="session")

PROMPT = [40, 41, 42, 43, 44, 45]
N_LAYERS = 30


def dummy_hidden(prompt: list[int]) -> np.ndarray:
    """The dummy model's final hidden states of ``prompt``, (T, HIDDEN_SIZE)."""
    h = np.zeros((len(prompt), HIDDEN_SIZE), dtype=np.float32)
    h[:, 0], h[:, 1], h[:, 2] = prompt, np.arange(len(prompt)), N_LAYERS
    return h


def test_pooling_modes_and_normalization():
    h = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]], dtype=np.float32)
    assert pool(h, "mean").tolist() == [3.0, 3.0]
    assert pool(h[None], "last").tolist() == [5.0, 1.0]
    assert pool(h, "cls").tolist() == [1.0, 2.0]
    assert l2_normalize(np.array([3.0, 4.0])).tolist() == pytest.approx([0.6, 0.8])
    assert l2_normalize(np.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="pooling"):
        pool(h, "max")
    with pytest.raises(ValueError, match="NaN"):
        l2_normalize(np.array([np.nan, 1.0]))


@asyncio_test
async def test_three_node_ring_pools_every_layers_output_and_frees_every_cache():
    async with cluster({"a": 3 * GiB, "b": 2 * GiB, "c": 1 * GiB}, token_delay=0.0) as nodes:
        for name, running in nodes.items():
            for mode in ("mean", "last", "cls"):
                raw = await running.node.embed(MODEL, PROMPT, mode, normalize=False)
                assert raw.dtype == np.float32 and raw.shape == (HIDDEN_SIZE,)
                np.testing.assert_array_equal(raw, pool(dummy_hidden(PROMPT), mode), err_msg=f"{name} {mode}")
            vec = await running.node.embed(MODEL, PROMPT)  # the model's own pooling: mean (SmolLM2 says none)
            np.testing.assert_allclose(vec, l2_normalize(pool(dummy_hidden(PROMPT), "mean")), rtol=1e-6)
        for running in nodes.values():
            await wait_for(lambda r=running: not r.node.engine.cached_request_ids(), timeout=5)
            assert not running.node.active_request_ids


@asyncio_test
async def test_a_failing_step_fails_the_embedding_with_a_clear_error():
    async with cluster({"a": 2 * GiB, "b": 1 * GiB}, token_delay=0.0) as nodes:
        for running in nodes.values():
            running.node.engine.fail_layer = N_LAYERS - 1
        with pytest.raises(GenerationError, match="layer 29 failed"):
            await nodes["a"].node.embed(MODEL, PROMPT, "mean")
        for running in nodes.values():
            await wait_for(lambda r=running: not r.node.engine.cached_request_ids(), timeout=5)


@asyncio_test
async def test_a_node_killed_during_the_embedding_is_failed_over():
    async with cluster({"a": 3 * GiB, "b": 2 * GiB, "c": 1 * GiB}, token_delay=0.3, health_check_interval=0.2) as nodes:
        import asyncio

        task = asyncio.create_task(nodes["a"].node.embed(MODEL, PROMPT, "last", normalize=False))
        await wait_for(lambda: bool(nodes["b"].node.active_request_ids), timeout=10)
        await kill(nodes["b"])
        raw = await asyncio.wait_for(task, 30)
        np.testing.assert_array_equal(raw, pool(dummy_hidden(PROMPT), "last"))
