"""Wiring one node: engine, gRPC server, discovery, Node and HTTP API, started and stopped together.

Used by the CLI (``exo.main``), the tests and the benchmarks, so all of them run nodes the same way.
"""

from __future__ import annotations

import ipaddress
import logging
import uuid
from pathlib import Path

from exo.config import Settings

logger = logging.getLogger(__name__)

TINYCHAT_DIR = Path(__file__).resolve().parents[2] / "tinychat"  # the bundled web UI


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


def bind_host(host: str | None, interfaces: list[str] | None) -> str:
    """``host``, or when None: 127.0.0.1 if ``interfaces`` are loopback-only, else 0.0.0.0."""
    if host:
        return host
    return "127.0.0.1" if is_loopback_only(interfaces) else "0.0.0.0"


class RunningNode:
    """A started node: ``settings``, ``node``, ``server`` (gRPC), ``discovery``, ``api`` (or None)."""

    def __init__(self, settings: Settings, node, server, discovery, api):
        self.settings, self.node, self.server, self.discovery, self.api = settings, node, server, discovery, api

    @property
    def api_base_url(self) -> str:
        host = bind_host(self.settings.server.host, self.settings.node.interfaces)
        host = "127.0.0.1" if host == "0.0.0.0" else host
        return f"http://{host}:{self.api.port}"

    async def stop(self) -> None:
        """Stop the API, the node (discovery included) and the gRPC server."""
        if self.api is not None:
            await self.api.stop()
        await self.node.stop()
        await self.server.stop()


async def start_node(settings: Settings) -> RunningNode:
    """Build and start one node from ``settings`` (``exo.config.load_settings``).

    Raises:
        ValueError: a bad setting (unknown engine, discovery module or interface).
        OSError: a port is already in use.
    """
    from exo.inference.inference_engine import default_engine_name, get_inference_engine
    from exo.networking.grpc.peer_handle import GRPCPeerHandle
    from exo.networking.grpc.server import GRPCServer
    from exo.orchestration.node import Node
    from exo.topology.device_capabilities import device_capabilities

    node_cfg, model_cfg, server_cfg = settings.node, settings.model, settings.server
    node_id = node_cfg.id or str(uuid.uuid4())
    secret = node_cfg.cluster_secret
    engine_name = model_cfg.inference_engine or default_engine_name()
    engine_options = settings.engine.constructor_options(engine_name)
    if engine_name == "mlx":
        from exo.inference.mlx import preload_blas

        preload_blas(settings.engine.mlx_blas)

    def create_engine():
        return get_inference_engine(engine_name, **engine_options)

    engine = create_engine()
    caps = device_capabilities(node_cfg.memory)

    def create_peer_handle(node_id, address, capabilities):
        return GRPCPeerHandle(node_id, address, capabilities, cluster_secret=secret)

    node = Node(node_id, engine, caps, create_peer_handle, default_model=model_cfg.default,
                response_timeout=server_cfg.response_timeout, create_engine=create_engine, max_models=model_cfg.max_models,
                idle_ttl=model_cfg.idle_ttl, chat_templates=dict(model_cfg.chat_templates),
                image_threads=model_cfg.image_threads)
    node_host = bind_host(node_cfg.host, node_cfg.interfaces)
    server = GRPCServer(node, node_host, node_cfg.port, cluster_secret=secret)
    await server.start()
    advertise = node_host if node_host != "0.0.0.0" else None
    if node_cfg.discovery_module == "mdns":
        from exo.networking.mdns.discovery import MDNSDiscovery

        discovery = MDNSDiscovery(node_id, server.port, node_cfg.interfaces, create_peer_handle, caps,
                                  advertise_host=advertise, cluster_secret=secret,
                                  health_check_interval=node_cfg.health_check_interval)
    elif node_cfg.discovery_module == "manual":
        from exo.networking.manual.discovery import ManualDiscovery

        if not node_cfg.discovery_config_path:
            await server.stop()
            raise ValueError("--discovery-module manual needs --discovery-config-path")
        discovery = ManualDiscovery(node_cfg.discovery_config_path, node_id, create_peer_handle,
                                    health_check_interval=node_cfg.health_check_interval)
    elif node_cfg.discovery_module == "none":
        discovery = None
    else:
        await server.stop()
        raise ValueError(f"unknown discovery module {node_cfg.discovery_module!r}; choose mdns, manual or none")
    address = f"{advertise or _primary_address(node_cfg.interfaces)}:{server.port}"
    await node.start(address, discovery)
    if node_cfg.wait_for_peers and discovery is not None:
        logger.info("waiting for %d peers", node_cfg.wait_for_peers)
        await discovery.discover_peers(node_cfg.wait_for_peers)
        await node.update_topology()
    api = None
    if server_cfg.enabled:
        from exo.api.chat_api.api import ChatAPI

        web_ui = server_cfg.web_ui_dir or TINYCHAT_DIR
        tinychat = web_ui if Path(web_ui).is_dir() else None
        api = ChatAPI(node, default_model=model_cfg.default, response_timeout=server_cfg.response_timeout,
                      tinychat_dir=tinychat, **settings.api_options())
        await api.run(bind_host(server_cfg.host, node_cfg.interfaces), server_cfg.port)
    return RunningNode(settings, node, server, discovery, api)


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
