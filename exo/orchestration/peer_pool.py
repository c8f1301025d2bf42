"""Handles to the ring members this node sends to: a discovered peer's own handle, else one
this pool opens for a member discovery has not reported (yet), from the address the ring
carries. A member that moved gets a new handle and its old connection is closed; every handle
the pool opened is closed on ``close``.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from exo.networking.peer_handle import PeerHandle
from exo.networking.peer_tracker import PeerHandleFactory
from exo.orchestration.background import Background
from exo.orchestration.errors import NodeStoppingError
from exo.orchestration.request import RequestContext
from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.partitioning import Partition
from exo.topology.topology import Topology


class PeerPool:
    """Handles to ring members for node ``node_id``.

    Args:
        create_peer_handle: builds a PeerHandle for (node_id, "host:port", capabilities).
        peers: the discovered peers now (node id -> handle).
        topology: the topology now (capabilities of a member that is not a peer).
        background: its ``stopping`` refuses new handles.
    """

    def __init__(self, node_id: str, create_peer_handle: PeerHandleFactory, peers: Callable[[], dict[str, PeerHandle]],
                 topology: Callable[[], Topology], background: Background):
        self.node_id = node_id
        self.create_peer_handle = create_peer_handle
        self._peers = peers
        self._topology = topology
        self._background = background
        self._extra_handles: dict[str, PeerHandle] = {}
        self._disconnecting: set[asyncio.Task] = set()  # closing replaced handles: awaited by close(), never cancelled

    def handle(self, p: Partition) -> PeerHandle:
        """The handle to ``p``'s node. Raises NodeStoppingError once this node is stopping: a
        connection opened then would outlive ``stop``."""
        if self._background.stopping:
            raise NodeStoppingError(f"node {self.node_id} is shutting down")
        peers = self._peers()
        if p.node_id in peers:
            return peers[p.node_id]
        h = self._extra_handles.get(p.node_id)
        if h is None or h.address() != p.address:
            if h is not None:  # the node moved: close the old connection
                task = asyncio.create_task(h.disconnect(), name=f"disconnect-{p.node_id}")
                self._disconnecting.add(task)
                task.add_done_callback(self._disconnecting.discard)
            info = self._topology().nodes.get(p.node_id)
            h = self.create_peer_handle(p.node_id, p.address, info.capabilities if info else DeviceCapabilities("?", "?", 0))
            self._extra_handles[p.node_id] = h
        return h

    def origin_handle(self, ctx: RequestContext) -> PeerHandle:
        """The handle to ``ctx``'s origin, for its results.

        Raises:
            ConnectionError: the origin is neither a peer, in the topology, nor in the ring.
            NodeStoppingError: as ``handle``.
        """
        origin = self._peers().get(ctx.origin_node_id)
        if origin is not None:
            return origin
        # a node this one has not discovered (yet): the ring it sent carries its address
        info = self._topology().nodes.get(ctx.origin_node_id)
        address = info.address if info is not None else next(
            (p.address for p in ctx.ring if p.node_id == ctx.origin_node_id), None)
        if address is None:
            raise ConnectionError(f"origin node {ctx.origin_node_id} is unknown")
        return self.handle(Partition(ctx.origin_node_id, address, 0, 0))

    async def close(self) -> None:
        """Wait for replaced handles to close, then close every handle this pool opened."""
        await asyncio.gather(*self._disconnecting, return_exceptions=True)
        for h in self._extra_handles.values():
            await h.disconnect()
