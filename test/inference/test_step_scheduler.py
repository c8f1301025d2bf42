"""The torch engine's step scheduler (issue 22) on SmolLM2's first layers: a long prefill that
comes while requests decode runs in pieces with their decode batches between them, its tail no
larger than its pieces, and gives the hidden states a prefill on an idle engine gives."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from exo.inference.shard import Shard
from exo.inference.step_scheduler import SHORT_PROMPT

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"


async def test_a_long_prefill_runs_in_pieces_between_the_decode_batches():
    from exo.inference.torch.engine import TorchInferenceEngine

    shard = Shard(MODEL, 0, 3, 30)  # four layers, hidden states out: every piece's output is kept
    long = np.arange(1000, 1000 + 300)[None, :]
    idle = TorchInferenceEngine(device="cpu")
    busy = TorchInferenceEngine(device="cpu")
    try:
        await idle.ensure_shard(shard)
        await busy.ensure_shard(shard)
        whole = await idle.infer_tensor("long", shard, long, 0)
        assert idle._scheduler.piece_sizes == [300]  # nothing decoding: one piece

        stop = asyncio.Event()

        async def decode(rid: str) -> int:
            await busy.infer_tensor(rid, shard, np.asarray([[5, 6, 7]]), 0)
            pos = 3
            while not stop.is_set():
                await busy.infer_tensor(rid, shard, np.asarray([[8]]), pos)
                pos += 1
            return pos

        streams = [asyncio.create_task(decode(f"s{i}")) for i in range(2)]
        while len(busy.batch_sizes) < 4:  # both streams decoding
            await asyncio.sleep(0.01)
        batches, pieces = len(busy.batch_sizes), len(busy._scheduler.piece_sizes)
        pieced = await busy.infer_tensor("long", shard, long, 0)
        stop.set()
        await asyncio.gather(*streams)
        sizes = busy._scheduler.piece_sizes[pieces:]
        assert len(sizes) > 1 and sum(sizes) == 300, sizes
        assert sizes[-1] <= max(max(sizes[:-1]), SHORT_PROMPT), sizes  # the tail of a long prompt is a piece too
        assert len(busy.batch_sizes) - batches >= len(sizes) - 1  # a decode batch between every two pieces
        assert pieced.shape == whole.shape == (1, 300, 576)
        np.testing.assert_allclose(pieced, whole, atol=1e-3, rtol=0)
    finally:
        await idle.close()
        await busy.close()
