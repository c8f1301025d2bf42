"""Ring memory-weighted partitioning: exact expected layer ranges."""

import pytest

from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.partitioning import Partition, RingMemoryWeightedPartitioningStrategy
from exo.topology.topology import NodeInfo, Topology

GiB = 1 << 30


def topology(**memories):
    t = Topology()
    for node_id, mem in memories.items():
        t.add_node(NodeInfo(node_id, f"{node_id}:1", DeviceCapabilities("m", "c", int(mem))))
    return t


def ranges(ring):
    return [(p.node_id, p.start_layer, p.end_layer) for p in ring]


strategy = RingMemoryWeightedPartitioningStrategy()


def test_equal_memory_splits_evenly():
    assert ranges(strategy.partition(topology(a=16 * GiB, b=16 * GiB), 30)) == [("a", 0, 14), ("b", 15, 29)]


def test_ring_order_by_memory_then_id():
    ring = strategy.partition(topology(small=4 * GiB, big=12 * GiB), 32)
    assert ranges(ring) == [("big", 0, 23), ("small", 24, 31)]
    assert ring[0] == Partition("big", "big:1", 0, 23)


def test_three_nodes_largest_remainder():
    assert ranges(strategy.partition(topology(a=1 * GiB, b=1 * GiB, c=1 * GiB), 32)) == [("a", 0, 10), ("b", 11, 21), ("c", 22, 31)]


def test_very_uneven_memory_drops_node_with_no_layer():
    ring = strategy.partition(topology(huge=64 * GiB, tiny=256 << 20), 30)
    assert ranges(ring) == [("huge", 0, 29)]
    assert all(p.n_layers > 0 for p in ring)


def test_very_uneven_memory_keeps_node_with_one_layer():
    assert ranges(strategy.partition(topology(big=29 * GiB, little=1 * GiB), 30)) == [("big", 0, 28), ("little", 29, 29)]


def test_more_nodes_than_layers():
    ring = strategy.partition(topology(a=5, b=4, c=3, d=2, e=1), 3)
    assert sum(p.n_layers for p in ring) == 3 and all(p.n_layers > 0 for p in ring)
    assert ranges(ring) == [("a", 0, 0), ("b", 1, 1), ("c", 2, 2)]


def test_same_ring_whatever_the_insertion_order():
    t1 = topology(a=8 * GiB, b=3 * GiB, c=5 * GiB)
    t2 = topology(c=5 * GiB, a=8 * GiB, b=3 * GiB)
    assert strategy.partition(t1, 30) == strategy.partition(t2, 30)


def test_empty_topology_raises():
    with pytest.raises(ValueError):
        strategy.partition(Topology(), 30)
