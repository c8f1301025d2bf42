"""Mutual TLS of a cluster with a secret (exo.networking.grpc.tls), against a real GRPCServer on
loopback: the same secret connects; another secret, none, a plaintext gRPC client or a raw TLS
client with a foreign certificate get nothing; without a secret the log says so plainly."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
import tempfile

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc import node_service_pb2_grpc as pb_grpc
from exo.networking.grpc import tls
from exo.networking.grpc.peer_handle import GRPCPeerHandle
from exo.networking.grpc.server import GRPCServer
from exo.networking.mdns.discovery import MDNSDiscovery
from exo.orchestration.request import TokenResult
from exo.topology.device_capabilities import DeviceCapabilities

CAPS = DeviceCapabilities("test", "cpu", 1 << 30)
SECRET = "tls-test-secret-0123456789abcdef"
OTHER = "tls-test-other-secret-0123456789"
#: The client preface of HTTP/2 and an empty SETTINGS frame: what a gRPC client sends first.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


class Node:
    """Stands in for the Node: healthy, records results."""

    id = "b"

    def __init__(self) -> None:
        self.results: list[str] = []

    def is_healthy(self) -> bool:
        return True

    async def process_result(self, result: TokenResult) -> None:
        self.results.append(result.request_id)


def test_the_ca_is_derived_from_the_secret_alone() -> None:
    key = tls.ca_key(SECRET)
    assert key.private_numbers() == tls.ca_key(SECRET).private_numbers()
    assert key.private_numbers() != tls.ca_key(OTHER).private_numbers()
    ca = tls.ca_certificate(key)
    assert ca.public_bytes(tls.serialization.Encoding.DER) == tls.ca_certificate(tls.ca_key(SECRET)).public_bytes(
        tls.serialization.Encoding.DER)  # deterministic ECDSA: every node builds the same CA certificate
    mine = x509.load_pem_x509_certificate(tls.cluster_credentials(SECRET).cert_pem)
    mine.verify_directly_issued_by(ca)
    assert mine.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == [tls.TARGET_NAME]
    theirs = x509.load_pem_x509_certificate(tls.make_credentials(OTHER).cert_pem)
    with pytest.raises(Exception):
        theirs.verify_directly_issued_by(ca)
    # a node's own key is random, never derived from the secret
    assert tls.make_credentials(SECRET).key_pem != tls.make_credentials(SECRET).key_pem
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    with pytest.raises(ValueError):
        tls.stretch_secret("")


def test_mdns_announces_nothing_cheap_to_test_a_guess_against() -> None:
    info = MDNSDiscovery("node-a", 5000, ["127.0.0.1"], GRPCPeerHandle, CAPS, cluster_secret=SECRET)._build_service_info()
    txt = b"".join(k + (v or b"") for k, v in info.properties.items())
    tag = tls.cluster_tag(SECRET)
    assert info.properties[b"cluster"] == tag.encode() and tag != tls.cluster_tag(OTHER)
    # neither the secret nor a fast hash of it: the tag is a function of the scrypt-stretched secret
    for leak in (SECRET.encode(), hashlib.sha256(SECRET.encode()).hexdigest()[:16].encode()):
        assert leak not in txt


@pytest.mark.asyncio
async def test_only_the_same_secret_completes_the_handshake(caplog: pytest.LogCaptureFixture) -> None:
    node = Node()
    server = GRPCServer(node, "127.0.0.1", 0, cluster_secret=SECRET)
    await server.start()
    address = f"127.0.0.1:{server.port}"
    right = GRPCPeerHandle("b", address, CAPS, cluster_secret=SECRET)
    wrong = GRPCPeerHandle("b", address, CAPS, cluster_secret=OTHER)
    none = GRPCPeerHandle("b", address, CAPS)
    try:
        assert await right.health_check()
        await right.send_result(TokenResult("from-right"))
        with caplog.at_level(logging.WARNING, logger="exo.networking.grpc.peer_handle"):
            assert not await wrong.health_check()
        assert any("TLS handshake" in r.message and "wrong cluster secret" in r.message for r in caplog.records)
        with pytest.raises(ConnectionError, match="TLS handshake failed"):
            await wrong.send_result(TokenResult("from-wrong"))
        assert not await none.health_check()
        with pytest.raises(ConnectionError):
            await none.send_result(TokenResult("from-none"))
        # a plaintext gRPC client gets nothing: the call fails before reaching any method
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.NodeServiceStub(channel).HealthCheck(pb.HealthCheckRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert node.results == ["from-right"]
        assert await right.health_check()  # the server is unharmed
    finally:
        for h in (right, wrong, none):
            await h.disconnect()
        await server.stop(grace=0)


def _raw_tls_exchange(port: int, creds: tls.ClusterCredentials | None) -> bytes:
    """Connect with Python's ssl (no check of the server: the worst case for the server), send a
    gRPC client's first bytes, and return every byte of application data the server sent back."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    if creds is not None:
        with tempfile.NamedTemporaryFile(suffix=".pem") as f:
            f.write(creds.cert_pem + creds.key_pem)
            f.flush()
            ctx.load_cert_chain(f.name)
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=tls.TARGET_NAME) as s:
                s.sendall(H2_PREFACE)
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    received += chunk
                    if len(received) >= 9:
                        break  # a whole HTTP/2 frame header: the server talks
        except (ssl.SSLError, ConnectionError, socket.timeout):
            pass
    return received


@pytest.mark.asyncio
async def test_a_raw_tls_client_without_a_certificate_of_the_cluster_gets_nothing() -> None:
    server = GRPCServer(Node(), "127.0.0.1", 0, cluster_secret=SECRET)
    await server.start()
    try:
        foreign = await asyncio.to_thread(_raw_tls_exchange, server.port, tls.make_credentials(OTHER))
        anonymous = await asyncio.to_thread(_raw_tls_exchange, server.port, None)
        member = await asyncio.to_thread(_raw_tls_exchange, server.port, tls.make_credentials(SECRET))
    finally:
        await server.stop(grace=0)
    assert foreign == b"" and anonymous == b""
    assert len(member) >= 9 and member[3] == 0x04  # control: a certificate of the cluster gets the server's SETTINGS


@pytest.mark.asyncio
async def test_without_a_secret_the_log_says_traffic_is_unencrypted(caplog: pytest.LogCaptureFixture) -> None:
    server = GRPCServer(Node(), "127.0.0.1", 0)
    with caplog.at_level(logging.WARNING, logger="exo.networking.grpc.server"):
        await server.start()
    handle = GRPCPeerHandle("b", f"127.0.0.1:{server.port}", CAPS)
    try:
        assert await handle.health_check()  # works as before, in plaintext
    finally:
        await handle.disconnect()
        await server.stop(grace=0)
    assert any(r.levelno == logging.WARNING and "unencrypted and unauthenticated" in r.message for r in caplog.records)


def test_generate_secret_is_long_and_random() -> None:
    a, b = tls.generate_secret(), tls.generate_secret()
    assert a != b and len(a) >= tls.MIN_SECRET_LENGTH
