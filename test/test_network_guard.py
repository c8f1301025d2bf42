"""The network rule guard refuses what would leave the machine, and allows loopback."""

import socket

import pytest
from network_guard import NetworkRuleError

from exo.networking.grpc.peer_handle import GRPCPeerHandle
from exo.networking.grpc.server import GRPCServer
from exo.topology.device_capabilities import DeviceCapabilities


def test_tcp_bind_to_all_interfaces_is_refused():
    with socket.socket() as s, pytest.raises(NetworkRuleError):
        s.bind(("0.0.0.0", 0))


def test_tcp_connect_outside_is_refused():
    with socket.socket() as s, pytest.raises(NetworkRuleError):
        s.connect(("192.0.2.1", 80))


def test_udp_send_outside_is_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(NetworkRuleError):
        s.sendto(b"x", ("192.0.2.1", 9))


def test_loopback_is_allowed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))


def test_grpc_server_and_peer_must_be_loopback():
    with pytest.raises(NetworkRuleError):
        GRPCServer(None, "0.0.0.0", 0)
    with pytest.raises(NetworkRuleError):
        GRPCPeerHandle("p", "192.0.2.1:5000", DeviceCapabilities("m", "c", 0))
