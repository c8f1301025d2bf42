"""ManualDiscovery with real gRPC servers on loopback and a peer file in tmp_path."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from exo.networking.grpc.peer_handle import GRPCPeerHandle
from exo.networking.grpc.server import GRPCServer
from exo.networking.manual.discovery import ManualDiscovery, load_peer_config
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES, DeviceCapabilities

from helpers import unused_loopback_port, wait_for

CAPS = DeviceCapabilities("box", "cpu", 4 << 30)


class HealthyNode:
    def __init__(self, node_id: str) -> None:
        self.id = node_id

    def is_healthy(self) -> bool:
        return True


def write_config(path: Path, peers: dict[str, dict] | str) -> None:
    """Write the peer file and move its mtime forward, so every write is seen as a change."""
    previous = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(peers if isinstance(peers, str) else json.dumps({"peers": peers}))
    os.utime(path, ns=(previous + 10**9, previous + 10**9))


def entry(port: int, caps: DeviceCapabilities | None = None) -> dict:
    e: dict = {"address": "127.0.0.1", "port": port}
    if caps is not None:
        e["device_capabilities"] = caps.to_dict()
    return e


async def started_server(node_id: str, port: int = 0) -> GRPCServer:
    server = GRPCServer(HealthyNode(node_id), "127.0.0.1", port)
    await server.start()
    return server


def discovery_for(path: Path, node_id: str = "me") -> ManualDiscovery:
    return ManualDiscovery(str(path), node_id, GRPCPeerHandle, health_check_interval=0.1, health_check_failures=3)


def ids(discovery: ManualDiscovery) -> set[str]:
    return {p.id() for p in discovery.peers()}


@pytest.mark.asyncio
async def test_peers_from_file_are_admitted_after_health_check(tmp_path: Path) -> None:
    b, c = await started_server("b"), await started_server("c")
    path = tmp_path / "peers.json"
    write_config(path, {"me": entry(1), "b": entry(b.port, CAPS), "c": entry(c.port), "dead": entry(unused_loopback_port())})
    discovery = discovery_for(path)
    try:
        await discovery.start()
        peers = await discovery.discover_peers(wait_for_peers=2, timeout=3.0)
        assert [(p.id(), p.address()) for p in peers] == [("b", f"127.0.0.1:{b.port}"), ("c", f"127.0.0.1:{c.port}")]
        assert peers[0].device_capabilities() == CAPS
        assert peers[1].device_capabilities() == UNKNOWN_DEVICE_CAPABILITIES
        # "dead" is never admitted
        assert len(await discovery.discover_peers(wait_for_peers=3, timeout=0.3)) == 2
    finally:
        await discovery.stop()
        await b.stop(0)
        await c.stop(0)


@pytest.mark.asyncio
async def test_file_changes_are_picked_up_and_bad_files_keep_peers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    b, c = await started_server("b"), await started_server("c")
    path = tmp_path / "peers.json"
    write_config(path, {"b": entry(b.port)})
    discovery = discovery_for(path)
    changes: list[int] = []
    discovery.add_peer_listener(lambda: changes.append(1))
    try:
        await discovery.start()
        await wait_for(lambda: ids(discovery) == {"b"}, timeout=3.0)

        write_config(path, {"b": entry(b.port), "c": entry(c.port)})
        await wait_for(lambda: ids(discovery) == {"b", "c"}, timeout=3.0)

        write_config(path, {"c": entry(c.port)})  # b deleted: removed at once
        await wait_for(lambda: ids(discovery) == {"c"}, timeout=3.0)
        assert len(changes) == 3

        with caplog.at_level(logging.ERROR, logger="exo.networking.manual.discovery"):
            write_config(path, "{not json")
            await wait_for(lambda: "invalid JSON" in caplog.text, timeout=3.0)
            write_config(path, {"c": {"address": "127.0.0.1", "port": "many"}})
            await wait_for(lambda: '"port" must be an integer' in caplog.text, timeout=3.0)
            path.unlink()
            await wait_for(lambda: "could not be loaded" in caplog.text and "No such file" in caplog.text, timeout=3.0)
        assert ids(discovery) == {"c"}  # kept
    finally:
        await discovery.stop()
        await b.stop(0)
        await c.stop(0)


@pytest.mark.asyncio
async def test_dead_peer_is_removed_and_rejoins(tmp_path: Path) -> None:
    b = await started_server("b")
    port = b.port
    path = tmp_path / "peers.json"
    write_config(path, {"b": entry(port)})
    discovery = discovery_for(path)
    try:
        await discovery.start()
        await discovery.discover_peers(wait_for_peers=1, timeout=3.0)
        await b.stop(0)
        await wait_for(lambda: ids(discovery) == set(), timeout=3.0)
        b = await started_server("b", port)
        assert [p.id() for p in await discovery.discover_peers(wait_for_peers=1, timeout=3.0)] == ["b"]
    finally:
        await discovery.stop()
        await b.stop(0)


@pytest.mark.asyncio
async def test_start_fails_on_a_missing_or_bad_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await discovery_for(tmp_path / "missing.json").start()
    path = tmp_path / "peers.json"
    write_config(path, {"b": {"port": 5000}})
    with pytest.raises(ValueError, match=r"peer 'b': \"address\" must be a non-empty string"):
        await discovery_for(path).start()


@pytest.mark.parametrize(
    "content, match",
    [
        ("[]", '"peers" object'),
        ('{"peers": []}', '"peers" object'),
        ('{"peers": {"b": 3}}', "expected an object"),
        ('{"peers": {"b": {"address": "h", "port": 0}}}', "1..65535"),
        ('{"peers": {"b": {"address": "h", "port": true}}}', "integer"),
        ('{"peers": {"b": {"address": "h", "port": 1, "device_capabilities": {"bogus": 1}}}}', "device_capabilities"),
    ],
)
def test_load_peer_config_validation(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "peers.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_peer_config(str(path))


def test_load_peer_config_ipv6(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    path.write_text('{"peers": {"b": {"address": "::1", "port": 7}}}')
    assert load_peer_config(str(path))["b"].address == "[::1]:7"
