"""The cluster as every node sees it: nodes, their capabilities and addresses, and links."""

from __future__ import annotations

from dataclasses import dataclass, field

from exo.topology.device_capabilities import DeviceCapabilities


@dataclass(frozen=True)
class NodeInfo:
    """One node of the cluster.

    Attributes:
        node_id: the node's unique id.
        address: "host:port" of its gRPC server.
        capabilities: its device.
        engine: its inference engine's name ("torch", "tinygrad", ...; "" when not known yet):
            which architectures it can run (``exo.inference.inference_engine.unsupported_reason``).
        param_bytes: bytes per parameter its engine holds weights in (0: the checkpoint's own
            size, as the torch engine's native CPU kernels keep GGUF blocks).
    """

    node_id: str
    address: str
    capabilities: DeviceCapabilities
    engine: str = ""
    param_bytes: float = 0.0

    def to_dict(self) -> dict:
        return {"node_id": self.node_id, "address": self.address, "capabilities": self.capabilities.to_dict(),
                "engine": self.engine, "param_bytes": self.param_bytes}


@dataclass
class Topology:
    """Nodes by id and the directed links between them (``a -> b``: a sees b as a peer)."""

    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    edges: set[tuple[str, str]] = field(default_factory=set)

    def add_node(self, info: NodeInfo) -> None:
        self.nodes[info.node_id] = info

    def add_edge(self, from_id: str, to_id: str) -> None:
        self.edges.add((from_id, to_id))

    def to_dict(self) -> dict:
        return {
            "nodes": {nid: n.to_dict() for nid, n in sorted(self.nodes.items())},
            "edges": sorted([list(e) for e in self.edges]),
        }
