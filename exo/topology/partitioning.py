"""Partitioning: which node of the ring runs which layers."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Mapping

from exo.topology.topology import NodeInfo, Topology

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partition:
    """One node's place in the ring: its gRPC address and inclusive layer range."""

    node_id: str
    address: str
    start_layer: int
    end_layer: int

    @property
    def n_layers(self) -> int:
        return self.end_layer - self.start_layer + 1

    def to_dict(self) -> dict:
        return {"node_id": self.node_id, "address": self.address, "start_layer": self.start_layer, "end_layer": self.end_layer}


@dataclass(frozen=True)
class PartitionPlan:
    """A ring and the nodes of the topology left out of it.

    Attributes:
        ring: partitions in ring order, each with at least one layer, covering every layer once.
        left_out: node id -> why it holds no layer (too small for one layer, a share that rounds
            to zero layers, unknown memory).
        shortfall: None when the memory of the ring's nodes holds the model; else what is
            missing, e.g. "30 layers of 14160384 bytes need up to 424811520 bytes; the memory of
            the nodes present (a: 413000000 bytes) holds 29: 1 more layer (14160384 bytes)
            would need another node". The ring is then a plain proportional split that ignores
            capacities (it may not load).
    """

    ring: list[Partition]
    left_out: dict[str, str] = field(default_factory=dict)
    shortfall: str | None = None


class PartitioningStrategy(ABC):
    """Maps a topology and a model's layer count to a ring of partitions.

    Every node must compute the same ring from the same topology, so the result depends only on
    the topology's contents (and the model's sizes), never on which node computes it.
    """

    def partition(self, topology: Topology, n_layers: int, layer_bytes: int | Mapping[str, int] = 0) -> list[Partition]:
        """Partitions in ring order, covering layers ``0 .. n_layers-1`` exactly once (see ``plan``).

        Raises:
            ValueError: no node can hold a layer, or ``n_layers < 1``.
        """
        return self.plan(topology, n_layers, layer_bytes).ring

    @abstractmethod
    def plan(self, topology: Topology, n_layers: int, layer_bytes: int | Mapping[str, int] = 0) -> PartitionPlan:
        """The ring and the nodes left out of it.

        Args:
            topology: the cluster.
            n_layers: the model's transformer layers.
            layer_bytes: bytes one layer takes in memory (0: unknown, no size check), the same
                on every node or per node id (engines hold weights in different formats).

        Raises:
            ValueError: no node can hold a layer, ``n_layers < 1`` or ``layer_bytes < 0``.
        """


