"""Membership: the peers discovery reports, the topology of the whole cluster as this node
sees it, and the partition of a model over it.

Every node sees every node of the cluster, not only its direct peers (``update_topology``).
Changes are reported through the callbacks the Node wires: ``on_ring_loss`` (node ids that
left: the origin fails over the requests whose ring they were in) and ``on_topology_changed``
(the set of nodes changed: the default model's shard is preloaded).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Collection

from exo.inference.inference_engine import unsupported_reason
from exo.models.sources import ModelCard
from exo.networking.discovery import Discovery
from exo.networking.peer_handle import PeerHandle
from exo.orchestration.background import Background
from exo.orchestration.errors import NoNodeAvailableError
from exo.topology.partitioning import Partition, PartitioningStrategy, PartitionPlan
from exo.topology.topology import NodeInfo, Topology

logger = logging.getLogger(__name__)

#: Seconds a peer that left stays out of the topology even if another peer still reports it
#: (that peer's own health checks have not noticed yet).
LOST_PEER_MEMORY = 15.0


def layer_bytes(card: ModelCard, topo: Topology) -> dict[str, int]:
    """Bytes one layer of ``card`` takes on each node of ``topo`` (0: unknown): the
    checkpoint's largest layer where the node's engine keeps the checkpoint's format, else
    the layer's parameters at the engine's bytes per parameter."""
    file_bytes = card.max_layer_bytes
    params = card.args.layer_params() if card.args is not None else 0
    out = {}
    for nid, info in topo.nodes.items():
        if info.param_bytes and params:
            out[nid] = int(params * info.param_bytes)
        else:
            out[nid] = file_bytes
    return out


class Membership:
    """The cluster as node ``node_id`` sees it.

    Args:
        node_info: this node's own NodeInfo now.
        partitioning_strategy: how a model's layers are split over the topology.
        topology_interval: seconds between topology refreshes.
        background: spawns topology updates when discovery reports a change.
        on_ring_loss: called with the node ids that left at each refresh that lost some.
        on_topology_changed: called when the set of nodes changed.
        after_refresh: awaited after each periodic refresh (in the same error handling).
    """

    def __init__(self, node_id: str, node_info: Callable[[], NodeInfo], partitioning_strategy: PartitioningStrategy,
                 topology_interval: float, background: Background, on_ring_loss: Callable[[set[str]], None],
                 on_topology_changed: Callable[[], None], after_refresh: Callable[[], Awaitable[object]]):
        self.id = node_id
        self.node_info = node_info
        self.partitioning_strategy = partitioning_strategy
        self.topology_interval = topology_interval
        self._background = background
        self._on_ring_loss = on_ring_loss
        self._on_topology_changed = on_topology_changed
        self._after_refresh = after_refresh
        self.discovery: Discovery | None = None
        self.peers: dict[str, PeerHandle] = {}
        self.topology = Topology()
        self._topology_lock = asyncio.Lock()
        self._lost_peers: dict[str, float] = {}  # node id -> monotonic time it stopped being a peer
        self.loop_task: asyncio.Task | None = None

    async def start(self, discovery: Discovery | None) -> None:
        """Put this node in the topology and start ``discovery`` (None: alone)."""
        self.discovery = discovery
        self.topology.add_node(self.node_info())
        if discovery is not None:
            if hasattr(discovery, "add_peer_listener"):
                discovery.add_peer_listener(self._on_peers_changed)
            await discovery.start()

    def start_refreshing(self) -> None:
        """Refresh the topology every ``topology_interval`` seconds until ``stop``."""
        self.loop_task = asyncio.create_task(self._topology_loop(), name=f"topology-{self.id}")

    async def stop(self) -> None:
        """Stop discovery (the refresh task is cancelled with the node's background tasks)."""
        if self.discovery is not None:
            await self.discovery.stop()

    def _on_peers_changed(self) -> None:
        if not self._background.stopping:
            self._background.spawn(self.update_topology(), "topology-update")

    async def _topology_loop(self) -> None:
        while True:
            await asyncio.sleep(self.topology_interval)
            try:
                await self.update_topology()
                await self._after_refresh()
            except Exception:
                logger.exception("topology refresh failed")

    async def update_topology(self) -> Topology:
        """Rebuild the topology from the live peers and what they see; when the set of nodes
        changed, ``on_topology_changed`` (the Node preloads its shard of the default model).

        Every node sees every node of the cluster, not only its direct peers: each peer answers
        ``collect_topology`` with its own latest view (its peers, and what it learnt from them),
        so nodes and links several hops away arrive within a few refreshes. A peer that left is
        kept out for ``LOST_PEER_MEMORY`` seconds even while other peers' older views still list
        it. Node ids that left go to ``on_ring_loss`` (requests this node is the origin of are told
        when members of their ring left).
        """
        async with self._topology_lock:
            peers = await self.discovery.discover_peers(0) if self.discovery is not None else []
            now = time.monotonic()
            previous_peers = set(self.peers)
            self.peers = {p.id(): p for p in peers}
            for gone in previous_peers - set(self.peers):
                self._lost_peers[gone] = now
            for nid, since in list(self._lost_peers.items()):
                if nid in self.peers or now - since > LOST_PEER_MEMORY:
                    del self._lost_peers[nid]
            topo = Topology()
            topo.add_node(self.node_info())
            for p in peers:
                topo.add_node(NodeInfo(p.id(), p.address(), p.device_capabilities()))
                topo.add_edge(self.id, p.id())
            visited = {self.id, *self.peers}
            results = await asyncio.gather(*(p.collect_topology(set(visited), 4) for p in peers), return_exceptions=True)
            for p, r in zip(peers, results):
                if isinstance(r, Topology):
                    own = r.nodes.get(p.id())
                    if own is not None:  # a peer knows its own device and engine best (a manual peer file may not say)
                        topo.add_node(NodeInfo(p.id(), p.address(), own.capabilities, own.engine, own.param_bytes))
                    for nid, info in r.nodes.items():
                        if nid not in topo.nodes and nid not in self._lost_peers:
                            topo.add_node(info)
                    topo.edges |= {(a, b) for a, b in r.edges if a in topo.nodes and b in topo.nodes}
                else:
                    logger.debug("collect_topology from %s failed: %s", p.id(), r)
            changed = set(topo.nodes) != set(self.topology.nodes)
            gone = (set(self.topology.nodes) - set(topo.nodes)) | (previous_peers - set(self.peers))
            self.topology = topo
        if gone:
            self._on_ring_loss(gone)
        if changed:
            logger.info("node %s: topology now has %d nodes: %s", self.id, len(topo.nodes), sorted(topo.nodes))
            self._on_topology_changed()
        return topo

    def lost_peers(self) -> list[str]:
        """Ids of the peers that left (or stopped answering) in the last ``LOST_PEER_MEMORY``
        seconds, sorted."""
        return sorted(self._lost_peers)

    async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
        """This node, its live peers, and what its last refresh learned from them.

        ``visited`` and ``max_depth`` bound the walk for callers that recurse; this node answers
        from its own view without calling further, so a call never fans out or loops.
        """
        topo = Topology()
        for nid, info in self.topology.nodes.items():
            if nid not in visited or nid == self.id:
                topo.add_node(info)
        topo.add_node(self.node_info())
        for pid, p in self.peers.items():
            known = self.topology.nodes.get(pid)
            topo.add_node(known if known is not None and known.address == p.address()
                          else NodeInfo(pid, p.address(), p.device_capabilities()))
            topo.add_edge(self.id, pid)
        topo.edges |= self.topology.edges
        return topo

    def partition(self, card: ModelCard, exclude: Collection[str] = ()) -> list[Partition]:
        """The ring for ``card`` over the current topology, without the nodes in ``exclude``.

        Raises:
            NoNodeAvailableError: no node can hold a layer.
        """
        return self.partition_plan(card, exclude).ring

    def partition_plan(self, card: ModelCard, exclude: Collection[str] = ()) -> PartitionPlan:
        """The ring for ``card`` and the nodes left out of it (see ``PartitioningStrategy.plan``),
        over the current topology without the nodes in ``exclude``: nodes whose engine cannot
        run the model's architecture are left out (``unsupported_reason``), and each node's
        share of layers is bounded by its memory over the model's real bytes per layer (the
        checkpoint's, or its parameters at the node engine's ``param_bytes``).

        Raises:
            NoNodeAvailableError: no node can hold a layer.
        """
        gone = set(exclude)
        left_out: dict[str, str] = {}
        for nid, info in self.topology.nodes.items():
            why = unsupported_reason(info.engine, card.args, card.architecture)
            if why is not None:
                left_out[nid] = why
        drop = gone | set(left_out)
        topo = self.topology
        if drop:
            topo = Topology({nid: n for nid, n in topo.nodes.items() if nid not in drop},
                            {(a, b) for a, b in topo.edges if a not in drop and b not in drop})
        if not topo.nodes:
            raise NoNodeAvailableError(f"no node can run {card.model_id}: {left_out or 'no node left'}")
        try:
            plan = self.partitioning_strategy.plan(topo, card.n_layers, layer_bytes(card, topo))
        except ValueError as e:
            raise NoNodeAvailableError(str(e)) from e
        return PartitionPlan(plan.ring, {**left_out, **plan.left_out}, plan.shortfall)
