"""MDNSDiscovery: finds peers over multicast DNS (zeroconf), keeps them with gRPC health checks.

Every node registers a ``_exo._tcp.local.`` service carrying its node id, gRPC port, a short
capabilities JSON and, in a cluster with a secret, a tag derived from the secret (foreign
clusters are skipped before any connection; the real guard is the mutual TLS of gRPC). The tag
comes from the scrypt-stretched secret (``exo.networking.grpc.tls.cluster_tag``): guessing the
secret from it costs as much as guessing it from a node's certificate. Nothing else announced
depends on the secret.

mDNS announces joins quickly and clean leaves within milliseconds, but never drops a node that
died without a goodbye in useful time (record TTLs are clamped to >= 1125 s). Liveness
therefore comes from the health checks of ``PeerTracker``.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import re
from collections.abc import Coroutine
from typing import Any

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from exo.networking.address import join_host_port
from exo.networking.grpc.tls import cluster_tag
from exo.networking.peer_tracker import PeerHandleFactory, PeerTracker, TrackedDiscovery
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES, DeviceCapabilities

logger = logging.getLogger(__name__)

#: DNS-SD service type of exo nodes.
SERVICE_TYPE = "_exo._tcp.local."
#: How long resolving one service may take, in milliseconds.
RESOLVE_TIMEOUT_MS = 3000
#: Version of the TXT properties below.
TXT_VERSION = "1"
#: A TXT entry ("key=value") may hold at most 255 bytes.
MAX_TXT_ENTRY = 255


def capabilities_txt(caps: DeviceCapabilities, limit: int = MAX_TXT_ENTRY - len("caps=")) -> str:
    """Compact JSON of ``caps`` in at most ``limit`` bytes: floats rounded, and the longest of
    the model / chip / gpu names shortened when needed."""
    d = caps.to_dict()
    d["flops"] = {k: round(v, 3) for k, v in d["flops"].items()}

    def encode() -> str:
        return json.dumps(d, separators=(",", ":"), ensure_ascii=False)

    text = encode()
    while len(text.encode("utf-8")) > limit:
        longest = max(("model", "chip", "gpu"), key=lambda k: len(d[k]))
        if not d[longest]:
            raise ValueError(f"device capabilities do not fit in a TXT record: {text}")
        d[longest] = d[longest][: max(0, len(d[longest]) - 8)]
        text = encode()
    return text


def resolve_interfaces(interfaces: list[str] | None) -> list[ipaddress.IPv4Interface]:
    """The IPv4 interfaces (address + network) named by ``interfaces``.

    Each item is an IPv4 address of this machine or an interface name (e.g. "lo", "eth0");
    a name stands for all its IPv4 addresses. ``None`` means every IPv4 address of the machine.

    Raises:
        ValueError: an empty list, an unknown interface name, a name without an IPv4 address,
            or an address that no local interface has.
    """
    adapters = ifaddr.get_adapters()
    by_ip: dict[str, ipaddress.IPv4Interface] = {}
    by_name: dict[str, list[ipaddress.IPv4Interface]] = {}
    for adapter in adapters:
        v4 = [ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}") for ip in adapter.ips if ip.is_IPv4]
        for name in {adapter.name, adapter.nice_name}:
            by_name.setdefault(name, []).extend(v4)
        for iface in v4:
            by_ip[str(iface.ip)] = iface
    if interfaces is None:
        return list(by_ip.values())
    if not interfaces:
        raise ValueError("interfaces is empty; pass None to use every interface")
    result: list[ipaddress.IPv4Interface] = []
    for item in interfaces:
        try:
            ip = ipaddress.ip_address(item)
        except ValueError:
            ip = None
        if ip is not None:
            if not isinstance(ip, ipaddress.IPv4Address):
                raise ValueError(f"interface {item!r}: only IPv4 addresses are supported")
            if str(ip) not in by_ip:
                raise ValueError(f"interface {item!r}: no local interface has this address")
            found = [by_ip[str(ip)]]
        elif item in by_name:
            found = by_name[item]
            if not found:
                raise ValueError(f"interface {item!r} has no IPv4 address")
        else:
            raise ValueError(f"unknown interface {item!r}; known: {sorted(by_name)}")
        result.extend(f for f in found if f not in result)
    return result


def _instance_name(node_id: str) -> str:
    digest = hashlib.sha256(node_id.encode("utf-8")).hexdigest()
    label = node_id if re.fullmatch(r"[A-Za-z0-9_-]{1,63}", node_id) else f"exo-{digest[:16]}"
    return f"{label}.{SERVICE_TYPE}"


class MDNSDiscovery(TrackedDiscovery):
    """Discovery over mDNS on the given interfaces.

    Args:
        node_id: this node's id (its own service is ignored).
        node_port: TCP port of this node's gRPC server (1..65535).
        interfaces: IPv4 addresses or interface names zeroconf may use (see
            ``resolve_interfaces``); ``None`` means all interfaces. Tests must pass
            ``["127.0.0.1"]``.
        create_peer_handle: factory ``(node_id, "host:port", capabilities) -> PeerHandle``; it
            should carry the cluster secret into the handle.
        device_capabilities: this node's device, advertised to peers.
        advertise_host: IPv4 address to advertise instead of the interfaces' addresses.
        cluster_secret: when set, only peers advertising the same cluster tag are considered.
        health_check_interval: seconds between health checks of each peer.
        health_check_failures: consecutive failed checks that remove a peer.

    Raises:
        ValueError: bad port, unknown interface, or an ``advertise_host`` that is not IPv4.
    """

    def __init__(
        self,
        node_id: str,
        node_port: int,
        interfaces: list[str] | None,
        create_peer_handle: PeerHandleFactory,
        device_capabilities: DeviceCapabilities,
        advertise_host: str | None = None,
        cluster_secret: str | None = None,
        health_check_interval: float = 1.0,
        health_check_failures: int = 3,
    ) -> None:
        if not 0 < node_port < 65536:
            raise ValueError(f"node_port must be in 1..65535, got {node_port}")
        self.node_id = node_id
        self.node_port = node_port
        self.device_capabilities = device_capabilities
        self._explicit_interfaces = interfaces is not None
        self._local = resolve_interfaces(interfaces)
        if advertise_host is not None:
            try:
                ipaddress.IPv4Address(advertise_host)
            except ValueError as e:
                raise ValueError(f"advertise_host must be an IPv4 address, got {advertise_host!r}") from e
            self._advertised = [advertise_host]
        else:
            non_loopback = [str(i.ip) for i in self._local if not i.ip.is_loopback]
            self._advertised = non_loopback or [str(i.ip) for i in self._local]
        if not self._advertised:
            raise ValueError("no IPv4 address to advertise")
        self._zc_interfaces: Any = [str(i.ip) for i in self._local] if interfaces is not None else None
        self._tag = cluster_tag(cluster_secret) if cluster_secret else None
        self._tracker = PeerTracker(create_peer_handle, health_check_interval, health_check_failures)
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._registered = False
        self._names: dict[str, str] = {}  # service name -> node id
        self._present: set[str] = set()  # service names currently announced
        self._foreign: set[str] = set()  # node ids of other clusters, already reported
        self._tasks: set[asyncio.Task] = set()

    # --- Discovery ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start zeroconf, browse for peers and register this node's service.

        Raises:
            RuntimeError: already started.
            zeroconf.NonUniqueNameException: another node with this id is on the network.
            OSError: the interfaces cannot be bound.
        """
        if self._zc is not None:
            raise RuntimeError("MDNSDiscovery already started")
        if self._zc_interfaces is None:
            self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        else:
            self._zc = AsyncZeroconf(interfaces=self._zc_interfaces, ip_version=IPVersion.V4Only)
        try:
            self._tracker.start()
            self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_service_state_change])
            self._info = self._build_service_info()
            announce = await self._zc.async_register_service(self._info)
            self._registered = True
            self._spawn(self._await_announcement(announce))
        except BaseException:
            await self.stop()
            raise
        logger.info(
            "mDNS discovery of node %s started on %s, advertising %s port %d",
            self.node_id, self._zc_interfaces or "all interfaces", self._advertised, self.node_port,
        )

    async def stop(self) -> None:
        """Send the goodbye (awaited), stop browsing and health checks, close zeroconf.
        Safe to call twice."""
        zc, self._zc = self._zc, None
        if zc is None:
            return
        if self._registered and self._info is not None:
            self._registered = False
            try:
                goodbye = await zc.async_unregister_service(self._info)
                await goodbye  # the returned task sends the goodbye packets
            except Exception:
                logger.warning("mDNS unregister of node %s failed", self.node_id, exc_info=True)
        if self._browser is not None:
            browser, self._browser = self._browser, None
            await browser.async_cancel()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        await self._tracker.stop()
        await zc.async_close()
        self._names.clear()
        self._present.clear()
        logger.info("mDNS discovery of node %s stopped", self.node_id)

    # --- internals ---------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _await_announcement(self, announce: Any) -> None:
        try:
            await announce
        except Exception:
            logger.warning("mDNS announcement of node %s failed", self.node_id, exc_info=True)

    def _build_service_info(self) -> AsyncServiceInfo:
        properties = {
            "version": TXT_VERSION,
            "node_id": self.node_id,
            "port": str(self.node_port),
            "caps": capabilities_txt(self.device_capabilities),
        }
        if self._tag is not None:
            properties["cluster"] = self._tag
        digest = hashlib.sha256(self.node_id.encode("utf-8")).hexdigest()
        return AsyncServiceInfo(
            SERVICE_TYPE,
            _instance_name(self.node_id),
            port=self.node_port,
            properties=properties,
            server=f"exo-{digest[:16]}.local.",
            parsed_addresses=self._advertised,
        )

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if self._info is not None and name == self._info.name:
            return
        if state_change is ServiceStateChange.Removed:
            self._present.discard(name)
            node_id = self._names.pop(name, None)
            if node_id is not None:
                logger.info("mDNS: node %s unregistered", node_id)
                self._tracker.withdraw(node_id)
        else:  # Added or Updated
            self._present.add(name)
            self._spawn(self._resolve(name))

    def _pick_address(self, addresses: list[str]) -> str | None:
        for a in addresses:
            ip = ipaddress.IPv4Address(a)
            if any(ip in local.network for local in self._local):
                return a
        if not self._explicit_interfaces and addresses:
            return addresses[0]
        return None

    async def _resolve(self, name: str) -> None:
        try:
            await self._resolve_and_offer(name)
        except Exception:
            logger.exception("mDNS: handling service %s failed", name)

    async def _resolve_and_offer(self, name: str) -> None:
        zc = self._zc
        if zc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zc.zeroconf, RESOLVE_TIMEOUT_MS):
            logger.debug("mDNS: could not resolve %s", name)
            return
        if name not in self._present:
            return  # removed while resolving
        props = {k.decode("utf-8", "replace"): (v or b"").decode("utf-8", "replace") for k, v in info.properties.items()}
        node_id = props.get("node_id")
        if not node_id or node_id == self.node_id:
            return
        if props.get("cluster") != self._tag:
            # said once per node at INFO: a mistyped secret shows as nodes that never join
            level = logging.DEBUG if node_id in self._foreign else logging.INFO
            self._foreign.add(node_id)
            if not props.get("cluster"):
                why = "it has no cluster secret"
            elif self._tag is None:
                why = "it has a cluster secret and this node has none"
            else:
                why = "its cluster secret differs from this node's"
            logger.log(level, "mDNS: ignoring node %s of another cluster: %s", node_id, why)
            return
        if info.port is None:
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        host = self._pick_address(addresses)
        if host is None:
            logger.info("mDNS: node %s advertises %s, none reachable through %s", node_id, addresses, self._zc_interfaces)
            return
        try:
            caps = DeviceCapabilities.from_dict(json.loads(props["caps"]))
        except (KeyError, ValueError, TypeError) as e:
            logger.warning("mDNS: node %s has unreadable capabilities (%s); using unknown", node_id, e)
            caps = UNKNOWN_DEVICE_CAPABILITIES
        previous = self._names.get(name)
        if previous is not None and previous != node_id:
            self._tracker.withdraw(previous)
        self._names[name] = node_id
        self._tracker.offer(node_id, join_host_port(host, info.port), caps)
