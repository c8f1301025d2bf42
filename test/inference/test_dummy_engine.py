"""The dummy engine: the InferenceEngine contract without weights, and a real Node generating with it."""

from __future__ import annotations

import numpy as np
import pytest

from exo.inference.dummy import (DEFAULT_VOCAB_SIZE, FIRST_ORDINARY_ID, HIDDEN_SIZE, DummyEngineError,
                                 DummyInferenceEngine, expected_tokens)
from exo.inference.generation import GenerationOptions
from exo.inference.inference_engine import get_inference_engine
from exo.inference.shard import Shard

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
FULL = Shard(MODEL, 0, 29, 30)
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356]


def ids(tokens):
    return np.asarray([tokens], dtype=np.int64)


async def greedy(engine_shards, prompt, n, request_id="r"):
    """Greedy decoding through a chain of (engine, shard) pairs, as a ring would run it."""
    out, x, pos = [], ids(prompt), 0
    for _ in range(n):
        h = x
        for engine, shard in engine_shards:
            h = await engine_infer(engine, request_id, shard, h, pos)
        pos += x.shape[1]
        tok = int(np.argmax(h))
        out.append(tok)
        x = ids([tok])
    return out


async def engine_infer(engine, rid, shard, x, pos):
    return await engine.infer_tensor(rid, shard, x, pos)


async def test_registry_builds_the_dummy_engine():
    assert isinstance(get_inference_engine("dummy"), DummyInferenceEngine)


async def test_shapes_and_dtypes_follow_the_interface():
    first, last = Shard(MODEL, 0, 9, 30), Shard(MODEL, 10, 29, 30)
    e1, e2 = DummyInferenceEngine(), DummyInferenceEngine()
    h = await e1.infer_tensor("r", first, ids(PROMPT), 0)
    assert h.shape == (1, len(PROMPT), HIDDEN_SIZE) and h.dtype == np.float32
    logits = await e2.infer_tensor("r", last, h, 0)
    assert logits.shape == (DEFAULT_VOCAB_SIZE,) and logits.dtype == np.float32


async def test_one_engine_and_a_split_ring_agree_with_expected_tokens():
    full = DummyInferenceEngine()
    split = [(DummyInferenceEngine(), Shard(MODEL, 0, 11, 30)), (DummyInferenceEngine(), Shard(MODEL, 12, 20, 30)),
             (DummyInferenceEngine(), Shard(MODEL, 21, 29, 30))]
    want = expected_tokens(PROMPT, 12)
    assert await greedy([(full, FULL)], PROMPT, 12) == want
    assert await greedy(split, PROMPT, 12) == want
    assert all(FIRST_ORDINARY_ID <= t < DEFAULT_VOCAB_SIZE for t in want)
    assert len(set(want)) > 6  # depends on the context, not a constant


async def test_next_token_depends_on_every_token_of_the_context():
    assert expected_tokens([5, 6, 7], 4) != expected_tokens([6, 6, 7], 4)
    assert expected_tokens([5, 6, 7], 4) != expected_tokens([5, 6], 4)


async def test_position_rules_of_the_kv_cache():
    e = DummyInferenceEngine()
    await e.infer_tensor("a", FULL, ids(PROMPT), 0)
    assert e.cached_request_ids() == {"a"}
    with pytest.raises(ValueError, match="position 3 but the KV cache holds 7"):
        await e.infer_tensor("a", FULL, ids([5]), 3)
    with pytest.raises(KeyError, match="no KV cache"):
        await e.infer_tensor("b", FULL, ids([5]), 4)
    await e.infer_tensor("a", FULL, ids([5]), 7)
    # position 0 restarts the request with a fresh cache: same logits as a first prefill
    again = await e.infer_tensor("a", FULL, ids(PROMPT), 0)
    assert np.array_equal(again, await DummyInferenceEngine().infer_tensor("z", FULL, ids(PROMPT), 0))
    await e.clear_request("a")
    await e.clear_request("unknown")
    assert e.cached_request_ids() == set()


