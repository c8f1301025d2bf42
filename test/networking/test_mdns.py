"""MDNSDiscovery on loopback: real zeroconf bound to 127.0.0.1 only, real gRPC servers."""

from __future__ import annotations

import asyncio
import logging
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from zeroconf.asyncio import AsyncZeroconf

from exo.networking.grpc.peer_handle import GRPCPeerHandle
from exo.networking.grpc.server import GRPCServer
from exo.networking.mdns.discovery import MDNSDiscovery, capabilities_txt, cluster_tag, resolve_interfaces
from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.topology.topology import Topology

from helpers import wait_for

LOOPBACK = ["127.0.0.1"]  # NETWORK RULE: never anything else in tests


class HealthyNode:
    """The part of the Node the gRPC server needs for discovery: an id and a health check."""

    def __init__(self, node_id: str) -> None:
        self.id = node_id

    def is_healthy(self) -> bool:
        return True

    async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
        return Topology()


@dataclass
class Member:
    node_id: str
    server: GRPCServer
    discovery: MDNSDiscovery
    changes: int = 0

    def peer_ids(self) -> set[str]:
        return {p.id() for p in self.discovery.peers()}


def caps(memory_gib: int) -> DeviceCapabilities:
    return DeviceCapabilities("test box", "test cpu", memory_gib << 30, DeviceFlops(1.0, 2.0, 4.0))


async def start_member(node_id: str, secret: str | None = None, memory_gib: int = 8, listener=None) -> Member:
    server = GRPCServer(HealthyNode(node_id), "127.0.0.1", 0, cluster_secret=secret)
    await server.start()

    def create_peer_handle(peer_id: str, address: str, peer_caps: DeviceCapabilities) -> GRPCPeerHandle:
        return GRPCPeerHandle(peer_id, address, peer_caps, cluster_secret=secret)

    discovery = MDNSDiscovery(
        node_id, server.port, LOOPBACK, create_peer_handle, caps(memory_gib),
        cluster_secret=secret, health_check_interval=0.2, health_check_failures=3,
    )
    member = Member(node_id, server, discovery)

    def on_change() -> None:
        member.changes += 1

    discovery.add_peer_listener(on_change)
    if listener is not None:
        discovery.add_peer_listener(listener)
    await discovery.start()
    return member


async def stop_member(member: Member) -> None:
    await member.discovery.stop()
    await member.server.stop(grace=0)


@contextlib.asynccontextmanager
async def members(*specs: tuple) -> AsyncIterator[list[Member]]:
    # started together: each start waits ~1 s for mDNS name probing
    results = await asyncio.gather(*(start_member(*spec) for spec in specs), return_exceptions=True)
    started = [m for m in results if isinstance(m, Member)]
    try:
        for r in results:
            if isinstance(r, BaseException):
                raise r
        yield started
    finally:
        await asyncio.gather(*(stop_member(m) for m in started))


@pytest.mark.asyncio
async def test_two_nodes_find_each_other_and_see_a_clean_stop() -> None:
    async with members(("node-a",), ("node-b", None, 16)) as (a, b):
        peers_a, peers_b = await asyncio.gather(
            a.discovery.discover_peers(wait_for_peers=1, timeout=3.0),
            b.discovery.discover_peers(wait_for_peers=1, timeout=3.0),
        )
        assert [p.id() for p in peers_a] == ["node-b"]
        assert [p.id() for p in peers_b] == ["node-a"]
        assert peers_a[0].address() == f"127.0.0.1:{b.server.port}"
        assert peers_a[0].device_capabilities() == caps(16)  # carried in the TXT record
        assert a.changes == 1 and b.changes == 1

        # clean stop of b's discovery: it sends the goodbye. b's gRPC server keeps answering
        # health checks, so only the goodbye can remove it from a's peers.
        await b.discovery.stop()
        await wait_for(lambda: a.peer_ids() == set(), timeout=3.0)
        assert a.changes == 2


@pytest.mark.asyncio
async def test_dead_peer_is_removed_by_health_checks_and_rejoins() -> None:
    async with members(("node-a",), ("node-b",)) as (a, b):
        await a.discovery.discover_peers(wait_for_peers=1, timeout=3.0)
        port = b.server.port
        # node-b's gRPC server dies while its mDNS record stays (as after SIGKILL: no goodbye)
        await b.server.stop(grace=0)
        await wait_for(lambda: a.peer_ids() == set(), timeout=3.0)
        # it comes back on the same port: re-admitted without a new mDNS announcement
        b.server = GRPCServer(HealthyNode("node-b"), "127.0.0.1", port)
        await b.server.start()
        peers = await a.discovery.discover_peers(wait_for_peers=1, timeout=3.0)
        assert [p.id() for p in peers] == ["node-b"]


