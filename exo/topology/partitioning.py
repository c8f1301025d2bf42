"""Partitioning: which node of the ring runs which layers."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

from exo.topology.topology import Topology

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

    @classmethod
    def from_dict(cls, d: dict) -> "Partition":
        return cls(d["node_id"], d["address"], int(d["start_layer"]), int(d["end_layer"]))


class PartitioningStrategy(ABC):
    """Maps a topology and a model's layer count to a ring of partitions.

    Every node must compute the same ring from the same topology, so the result depends only on
    the topology's contents, never on which node computes it.
    """

    @abstractmethod
    def partition(self, topology: Topology, n_layers: int) -> list[Partition]:
        """Partitions in ring order, covering layers ``0 .. n_layers-1`` exactly once.

        Raises:
            ValueError: no node can hold a layer, or ``n_layers < 1``.
        """


class RingMemoryWeightedPartitioningStrategy(PartitioningStrategy):
    """Ring ordered by memory (descending, then node id), layers in proportion to memory.

    Layer counts come from the largest-remainder method (Hamilton apportionment), so they sum
    to ``n_layers`` exactly. A node whose share rounds to zero layers is left out of the ring
    (and logged) instead of being counted with an empty range; if there are more nodes than
    layers, the smallest are left out.
    """

    def partition(self, topology: Topology, n_layers: int) -> list[Partition]:
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        nodes = sorted(topology.nodes.values(), key=lambda n: (-n.capabilities.memory, n.node_id))
        nodes = [n for n in nodes if n.capabilities.memory > 0] or nodes
        if not nodes:
            raise ValueError("the topology has no nodes")
        while True:
            counts = self._apportion([max(n.capabilities.memory, 1) for n in nodes], n_layers)
            if all(c > 0 for c in counts):
                break
            dropped = [n.node_id for n, c in zip(nodes, counts) if c == 0]
            logger.warning("nodes %s are too small for a layer of this model; leaving them out of the ring", dropped)
            nodes = [n for n, c in zip(nodes, counts) if c > 0]
        ring, start = [], 0
        for node, count in zip(nodes, counts):
            ring.append(Partition(node.node_id, node.address, start, start + count - 1))
            start += count
        return ring

    @staticmethod
    def _apportion(weights: list[int], total: int) -> list[int]:
        s = sum(weights)
        quotas = [w * total / s for w in weights]
        counts = [int(q) for q in quotas]
        remainder = total - sum(counts)
        # ties broken by ring order (larger memory first), deterministic on every node
        order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
        for i in order[:remainder]:
            counts[i] += 1
        return counts
