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


MiB = 1 << 20
LAYER = 14 * MiB  # about one SmolLM2 layer in float32


def plan(layer_bytes=LAYER, n_layers=30, **memories):
    return strategy.plan(topology(**memories), n_layers, layer_bytes)


def test_node_too_small_for_one_layer_is_left_out_and_says_why():
    p = plan(a=1 * GiB, b=1 * GiB, tiny=10 * MiB)
    assert ranges(p.ring) == [("a", 0, 14), ("b", 15, 29)]
    assert set(p.left_out) == {"tiny"}
    assert "too small to hold a layer" in p.left_out["tiny"] and str(LAYER) in p.left_out["tiny"]


def test_no_node_can_hold_a_layer_raises():
    with pytest.raises(ValueError, match="no node can hold a layer"):
        plan(a=10 * MiB, b=5 * MiB)


def test_capacity_caps_a_node_at_what_its_memory_holds():
    # proportional shares 27.3 / 2.7; "small" holds only 2 layers of 14 MiB, so it gets 2 and big the rest
    p = plan(big=400 * MiB, small=40 * MiB)
    assert ranges(p.ring) == [("big", 0, 27), ("small", 28, 29)]
    assert p.left_out == {}


def test_capacities_redistribute_over_several_nodes():
    # c's share is 30 * 41 / 491 = 2.5 layers but 41 MiB hold only 2 of 14 MiB: c gets 2, and a and b
    # share the other 28 by memory (18.7 / 9.3)
    p = plan(a=300 * MiB, b=150 * MiB, c=41 * MiB)
    assert ranges(p.ring) == [("a", 0, 18), ("b", 19, 27), ("c", 28, 29)]
    # without the cap the largest remainder would have given c 3 layers
    assert ranges(plan(layer_bytes=0, a=300 * MiB, b=150 * MiB, c=41 * MiB).ring) == [("a", 0, 17), ("b", 18, 26), ("c", 27, 29)]


def test_cluster_too_small_for_the_model_falls_back_to_proportional_shares():
    p = plan(a=200 * MiB, b=100 * MiB)  # holds 14 + 7 of 30 layers
    assert ranges(p.ring) == [("a", 0, 19), ("b", 20, 29)]


def test_unknown_memory_is_left_out_when_others_are_known():
    p = plan(layer_bytes=0, a=8 * GiB, ghost=0)
    assert ranges(p.ring) == [("a", 0, 29)] and "unknown" in p.left_out["ghost"]


def test_all_unknown_memory_shares_equally():
    assert ranges(strategy.partition(topology(a=0, b=0, c=0), 30)) == [("a", 0, 9), ("b", 10, 19), ("c", 20, 29)]


def test_share_rounding_to_zero_is_reported():
    p = plan(layer_bytes=0, huge=64 * GiB, tiny=256 << 20)
    assert "rounds to 0" in p.left_out["tiny"]


def test_apportion_is_exact_and_capped():
    from exo.topology.partitioning import apportion

    assert apportion([1, 1, 1], 32) == [11, 11, 10]
    assert apportion([3, 1], 30) == [23, 7]  # 22.5 / 7.5: the tie goes to the first
    assert apportion([10, 1], 30, [30, 2]) == [28, 2]
    assert apportion([1, 1], 3, [1, 5]) == [1, 2]
    with pytest.raises(ValueError):
        apportion([1, 1], 10, [2, 2])
    with pytest.raises(ValueError):
        apportion([0, 1], 10)


def test_very_uneven_memory_with_many_nodes_never_counts_an_empty_range():
    memories = {f"n{i}": (1 << (i * 2)) * MiB for i in range(8)}  # 1 MiB .. 16 GiB
    p = plan(layer_bytes=LAYER, **memories)
    assert all(r.n_layers > 0 for r in p.ring)
    assert sum(r.n_layers for r in p.ring) == 30
    assert [r.node_id for r in p.ring] == ["n7", "n6", "n5"]
    assert ranges(p.ring) == [("n7", 0, 22), ("n6", 23, 28), ("n5", 29, 29)]
    assert set(p.left_out) == {"n0", "n1", "n2", "n3", "n4"}


def test_bytes_per_layer_of_the_shipped_model_as_each_engine_holds_it():
    """A node's share is sized by the model's real bytes per layer: the GGUF's own (Q4_1 layers)
    on a node whose engine keeps the file's blocks, its parameters at 4 bytes on one that holds
    float32."""
    from exo.models.gguf import open_gguf
    from exo.models.sources import STORE
    from exo.orchestration.node import Node
    from exo.topology.topology import NodeInfo, Topology

    # SmolLM2-135M: hidden 576, 9 heads of 64 (3 KV heads), FFN 1536
    per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536 + 2 * 576
    card = STORE.card("smollm2-135m")
    assert card.args.layer_params() == per_layer
    file_bytes = sum(t.nbytes for t in open_gguf(card.path).tensors.values() if t.name.startswith("blk.0."))
    assert card.layer_bytes == (file_bytes,) * 30 and card.max_layer_bytes == file_bytes
    caps = DeviceCapabilities("test", "test", 8 * GiB)
    topo = Topology({"native": NodeInfo("native", "a:1", caps, "torch", 0.0), "f32": NodeInfo("f32", "b:1", caps, "mlx", 4.0)})
    assert Node._layer_bytes(card, topo) == {"native": file_bytes, "f32": per_layer * 4}