async def test_bad_inputs_raise_value_error():
    e = DummyInferenceEngine()
    with pytest.raises(ValueError, match="token ids"):
        await e.infer_tensor("r", FULL, np.zeros((1, 3), dtype=np.float32), 0)
    with pytest.raises(ValueError, match="token ids"):
        await e.infer_tensor("r", FULL, ids([-1]), 0)
    with pytest.raises(ValueError, match="hidden states"):
        await e.infer_tensor("r", Shard(MODEL, 5, 29, 30), np.zeros((1, 2, 3), dtype=np.float32), 0)
    # hidden states that skipped layers 0-4 are caught
    with pytest.raises(ValueError, match="layers"):
        await e.infer_tensor("r", Shard(MODEL, 5, 29, 30), np.zeros((1, 2, HIDDEN_SIZE), dtype=np.float32), 0)
    with pytest.raises(KeyError):
        await e.ensure_shard(Shard("no-such-model", 0, 1, 2))
    with pytest.raises(ValueError, match="layers"):
        await e.ensure_shard(Shard(MODEL, 0, 3, 4))
    with pytest.raises(ValueError):
        DummyInferenceEngine(vocab_size=10)


async def test_configured_failure_and_forced_tokens():
    e = DummyInferenceEngine(fail_layer=3, fail_at_position=len(PROMPT) + 1)
    await e.infer_tensor("r", FULL, ids(PROMPT), 0)
    await e.infer_tensor("r", FULL, ids([40]), len(PROMPT))
    with pytest.raises(DummyEngineError, match="layer 3"):
        await e.infer_tensor("r", FULL, ids([41]), len(PROMPT) + 1)
    # a shard without the failing layer runs
    h = await DummyInferenceEngine().infer_tensor("r", Shard(MODEL, 0, 2, 30), ids(PROMPT), 0)
    assert (await DummyInferenceEngine(fail_layer=1).infer_tensor("r", Shard(MODEL, 3, 29, 30), h, 0)).shape == (DEFAULT_VOCAB_SIZE,)
    with pytest.raises(DummyEngineError):
        await DummyInferenceEngine(fail_layer=2).infer_tensor("r", Shard(MODEL, 0, 2, 30), ids(PROMPT), 0)
    forced = {len(PROMPT) + 2: 2}
    e = DummyInferenceEngine(forced_tokens=forced)
    got = await greedy([(e, FULL)], PROMPT, 4)
    assert got == expected_tokens(PROMPT, 4, forced_tokens=forced) and got[2] == 2


async def test_node_with_dummy_engine_generates_through_the_launcher():
    from exo.orchestration.launcher import start_node
    from helpers import loopback_config

    running = await start_node(loopback_config(discovery_module="none", inference_engine="dummy", serve_api=False))
    try:
        assert isinstance(running.node.engine, DummyInferenceEngine)
        tokens = []
        async for r in running.node.generate(MODEL, PROMPT, GenerationOptions(max_tokens=10)):
            tokens.extend(r.tokens)
            last = r
        assert tokens == expected_tokens(PROMPT, 10) and last.finish_reason == "length"
        # a forced EOS stops generation with finish_reason "stop" and no token
        running.node.engine.forced_tokens = {len(PROMPT) + 3: 2}
        tokens = []
        async for r in running.node.generate(MODEL, PROMPT, GenerationOptions(max_tokens=10, stop_token_ids=(2,))):
            tokens.extend(r.tokens)
            last = r
        assert tokens == expected_tokens(PROMPT, 3) and last.finish_reason == "stop"
        assert running.node.engine.cached_request_ids() == set()
    finally:
        await running.stop()


async def test_engine_options_reach_the_engine_and_a_failure_reaches_the_caller():
    from exo.orchestration.errors import GenerationError
    from exo.orchestration.launcher import start_node
    from helpers import loopback_config

    running = await start_node(loopback_config(discovery_module="none", inference_engine="dummy", serve_api=False,
                                               inference_engine_options={"fail_layer": 29, "fail_at_position": len(PROMPT) + 2}))
    try:
        tokens = []
        with pytest.raises(GenerationError, match="layer 29 failed"):
            async for r in running.node.generate(MODEL, PROMPT, GenerationOptions(max_tokens=10)):
                tokens.extend(r.tokens)
        assert tokens == expected_tokens(PROMPT, 3)  # prefill, decode at P, decode at P+1; fails at P+2
    finally:
        await running.stop()
