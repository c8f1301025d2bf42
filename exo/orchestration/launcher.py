"""Wiring one node: engine, gRPC server, discovery, Node and HTTP API, started and stopped together.

Used by the CLI (``exo.main``), the tests and the benchmarks, so all of them run nodes the same way.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_API_PORT = 52415
TINYCHAT_DIR = Path(__file__).resolve().parents[2] / "tinychat"


def parse_interfaces(value: str | None) -> list[str] | None:
    """Parse a comma list of addresses or interface names; None or "all" means every interface."""
    if value is None or value.strip() in ("", "all"):
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def is_loopback_only(interfaces: list[str] | None) -> bool:
    """True when every entry is a loopback address or the loopback interface ``lo``."""
    if not interfaces:
        return False
    for i in interfaces:
        if i == "lo":
            continue
        try:
            if not ipaddress.ip_address(i).is_loopback:
                return False
        except ValueError:
            return False
    return True


@dataclass
class NodeConfig:
    """Everything one node needs; field names follow the CLI flags.

    ``node_host`` / ``api_host`` None means: 127.0.0.1 when ``interfaces`` is loopback-only,
    else all interfaces (0.0.0.0). Ports 0 pick a free port.
    """

    node_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    node_host: str | None = None
    node_port: int = 0
    api_host: str | None = None
    api_port: int = DEFAULT_API_PORT
    discovery_module: str = "mdns"
    discovery_config_path: str | None = None
    interfaces: list[str] | None = None
    inference_engine: str | None = None
    inference_engine_options: dict = field(default_factory=dict)  # keyword arguments of the engine's constructor
    api_options: dict = field(default_factory=dict)  # keyword arguments of ChatAPI (auth, rate_limit, defaults, cors_allow_origin)
    default_model: str = "smollm2-135m"
    max_models: int = 3  # models whose shards a node holds at once
    model_idle_ttl: float = 300.0  # seconds a model's shard stays loaded unused
    chat_templates: dict = field(default_factory=dict)  # model id -> template for models without one
    batch_invariant: bool = True  # torch engine: logits independent of the batch (see TorchInferenceEngine)
    wait_for_peers: int = 0
    cluster_secret: str | None = None
    memory: int | None = None
    serve_api: bool = True
    tinychat_dir: Path | None = TINYCHAT_DIR
    response_timeout: float = 60.0
    health_check_interval: float = 1.0

    def resolved_host(self, host: str | None) -> str:
        if host:
            return host
        return "127.0.0.1" if is_loopback_only(self.interfaces) else "0.0.0.0"


class RunningNode:
    """A started node: ``node``, ``server`` (gRPC), ``discovery``, ``api`` (or None)."""

    def __init__(self, config: NodeConfig, node, server, discovery, api):
        self.config, self.node, self.server, self.discovery, self.api = config, node, server, discovery, api

    @property
    def api_base_url(self) -> str:
        host = self.config.resolved_host(self.config.api_host)
        host = "127.0.0.1" if host == "0.0.0.0" else host
        return f"http://{host}:{self.api.port}"

    async def stop(self) -> None:
        """Stop the API, the node (discovery included) and the gRPC server."""
        if self.api is not None:
            await self.api.stop()
        await self.node.stop()
        await self.server.stop()


async def start_node(config: NodeConfig) -> RunningNode:
    """Build and start one node from ``config``.

    Raises:
        ValueError: a bad setting (unknown engine, discovery module or interface).
        OSError: a port is already in use.
    """
    from exo.inference.inference_engine import default_engine_name, get_inference_engine
    from exo.networking.grpc.peer_handle import GRPCPeerHandle
    from exo.networking.grpc.server import GRPCServer
    from exo.orchestration.node import Node
    from exo.topology.device_capabilities import device_capabilities

    secret = config.cluster_secret if config.cluster_secret is not None else os.environ.get("EXO_CLUSTER_SECRET") or None
    engine_name = config.inference_engine or default_engine_name()

    engine_options = dict(config.inference_engine_options)
    if engine_name == "torch":  # the one engine that batches requests' decode steps
        engine_options.setdefault("batch_invariant", config.batch_invariant)

    def create_engine():
        return get_inference_engine(engine_name, **engine_options)

    engine = create_engine()
    caps = device_capabilities(config.memory)

    def create_peer_handle(node_id, address, capabilities):
        return GRPCPeerHandle(node_id, address, capabilities, cluster_secret=secret)

    node = Node(config.node_id, engine, caps, create_peer_handle, default_model=config.default_model,
                response_timeout=config.response_timeout, create_engine=create_engine, max_models=config.max_models,
                idle_ttl=config.model_idle_ttl, chat_templates=config.chat_templates)
    node_host = config.resolved_host(config.node_host)
    server = GRPCServer(node, node_host, config.node_port, cluster_secret=secret)
    await server.start()
    advertise = node_host if node_host != "0.0.0.0" else None
    if config.discovery_module == "mdns":
        from exo.networking.mdns.discovery import MDNSDiscovery

        discovery = MDNSDiscovery(config.node_id, server.port, config.interfaces, create_peer_handle, caps,
                                  advertise_host=advertise, cluster_secret=secret,
                                  health_check_interval=config.health_check_interval)
    elif config.discovery_module == "manual":
        from exo.networking.manual.discovery import ManualDiscovery

        if not config.discovery_config_path:
            await server.stop()
            raise ValueError("--discovery-module manual needs --discovery-config-path")
        discovery = ManualDiscovery(config.discovery_config_path, config.node_id, create_peer_handle,
                                    health_check_interval=config.health_check_interval)
    elif config.discovery_module == "none":
        discovery = None
    else:
        await server.stop()
        raise ValueError(f"unknown discovery module {config.discovery_module!r}; choose mdns, manual or none")
    address = f"{advertise or _primary_address(config.interfaces)}:{server.port}"
    await node.start(address, discovery)
    if config.wait_for_peers and discovery is not None:
        logger.info("waiting for %d peers", config.wait_for_peers)
        await discovery.discover_peers(config.wait_for_peers)
        await node.update_topology()
    api = None
    if config.serve_api:
        from exo.api.chat_api.api import ChatAPI

        tinychat = config.tinychat_dir if config.tinychat_dir and Path(config.tinychat_dir).is_dir() else None
        api = ChatAPI(node, default_model=config.default_model, response_timeout=config.response_timeout, tinychat_dir=tinychat,
                      **config.api_options)
        await api.run(config.resolved_host(config.api_host), config.api_port)
    return RunningNode(config, node, server, discovery, api)


def _primary_address(interfaces: list[str] | None) -> str:
    """The IPv4 address peers should dial: the first of ``interfaces`` (an address, or an
    interface's first IPv4 address), else the first non-loopback IPv4 address of this machine."""
    import ifaddr

    adapters = ifaddr.get_adapters()
    for want in interfaces or []:
        try:
            ipaddress.ip_address(want)
            return want
        except ValueError:
            for a in adapters:
                if a.nice_name == want or a.name == want:
                    for ip in a.ips:
                        if isinstance(ip.ip, str):
                            return ip.ip
    for a in adapters:
        for ip in a.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                return ip.ip
    return "127.0.0.1"