class RingMemoryWeightedPartitioningStrategy(PartitioningStrategy):
    """Ring ordered by memory (descending, then node id), layers in proportion to memory.

    Layer counts come from the largest-remainder method (Hamilton apportionment) in exact
    rational arithmetic, so they sum to ``n_layers`` exactly and every node computes the same
    counts. With ``layer_bytes`` known (for every node of the ring, when given per node):
    - a node whose memory is below one layer is left out ("too small to hold a layer");
    - no node gets more layers than its memory holds (``memory // layer_bytes``): a node whose
      proportional share exceeds that gets exactly its capacity, and the rest of the layers are
      apportioned among the others. When the whole cluster cannot hold the model, capacities are
      ignored (plain proportional shares) and a warning is logged.
    A node whose share rounds to zero layers is left out of the ring instead of being counted
    with an empty range; if there are more nodes than layers, the smallest are left out.
    Nodes with unknown memory (0 bytes) are left out unless no node's memory is known, in which
    case all share the layers equally.
    """

    def plan(self, topology: Topology, n_layers: int, layer_bytes: int | Mapping[str, int] = 0) -> PartitionPlan:
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        per_node = dict(layer_bytes) if isinstance(layer_bytes, Mapping) else {nid: layer_bytes for nid in topology.nodes}
        if any(b < 0 for b in per_node.values()):
            raise ValueError(f"layer_bytes must be >= 0, got {layer_bytes}")
        lb = lambda n: per_node.get(n.node_id, 0)  # noqa: E731
        nodes = sorted(topology.nodes.values(), key=lambda n: (-n.capabilities.memory, n.node_id))
        if not nodes:
            raise ValueError("the topology has no nodes")
        left_out: dict[str, str] = {}
        known = [n for n in nodes if n.capabilities.memory > 0]
        if known:
            for n in nodes:
                if n.capabilities.memory <= 0:
                    left_out[n.node_id] = "its memory is unknown (0 bytes)"
            nodes = known
            for n in nodes:
                if lb(n) and n.capabilities.memory < lb(n):
                    left_out[n.node_id] = (f"too small to hold a layer: {n.capabilities.memory} bytes of memory, "
                                           f"one layer needs {lb(n)}")
            nodes = [n for n in nodes if not lb(n) or n.capabilities.memory >= lb(n)]
            if not nodes:
                raise ValueError(f"no node can hold a layer: {left_out}")
        shortfall = None
        while True:
            weights = [max(n.capabilities.memory, 1) for n in nodes]
            sized = known and all(lb(n) for n in nodes)
            capacities = [n.capabilities.memory // lb(n) for n in nodes] if sized else None
            if capacities is not None and sum(capacities) < n_layers:
                logger.warning("the model's %d layers (%s bytes each) do not fit in the memory of %s; ignoring capacities",
                               n_layers, sorted({lb(n) for n in nodes}), [n.node_id for n in nodes])
                shortfall = _shortfall(nodes, capacities, n_layers, lb)
                capacities = None
            counts = apportion(weights, n_layers, capacities)
            if all(c > 0 for c in counts):
                break
            total = sum(n.capabilities.memory for n in nodes)
            for n, c in zip(nodes, counts):
                if c == 0:
                    left_out[n.node_id] = (f"its share of {n_layers} layers rounds to 0 ({n.capabilities.memory} of "
                                           f"{total} bytes of memory in the ring)")
            nodes = [n for n, c in zip(nodes, counts) if c > 0]
        if left_out:
            logger.debug("left out of the ring: %s", left_out)
        return PartitionPlan(_ring(nodes, counts), left_out, shortfall)


def _shortfall(nodes: list[NodeInfo], capacities: list[int], n_layers: int, lb: Callable[[NodeInfo], int]) -> str:
    """What the memory of ``nodes`` (holding ``capacities`` layers each) lacks for ``n_layers``."""
    sizes = sorted({lb(n) for n in nodes})
    each = " or ".join(str(b) for b in sizes)
    need = n_layers * max(sizes)
    held = sum(capacities)
    missing = n_layers - held
    members = ", ".join(f"{n.node_id}: {n.capabilities.memory} bytes" for n in nodes)
    return (f"{n_layers} layers of {each} bytes need up to {need} bytes; the memory of the nodes present ({members}) "
            f"holds {held}: {missing} more layer{'s' if missing != 1 else ''} ({missing * max(sizes)} bytes) "
            f"would need another node")


def _ring(nodes: list[NodeInfo], counts: list[int]) -> list[Partition]:
    ring, start = [], 0
    for node, count in zip(nodes, counts):
        ring.append(Partition(node.node_id, node.address, start, start + count - 1))
        start += count
    return ring


def apportion(weights: list[int], total: int, capacities: list[int] | None = None) -> list[int]:
    """Split ``total`` items in proportion to ``weights`` (largest-remainder method).

    Remainders are compared exactly (``Fraction``); ties go to the earlier index. With
    ``capacities`` (whose sum must be >= ``total``), an index whose share reaches its capacity
    gets exactly its capacity and the rest is apportioned among the others, repeatedly.

    Raises:
        ValueError: empty or non-positive weights, or capacities that cannot hold ``total``.
    """
    if not weights or any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {weights}")
    if capacities is not None and (len(capacities) != len(weights) or sum(capacities) < total):
        raise ValueError(f"capacities {capacities} cannot hold {total} items")
    counts = [0] * len(weights)
    active = list(range(len(weights)))
    remaining = total
    while active:
        s = sum(weights[i] for i in active)
        quotas = {i: Fraction(weights[i] * remaining, s) for i in active}
        capped = [i for i in active if capacities is not None and quotas[i] >= capacities[i]]
        if not capped:
            floors = {i: int(quotas[i]) for i in active}
            extra = remaining - sum(floors.values())
            order = sorted(active, key=lambda i: (-(quotas[i] - floors[i]), i))
            for i in order[:extra]:
                floors[i] += 1
            for i in active:
                counts[i] = floors[i]
            break
        for i in capped:
            counts[i] = capacities[i]
            remaining -= capacities[i]
            active.remove(i)
    return counts