# A node in another process, bound to loopback only, that we can SIGKILL: no goodbye is sent
# and its mDNS record outlives it (TTL >= 1125 s), so only health checks can remove it.
CHILD_NODE = """
import asyncio, sys
from exo.networking.grpc.peer_handle import GRPCPeerHandle
from exo.networking.grpc.server import GRPCServer
from exo.networking.mdns.discovery import MDNSDiscovery
from exo.topology.device_capabilities import DeviceCapabilities

class Node:
    id = "node-child"
    def is_healthy(self):
        return True

async def main():
    server = GRPCServer(Node(), "127.0.0.1", 0)
    await server.start()
    discovery = MDNSDiscovery("node-child", server.port, ["127.0.0.1"], GRPCPeerHandle,
                              DeviceCapabilities("child", "cpu", 1 << 30))
    await discovery.start()
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_sigkilled_node_is_removed_by_health_checks() -> None:
    repo_root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD_NODE, stdout=asyncio.subprocess.PIPE, env=env, cwd=repo_root
    )
    try:
        async with members(("node-a",)) as (a,):
            assert await asyncio.wait_for(child.stdout.readline(), 10.0) == b"ready\n"
            peers = await a.discovery.discover_peers(wait_for_peers=1, timeout=3.0)
            assert [p.id() for p in peers] == ["node-child"]
            child.send_signal(signal.SIGKILL)
            await child.wait()
            await wait_for(lambda: a.peer_ids() == set(), timeout=10.0)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


@pytest.mark.asyncio
async def test_cluster_secret_separates_clusters(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="exo.networking.mdns.discovery")
    async with members(("node-a", "one"), ("node-b", "one"), ("node-c", "two"), ("node-d", None)) as (a, b, c, d):
        peers = await a.discovery.discover_peers(wait_for_peers=1, timeout=3.0)
        assert [p.id() for p in peers] == ["node-b"]
        await b.discovery.discover_peers(wait_for_peers=1, timeout=3.0)
        # c and d see the others' services but skip them by tag; give resolution a moment
        # by waiting until a, which resolves the same records, settled
        await wait_for(lambda: a.peer_ids() == {"node-b"} and b.peer_ids() == {"node-a"}, timeout=3.0)
        assert await asyncio.gather(
            c.discovery.discover_peers(wait_for_peers=1, timeout=0.5),
            d.discovery.discover_peers(wait_for_peers=1, timeout=0.5),
        ) == [[], []]
        # white box: foreign services are skipped before any health check
        assert a.discovery._tracker.known_ids() == {"node-b"}
        # ... and said once, with the reason (a mistyped secret shows as nodes that never join)
        await wait_for(lambda: "ignoring node node-c of another cluster: its cluster secret differs" in caplog.text
                       and "ignoring node node-d of another cluster: it has no cluster secret" in caplog.text
                       and "ignoring node node-a of another cluster: it has a cluster secret and this node has none"
                       in caplog.text, timeout=3.0)


@pytest.mark.asyncio
async def test_async_listener_and_stop_twice() -> None:
    changed = asyncio.Event()

    async def listener() -> None:
        await asyncio.sleep(0)  # a real coroutine, run as a task by the discovery
        changed.set()

    async with members(("node-a", None, 8, listener), ("node-b",)) as (a, b):
        await asyncio.wait_for(changed.wait(), 3.0)
        assert a.peer_ids() == {"node-b"}
        changed.clear()
        await b.discovery.stop()
        await asyncio.wait_for(changed.wait(), 3.0)
        assert a.peer_ids() == set()
        await a.discovery.stop()
        await a.discovery.stop()


def test_resolve_interfaces() -> None:
    assert [str(i) for i in resolve_interfaces(["127.0.0.1"])] == ["127.0.0.1/8"]
    assert [str(i) for i in resolve_interfaces(["lo"])] == ["127.0.0.1/8"]
    with pytest.raises(ValueError, match="unknown interface 'no-such-if0'"):
        resolve_interfaces(["no-such-if0"])
    with pytest.raises(ValueError, match="empty"):
        resolve_interfaces([])
    with pytest.raises(ValueError, match="no local interface"):
        resolve_interfaces(["203.0.113.7"])
    with pytest.raises(ValueError, match="no-such-if0"):
        MDNSDiscovery("x", 5000, ["no-such-if0"], GRPCPeerHandle, caps(1))


def test_txt_properties_fit() -> None:
    long = DeviceCapabilities("m" * 300, "Intel(R) Xeon(R) Platinum 8480+ " * 5, 1 << 40, DeviceFlops(1 / 3, 2 / 3, 4 / 3))
    text = capabilities_txt(long)
    assert len(text.encode()) <= 250
    assert DeviceCapabilities.from_dict(json.loads(text)).memory == 1 << 40
    assert cluster_tag("s") != cluster_tag("t") and len(cluster_tag("s")) == 16


@pytest.mark.asyncio
async def test_network_rule_guard_rejects_default_interfaces() -> None:
    with pytest.raises(RuntimeError, match="NETWORK RULE"):
        AsyncZeroconf()
    with pytest.raises(RuntimeError, match="NETWORK RULE"):
        AsyncZeroconf(interfaces=["127.0.0.1", "192.0.2.2"])
    with pytest.raises(RuntimeError, match="NETWORK RULE"):
        await MDNSDiscovery("x", 5000, None, GRPCPeerHandle, caps(1)).start()
