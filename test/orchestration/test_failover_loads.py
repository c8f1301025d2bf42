"""After a re-partition each node loads only what changed: the torch engine keeps the layers it
already holds and reads only the others from the GGUF file, and the result is exactly the model
a fresh load of the new shard gives (real SmolLM2 weights)."""

from __future__ import annotations

import numpy as np
import pytest

from exo.inference.shard import Shard

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"


@pytest.mark.parametrize("before, after, loaded", [
    ((0, 9), (0, 14), [10, 11, 12, 13, 14]),        # first node grows when the middle node leaves
    ((20, 29), (15, 29), [15, 16, 17, 18, 19]),      # last node grows
    ((10, 19), (5, 14), [5, 6, 7, 8, 9]),            # a middle node slides
    ((10, 19), (10, 14), []),                        # a node joined: only drops layers
])
async def test_shard_change_reads_only_new_layers_and_equals_a_fresh_load(before, after, loaded):
    from exo.inference.torch.engine import TorchInferenceEngine

    reusing, fresh = TorchInferenceEngine(device="cpu"), TorchInferenceEngine(device="cpu")
    try:
        await reusing.ensure_shard(Shard(MODEL, *before, 30))
        kept = reusing._model.layers[max(after[0], before[0]) - before[0]]
        await reusing.ensure_shard(Shard(MODEL, *after, 30))
        assert reusing.last_load["loaded_layers"] == loaded
        assert reusing.last_load["reused_layers"] == [i for i in range(after[0], after[1] + 1) if i not in loaded]
        assert reusing._model.layers[max(after[0], before[0]) - after[0]] is kept  # the very same module
        shard = Shard(MODEL, *after, 30)
        await fresh.ensure_shard(shard)
        assert reusing.weight_bytes() == fresh.weight_bytes()  # nothing held twice (tied head included)
        if shard.is_first_layer:
            x = np.array([[1, 504, 3458, 282, 4649]], dtype=np.int64)
        else:
            x = np.random.default_rng(0).standard_normal((1, 5, 576)).astype(np.float32)
        np.testing.assert_array_equal(await reusing.infer_tensor("r", shard, x, 0), await fresh.infer_tensor("r", shard, x, 0))
    finally:
        await reusing.close()
        await fresh.close()
