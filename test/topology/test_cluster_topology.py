"""The topology every node sees: nodes beyond its direct peers, their own capabilities, links,
the ring with its layers, nodes left out of it, and what is active now (``GET /v1/topology``).

Real nodes (dummy engine) on loopback, found through manual peer files that form a chain
a - b - c: a and c never talk to discovery about each other, yet each sees the other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest
from helpers import wait_for

from exo.inference.generation import GenerationOptions
from exo.models.sources import STORE

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
GiB, MiB = 1 << 30, 1 << 20


def write_peers(path, peers: dict) -> None:
    entries = {r.node.id: {"address": "127.0.0.1", "port": r.server.port} for r in peers.values()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"peers": entries}))
    tmp.replace(path)


async def test_chain_of_peers_every_node_sees_every_node(tmp_path, caplog) -> None:
    from helpers import loopback_config

    from exo.orchestration.launcher import start_node

    tag = uuid.uuid4().hex[:6]
    memories = {"a": 2 * GiB, "b": 1 * GiB, "c": 10 * MiB}  # c cannot hold one 14 MiB layer
    files = {name: tmp_path / f"{name}.json" for name in memories}
    for f in files.values():
        f.write_text('{"peers": {}}')
    nodes: dict = {}
    caplog.set_level(logging.INFO, logger="exo.orchestration.node")
    try:
        for name, mem in memories.items():
            nodes[name] = await start_node(loopback_config(
                node_id=f"topo{tag}-{name}", discovery_module="manual", discovery_config_path=str(files[name]),
                inference_engine="dummy", inference_engine_options={"token_delay": 0.02}, memory=mem,
                serve_api=False, health_check_interval=0.3))
        write_peers(files["a"], {"b": nodes["b"]})
        write_peers(files["b"], {"a": nodes["a"], "c": nodes["c"]})
        write_peers(files["c"], {"b": nodes["b"]})
        a, b, c = (nodes[n].node for n in "abc")
        ids = {a.id, b.id, c.id}

        def all_see_all() -> bool:
            return all(set(n.topology.nodes) == ids for n in (a, b, c))

        await wait_for(all_see_all, timeout=15)
        assert set(a.peers) == {b.id} and set(c.peers) == {b.id}  # direct peers only through b
        # c's capabilities as c reports them, though a's peer file says nothing about c (or b)
        await wait_for(lambda: a.topology.nodes[c.id].capabilities.memory == 10 * MiB
                       and a.topology.nodes[b.id].capabilities.memory == 1 * GiB, timeout=10)
        # c's own link to b reaches a through b's next refresh
        await wait_for(lambda: {(b.id, c.id), (c.id, b.id), (a.id, b.id), (b.id, a.id)} <= a.topology.edges, timeout=10)

        card = STORE.card(MODEL)
        await wait_for(lambda: all(n.cached_card(MODEL) is not None for n in (a, b, c)), timeout=30)
        await wait_for(lambda: all(len(n.partition(card)) == 2 for n in (a, b, c)), timeout=10)
        view = a.topology_dict()
        assert view["node_id"] == a.id and set(view["nodes"]) == ids
        assert view["nodes"][c.id]["capabilities"]["memory"] == 10 * MiB
        assert [b.id, c.id] in view["edges"]
        assert [(p["node_id"], p["start_layer"], p["end_layer"]) for p in view["partitions"][MODEL]] == [
            (a.id, 0, 19), (b.id, 20, 29)]
        assert "too small to hold a layer" in view["left_out"][MODEL][c.id]
        assert view["requests"] == [] and view["active_node_ids"] == []
        # every node computes the same ring from the same topology
        assert a.partition(card) == b.partition(card) == c.partition(card)
        # the node left out says so itself, and loads nothing
        await wait_for(lambda: any("holds no layer" in r.getMessage() and c.id in r.getMessage() for r in caplog.records),
                       timeout=10)
        assert c.engine.shard is None
        await wait_for(lambda: a.engine.shard is not None and a.engine.shard.end_layer == 19, timeout=10)
        assert a.topology_dict()["shard"] == {"model_id": MODEL, "start_layer": 0, "end_layer": 19, "n_layers": 30}

        # while a request runs, the topology shows it and the nodes working on it
        seen = []
        async for r in a.generate(MODEL, [40, 41, 42], GenerationOptions(max_tokens=5, temperature=0.0), request_id="topo-req"):
            if not seen:
                seen.append(a.topology_dict())
        assert seen[0]["active_node_ids"] == sorted([a.id, b.id])
        assert seen[0]["requests"][0]["request_id"] == "topo-req" and seen[0]["requests"][0]["epoch"] == 0
        assert a.topology_dict()["requests"] == []

        # b leaves: a and c, which only knew each other through b, drop it and each other
        await nodes.pop("b").stop()
        await wait_for(lambda: set(a.topology.nodes) == {a.id} and set(c.topology.nodes) == {c.id}, timeout=10)
    finally:
        await asyncio.gather(*(r.stop() for r in nodes.values()), return_exceptions=True)
