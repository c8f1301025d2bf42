"""Two real nodes on loopback (mDNS + gRPC + the real model) against one node holding every layer."""

from __future__ import annotations

import asyncio

import openai
import pytest
from helpers import wait_for

from exo.inference.generation import GenerationOptions
from exo.inference.shard import Shard
from exo.orchestration.errors import GenerationError

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


async def _greedy_tokens(node, ids, n):
    options = GenerationOptions(max_tokens=n, temperature=0.0)  # no stop token: exactly n tokens
    out = []
    async for r in node.generate(MODEL, ids, options):
        out.extend(r.tokens)
    return out


async def test_each_node_holds_part_of_the_layers(two_node_cluster):
    for n in two_node_cluster:
        await wait_for(lambda n=n: n.node.engine.shard is not None, timeout=30)
    shards = sorted((n.node.engine.shard for n in two_node_cluster), key=lambda s: s.start_layer)
    assert shards == [Shard(MODEL, 0, 14, 30), Shard(MODEL, 15, 29, 30)]


async def test_two_node_ring_decodes_exactly_like_one_node(two_node_cluster, single_node_api):
    tok = await single_node_api.node.get_tokenizer(MODEL)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]))
    expected = await _greedy_tokens(single_node_api.node, ids, 48)
    assert len(expected) == 48
    for n in two_node_cluster:  # whichever node the request enters
        assert await _greedy_tokens(n.node, ids, 48) == expected


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("which", [0, 1])
async def test_openai_client_on_either_node_answers_paris(two_node_cluster, which, stream):
    client = openai.AsyncOpenAI(base_url=two_node_cluster[which].base_url, api_key="unused", max_retries=0)
    if stream:
        text = ""
        async for chunk in await client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                                                max_tokens=32, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    else:
        resp = await client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
        text = resp.choices[0].message.content
        assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    assert "Paris" in text
    await client.close()


async def test_kv_caches_freed_on_every_node_after_requests(two_node_cluster):
    tok = await two_node_cluster[0].node.get_tokenizer(MODEL)
    ids = tok.encode("Hello")
    await _greedy_tokens(two_node_cluster[0].node, ids, 4)
    for n in two_node_cluster:
        await wait_for(lambda n=n: not n.node.engine.cached_request_ids(), timeout=5)


async def test_topology_lists_both_nodes_and_their_layers(two_node_cluster):
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(f"{two_node_cluster[0].api_url}/v1/topology") as r:
            assert r.status == 200
            topo = await r.json()
    assert set(topo["nodes"]) == {n.node.id for n in two_node_cluster}
    layers = {p["node_id"]: (p["start_layer"], p["end_layer"]) for p in topo["partitions"][MODEL]}
    assert sorted(layers.values()) == [(0, 14), (15, 29)]


async def test_a_decode_step_the_next_node_refuses_ends_the_request_with_its_error(two_node_cluster):
    # Decode steps are sent on without waiting for the next node's answer: its refusal (here
    # NOT_FOUND, the request's KV cache is gone there) must still reach the origin as an error.
    for n in two_node_cluster:
        await wait_for(lambda n=n: n.node.engine.shard is not None, timeout=30)
    first, last = sorted((n.node for n in two_node_cluster), key=lambda node: node.engine.shard.start_layer)
    tok = await first.get_tokenizer(MODEL)
    gen = first.generate(MODEL, tok.encode("Count to one hundred:"), GenerationOptions(max_tokens=200, temperature=0.0),
                         request_id="refused-step")
    await gen.__anext__()
    await last.engine.clear_request("refused-step")
    with pytest.raises(GenerationError, match="no KV cache"):
        async with asyncio.timeout(60):
            async for _ in gen:
                pass


async def test_the_old_connection_to_a_node_that_moved_is_closed(single_node_api):
    # Regression: the handle to a ring member that came back on another address was replaced
    # without being closed, leaking its channel and ring socket.
    from exo.topology.partitioning import Partition

    node = single_node_api.node
    old = node._pool.handle(Partition("moved-node", "127.0.0.1:1", 0, 0))
    old._get_stub()  # its channel is open
    new = node._pool.handle(Partition("moved-node", "127.0.0.1:2", 0, 0))
    assert new is not old and new.address() == "127.0.0.1:2"
    await wait_for(lambda: old._channel is None, timeout=10)



