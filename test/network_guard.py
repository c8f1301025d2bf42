"""The network rule, enforced for the whole test process: nothing leaves this machine.

Installed once at session start (before any fixture of any scope), so no test or fixture can
forget it:
- ``Zeroconf`` / ``AsyncZeroconf`` need an explicit, loopback-only ``interfaces`` list;
- TCP sockets may bind and connect only to loopback addresses (binding 0.0.0.0 is refused: it
  would listen on every interface);
- UDP sockets may send only to loopback addresses or to the mDNS group on port 5353 (which
  zeroconf, bound to loopback by the rule above, sends out of the loopback interface);
- the gRPC server and peer handles (their sockets live in gRPC's C core) take only loopback
  addresses.
Processes a test starts itself must be given loopback addresses, or run inside network
namespaces that the test creates.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import socket

MDNS_GROUP = ("224.0.0.251", 5353)


class NetworkRuleError(RuntimeError):
    """A test tried to reach, or listen on, something outside this machine."""


def is_loopback(host: object) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host).strip("[]")).is_loopback
    except ValueError:
        return False


def check_loopback_interfaces(cls_name: str, bound: inspect.BoundArguments) -> None:
    """Raise NetworkRuleError unless ``interfaces`` was passed explicitly as loopback addresses."""
    if bound.arguments.get("zc") is not None:
        return  # AsyncZeroconf wrapping an existing (already checked) Zeroconf
    if "interfaces" not in bound.arguments:
        raise NetworkRuleError(f"NETWORK RULE: {cls_name}() in tests needs interfaces=['127.0.0.1']")
    interfaces = bound.arguments["interfaces"]
    if isinstance(interfaces, (str, bytes)) or not isinstance(interfaces, (list, tuple)) or not interfaces:
        raise NetworkRuleError(f"NETWORK RULE: {cls_name}(interfaces={interfaces!r}) must be a list of loopback addresses")
    bad = [i for i in interfaces if not is_loopback(i)]
    if bad:
        raise NetworkRuleError(f"NETWORK RULE: {cls_name}(interfaces={interfaces!r}) has non-loopback entries {bad}")


def _guard_init(cls: type, check) -> None:
    original = cls.__init__
    if getattr(original, "_network_guarded", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def guarded(self, *args, **kwargs):
        check(cls.__name__, signature.bind(self, *args, **kwargs))
        original(self, *args, **kwargs)

    guarded._network_guarded = True
    cls.__init__ = guarded


def _inet(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


def _is_tcp(sock: socket.socket) -> bool:
    return sock.type & socket.SOCK_STREAM == socket.SOCK_STREAM and not sock.type & socket.SOCK_DGRAM == socket.SOCK_DGRAM


def install() -> None:
    """Install every guard in this process (idempotent)."""
    if getattr(socket.socket, "_network_guarded", False):
        return
    orig_bind, orig_connect, orig_connect_ex, orig_sendto = (
        socket.socket.bind, socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto)

    def bind(self, address):
        if _inet(self) and _is_tcp(self) and not is_loopback(address[0]):
            raise NetworkRuleError(f"NETWORK RULE: TCP bind to {address!r}; tests bind to 127.0.0.1")
        return orig_bind(self, address)

    def _check_dest(self, address):
        if _inet(self) and not is_loopback(address[0]) and not (not _is_tcp(self) and tuple(address[:2]) == MDNS_GROUP):
            raise NetworkRuleError(f"NETWORK RULE: connection to {address!r}; tests talk to loopback only")

    def connect(self, address):
        _check_dest(self, address)
        return orig_connect(self, address)

    def connect_ex(self, address):
        _check_dest(self, address)
        return orig_connect_ex(self, address)

    def sendto(self, data, *args):
        address = args[-1]
        _check_dest(self, address)
        return orig_sendto(self, data, *args)

    socket.socket.bind, socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = bind, connect, connect_ex, sendto
    socket.socket._network_guarded = True

    try:
        from zeroconf import Zeroconf
        from zeroconf.asyncio import AsyncZeroconf

        _guard_init(Zeroconf, check_loopback_interfaces)
        _guard_init(AsyncZeroconf, check_loopback_interfaces)
    except ImportError:
        pass

    from exo.networking.grpc.peer_handle import GRPCPeerHandle
    from exo.networking.grpc.server import GRPCServer

    def check_server(cls_name, bound):
        if not is_loopback(bound.arguments["host"]):
            raise NetworkRuleError(f"NETWORK RULE: {cls_name} on host {bound.arguments['host']!r}; tests use 127.0.0.1")

    def check_peer(cls_name, bound):
        host = bound.arguments["address"].rsplit(":", 1)[0]
        if not is_loopback(host):
            raise NetworkRuleError(f"NETWORK RULE: {cls_name} to {bound.arguments['address']!r}; tests use 127.0.0.1")

    _guard_init(GRPCServer, check_server)
    _guard_init(GRPCPeerHandle, check_peer)
