"""A heterogeneous ring: a torch node, a tinygrad node and (where mlx is installed) an MLX node,
found over mDNS on loopback, answer exactly like one torch node holding every layer.

Hidden states cross between engines as float32 (the wire format), so which engine runs which
layers does not change the greedy tokens. The nodes share a cluster secret, so the suite's
other loopback rings (no secret) never mix with this one.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil

import openai
import pytest
import pytest_asyncio
from helpers import NodeUnderTest, loopback_config, wait_for

from exo.inference.generation import GenerationOptions
from exo.models.sources import STORE

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]
MAX_TOKENS = 24


def _engines() -> list[str]:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("the torch engine is not installed: pip install -e .[torch]")
    if importlib.util.find_spec("tinygrad") is None:
        pytest.skip("tinygrad is not installed: pip install -e .[tinygrad]")
    if shutil.which("clang") is None:
        pytest.skip("tinygrad's CPU device needs clang (apt-get install clang)")
    engines = ["torch", "tinygrad"]
    if importlib.util.find_spec("mlx") is not None:
        engines.append("mlx")
    return engines


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mixed_ring():
    """One node per engine, ring formed and every node's shard loaded."""
    from exo.orchestration.launcher import start_node

    engines = _engines()
    options = {"tinygrad": {"warmup": False}}  # shards change while the ring forms: compile on first use
    card = STORE.card(MODEL)
    nodes = []
    try:
        nodes = list(await asyncio.gather(*(
            start_node(loopback_config(node_id=f"mixed-{name}", inference_engine=name, cluster_secret="mixed-ring-test",
                                       inference_engine_options=options.get(name, {})))
            for name in engines)))

        def ring_formed() -> bool:
            rings = [n.node.partition(card) for n in nodes]
            return all(len(r) == len(nodes) for r in rings) and all(r == rings[0] for r in rings)

        await wait_for(ring_formed, timeout=30)
        ring = nodes[0].node.partition(card)

        def shards_loaded() -> bool:
            held = {n.node.id: n.node.engine.shard for n in nodes}
            return all(held[p.node_id] is not None and (held[p.node_id].start_layer, held[p.node_id].end_layer)
                       == (p.start_layer, p.end_layer) for p in ring)

        await wait_for(shards_loaded, timeout=120)
        yield {name: NodeUnderTest(n) for name, n in zip(engines, nodes)}
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


async def _greedy(node, ids) -> list[int]:
    out = []
    async for r in node.generate(MODEL, ids, GenerationOptions(max_tokens=MAX_TOKENS, temperature=0.0)):
        out.extend(r.tokens)
    return out


async def test_each_engine_holds_part_of_the_layers(mixed_ring):
    shards = sorted((n.node.engine.shard for n in mixed_ring.values()), key=lambda s: s.start_layer)
    assert shards[0].start_layer == 0 and shards[-1].end_layer == 29
    assert all(a.end_layer + 1 == b.start_layer for a, b in zip(shards, shards[1:]))
    assert {type(n.node.engine).__name__ for n in mixed_ring.values()} >= {"TorchInferenceEngine", "TinygradInferenceEngine"}


async def test_mixed_ring_answers_the_openai_client_exactly_like_one_torch_node(mixed_ring, single_node_api):
    ref_client = openai.AsyncOpenAI(base_url=single_node_api.base_url, api_key="unused", max_retries=0)
    client = openai.AsyncOpenAI(base_url=mixed_ring["tinygrad"].base_url, api_key="unused", max_retries=0, timeout=120)
    try:
        ref = await ref_client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
        got = await client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
    finally:
        await ref_client.close()
        await client.close()
    assert ref.usage.completion_tokens == MAX_TOKENS
    assert got.choices[0].message.content == ref.choices[0].message.content
    assert got.usage.completion_tokens == ref.usage.completion_tokens


async def test_mixed_ring_generates_the_same_token_ids_from_the_torch_node(mixed_ring, single_node_api):
    tok = await single_node_api.node.get_tokenizer(MODEL)
    ids = tok.encode(tok.apply_chat_template(MESSAGES))
    expected = await _greedy(single_node_api.node, ids)
    assert await _greedy(mixed_ring["torch"].node, ids) == expected
    for n in mixed_ring.values():
        await wait_for(lambda n=n: not n.node.engine.cached_request_ids(), timeout=10)


async def test_a_model_an_engine_cannot_run_leaves_its_node_out_and_topology_says_why(mixed_ring, tmp_path):
    """A Qwen3 model (QK norm, which tinygrad and MLX do not implement) asked of the tinygrad
    node: only the torch node holds its layers, /v1/topology names the others with the reason,
    and the answer equals the torch engine's alone."""
    import aiohttp
    from tiny_models import build_hf_model

    model = str(build_hf_model("qwen3", tmp_path / "qwen3"))
    ids = [5, 17, 99, 200, 33, 8, 150]
    got = []
    async for r in mixed_ring["tinygrad"].node.generate(model, ids, GenerationOptions(max_tokens=8, temperature=0.0, stop_token_ids=())):
        got.extend(r.tokens)
    card = await mixed_ring["torch"].node.model_card(model)
    ring = mixed_ring["torch"].node.partition(card)
    assert [(p.node_id, p.start_layer, p.end_layer) for p in ring] == [(mixed_ring["torch"].node.id, 0, 3)]
    async with aiohttp.ClientSession() as s, s.get(mixed_ring["tinygrad"].base_url + "/topology") as r:
        topo = await r.json()
    left_out = topo["left_out"][model]
    for name in set(mixed_ring) - {"torch"}:
        assert "QK norm" in left_out[mixed_ring[name].node.id] and name in left_out[mixed_ring[name].node.id]
    assert got == await _torch_alone(model, ids, 8)


async def _torch_alone(model: str, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens of the torch engine alone holding every layer (no ring)."""
    import numpy as np

    from exo.inference.shard import Shard
    from exo.inference.torch.engine import TorchInferenceEngine

    engine = TorchInferenceEngine()
    try:
        shard = Shard(model, 0, 3, 4)
        out = await engine.infer_tensor("ref", shard, np.array([ids]), 0)
        tokens, pos = [int(np.argmax(out))], len(ids)
        while len(tokens) < n:
            out = await engine.infer_tensor("ref", shard, np.array([[tokens[-1]]]), pos)
            pos += 1
            tokens.append(int(np.argmax(out)))
        return tokens
    finally:
        await engine.close()