@pytest.mark.parametrize("wait", [True, False])
async def test_a_stopping_node_refuses_ring_messages_and_opens_no_connection(wait):
    # Regression: a node stops before its gRPC server, and a ring message that arrived in
    # between started a shard step that stop() neither cancelled nor awaited (its error report
    # could open a connection to the origin that nothing closed). Now the sender is told the
    # node is gone (UNAVAILABLE: it fails over) and nothing starts.
    import numpy as np
    from helpers import SESSION_CLUSTER_SECRET, loopback_config, make_request_context

    from exo.networking.grpc.peer_handle import GRPCPeerHandle
    from exo.orchestration.launcher import start_node
    from exo.topology.device_capabilities import DeviceCapabilities
    from exo.topology.partitioning import Partition

    running = await start_node(loopback_config(node_id=f"stopping-{wait}", discovery_module="none"))
    node, address = running.node, f"127.0.0.1:{running.server.port}"
    handle = GRPCPeerHandle(node.id, address, DeviceCapabilities("?", "?", 0), cluster_secret=SESSION_CLUSTER_SECRET)
    try:
        await node.stop()  # as RunningNode.stop: the node first, its server still answers
        ctx = make_request_context(request_id=f"after-stop-{wait}", origin_node_id="elsewhere",
                                   ring=(Partition(node.id, address, 0, 29),), prompt_len=3, epoch=0)
        if not wait:  # sent without waiting for the ack (as decode steps are): the refusal comes later
            errors: list[BaseException] = []
            await handle.send_prompt(ctx, np.array([[1, 2, 3]], dtype=np.int64), 0, on_error=errors.append)
            await wait_for(lambda: len(errors) == 1, timeout=10)
            assert all(isinstance(e, ConnectionError) and "shutting down" in str(e) for e in errors), errors
        else:
            with pytest.raises(ConnectionError, match="shutting down"):
                await handle.send_prompt(ctx, np.array([[1, 2, 3]], dtype=np.int64), 0)
        assert not node._background.tasks and not node._pool._extra_handles
        with pytest.raises(ConnectionError, match="shutting down"):
            node._pool.handle(Partition("elsewhere", "127.0.0.1:1", 0, 0))
    finally:
        await handle.disconnect()
        if running.api is not None:
            await running.api.stop()
        await running.server.stop()


async def test_a_node_that_has_not_discovered_the_origin_still_answers_it(tmp_path):
    # Regression (a benchmark ring hung in its first request): the last node reported a
    # request's final result only to an origin it had discovered itself. A node that had not
    # yet (manual discovery polls; mDNS can lag) dropped the result, and the origin waited for
    # its response timeout. The ring each message carries holds every member's address.
    import json

    from helpers import SESSION_TAG, loopback_config

    from exo.models.sources import STORE
    from exo.orchestration.launcher import start_node

    memory = 8 * 2**30
    unaware = await start_node(loopback_config(node_id=f"b-unaware-{SESSION_TAG}", discovery_module="none",
                                               memory=memory, default_model=""))
    origin = None
    try:
        path = tmp_path / "peers.json"
        caps = {"model": "test", "chip": "cpu", "memory": memory}
        path.write_text(json.dumps({"peers": {unaware.node.id: {"address": "127.0.0.1", "port": unaware.server.port,
                                                                 "device_capabilities": caps}}}))
        origin = await start_node(loopback_config(node_id=f"a-origin-{SESSION_TAG}", discovery_module="manual",
                                                  discovery_config_path=str(path), memory=memory, default_model=""))
        card = STORE.card(MODEL)
        await wait_for(lambda: [p.node_id for p in origin.node.partition(card)] == [origin.node.id, unaware.node.id],
                       timeout=20)
        ids = (await origin.node.get_tokenizer(MODEL)).encode("The capital of France is")
        results = []
        async with asyncio.timeout(45):
            async for r in origin.node.generate(MODEL, ids, GenerationOptions(max_tokens=4, temperature=0.0)):
                results.append(r)
        assert sum(len(r.tokens) for r in results) == 4 and results[-1].finish_reason == "length"
        assert origin.node.id not in unaware.node.peers and origin.node.id not in unaware.node.topology.nodes
    finally:
        for running in (origin, unaware):
            if running is not None:
                await running.stop()
