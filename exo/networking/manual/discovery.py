"""ManualDiscovery: peers from a static JSON file, for networks without multicast.

The file (the same one can be given to every node; a node skips its own entry)::

    {"peers": {"<node_id>": {"address": "192.168.1.10", "port": 50051,
                             "device_capabilities": {...optional, DeviceCapabilities.to_dict()}}}}

It is re-read whenever its modification time or size changes (checked once per health-check
round). Peers are admitted after a health check and removed after failed ones, exactly like
mDNS peers; a peer deleted from the file is removed at once.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from exo.networking.address import join_host_port
from exo.networking.peer_tracker import PeerHandleFactory, PeerTracker, TrackedDiscovery
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES, DeviceCapabilities

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerConfig:
    """One peer of the file: its gRPC address ("host:port") and capabilities."""

    node_id: str
    address: str
    device_capabilities: DeviceCapabilities


def load_peer_config(path: str) -> dict[str, PeerConfig]:
    """Read and validate a peer file.

    Raises:
        OSError: the file cannot be read.
        ValueError: invalid JSON or an entry that does not follow the format above (the
            message names the entry and the field).
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("peers"), dict):
        raise ValueError(f'{path}: expected an object with a "peers" object')
    peers: dict[str, PeerConfig] = {}
    for node_id, entry in data["peers"].items():
        where = f"{path}: peer {node_id!r}"
        if not node_id:
            raise ValueError(f"{path}: empty node id")
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object")
        host, port = entry.get("address"), entry.get("port")
        if not isinstance(host, str) or not host:
            raise ValueError(f'{where}: "address" must be a non-empty string')
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ValueError(f'{where}: "port" must be an integer in 1..65535, got {port!r}')
        caps_dict = entry.get("device_capabilities")
        if caps_dict is None:
            caps = UNKNOWN_DEVICE_CAPABILITIES
        else:
            try:
                caps = DeviceCapabilities.from_dict(caps_dict)
            except (TypeError, ValueError, AttributeError) as e:
                raise ValueError(f'{where}: invalid "device_capabilities": {e}') from e
        peers[node_id] = PeerConfig(node_id, join_host_port(host, port), caps)
    return peers


class ManualDiscovery(TrackedDiscovery):
    """Discovery from a JSON peer file (see the module docstring).

    Args:
        config_path: path of the peer file.
        node_id: this node's id (its own entry is ignored).
        create_peer_handle: factory ``(node_id, "host:port", capabilities) -> PeerHandle``.
        health_check_interval: seconds between health checks (and file change checks).
        health_check_failures: consecutive failed checks that remove a peer.

    A file that becomes unreadable or invalid later is reported with ``logger.error`` and the
    previous peers are kept.
    """

    def __init__(
        self,
        config_path: str,
        node_id: str,
        create_peer_handle: PeerHandleFactory,
        health_check_interval: float = 1.0,
        health_check_failures: int = 3,
    ) -> None:
        self.config_path = config_path
        self.node_id = node_id
        self._tracker = PeerTracker(create_peer_handle, health_check_interval, health_check_failures, tick=self._reload_if_changed)
        self._stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the last read
        self._started = False

    async def start(self) -> None:
        """Read the file, offer its peers and start health checks.

        Raises:
            RuntimeError: already started.
            OSError, ValueError: the file cannot be read or is invalid (see ``load_peer_config``).
        """
        if self._started:
            raise RuntimeError("ManualDiscovery already started")
        stamp = self._file_stamp()
        self._apply(load_peer_config(self.config_path))
        self._stamp = stamp
        self._started = True
        self._tracker.start()
        logger.info("manual discovery of node %s started from %s", self.node_id, self.config_path)

    async def stop(self) -> None:
        """Stop health checks and disconnect every peer. Safe to call twice."""
        if not self._started:
            return
        self._started = False
        await self._tracker.stop()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.config_path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _apply(self, peers: dict[str, PeerConfig]) -> None:
        peers.pop(self.node_id, None)
        for node_id in self._tracker.known_ids() - peers.keys():
            self._tracker.withdraw(node_id)
        for p in peers.values():
            self._tracker.offer(p.node_id, p.address, p.device_capabilities)

    async def _reload_if_changed(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            peers = load_peer_config(self.config_path)
        except (OSError, ValueError) as e:
            logger.error("peer file %s could not be loaded, keeping the previous peers: %s", self.config_path, e)
            return
        logger.info("peer file %s changed: %d peer(s)", self.config_path, len(peers))
        self._apply(peers)
