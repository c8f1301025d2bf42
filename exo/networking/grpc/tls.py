"""Mutual TLS of a cluster, from its cluster secret: every key and certificate a node needs.

Nothing but the secret is shared, and the secret never travels. From it every node derives,
with no coordination, the same cluster CA:

1. ``stretch_secret``: scrypt(secret, salt=``SCRYPT_SALT``, n=2**15, r=8, p=1) -> 32 bytes
   (about 0.1 s and 32 MiB per guess, so guessing a secret from anything the cluster shows
   is costly; it still cannot make a short or guessable secret safe: use a long random one,
   see ``generate_secret``).
2. ``ca_key``: an EC P-256 private key whose scalar is HKDF-SHA256(stretched, info=``CA_KEY_INFO``,
   48 bytes) reduced into [1, n-1].
3. ``ca_certificate``: a self-signed certificate of that key with fixed subject
   (``CN=exo cluster CA``), serial (1) and validity (2000-01-01 .. 9999-12-31), CA:TRUE,
   path length 0, signed with deterministic ECDSA (RFC 6979) where ``cryptography`` supports it.
   Every node holding the secret thus trusts the same CA name and key.

At start each node makes a fresh P-256 key of its own and a leaf certificate signed by the CA
(``leaf_certificate``: SAN DNS ``TARGET_NAME``, server and client auth, valid from a day before
now for ``LEAF_VALIDITY``). Servers require a client certificate of the CA
(``require_client_auth``); clients check the server's certificate against the CA and the name
``TARGET_NAME`` (the channel option ``grpc.ssl_target_name_override``, since peers are dialled
by IP address). A node with another secret, or none, holds no certificate of this CA: the
handshake fails both ways, and nothing (not even the gRPC method names) is exchanged in clear.

``cluster_tag`` (announced over mDNS to skip other clusters before connecting) is derived from
the stretched secret too, so it offers no cheaper way to guess the secret than the TLS does.

Errors: ``ValueError`` for an empty secret; ``cryptography`` raises nothing else in normal use.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

#: The DNS name in every node's certificate, and the name every client checks.
TARGET_NAME = "exo-cluster"
#: Salt of the scrypt stretching of the secret (fixed: every node must derive the same CA).
SCRYPT_SALT = b"exo cluster secret v1"
#: scrypt cost parameters: 2**15 * 8 * 128 bytes = 32 MiB of memory per derivation.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
#: HKDF labels of what is derived from the stretched secret.
CA_KEY_INFO = b"exo cluster CA key P-256"
TAG_INFO = b"exo mdns cluster tag"
#: Subject (and issuer) common name of the cluster CA.
CA_COMMON_NAME = "exo cluster CA"
CA_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
CA_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)
#: How long a node's own certificate is valid (it makes a new one at every start).
LEAF_VALIDITY = datetime.timedelta(days=3650)
#: Secrets shorter than this (in characters) are warned about at start.
MIN_SECRET_LENGTH = 24
#: Channel option that makes a client check ``TARGET_NAME`` instead of the dialled address.
TARGET_NAME_OPTION = ("grpc.ssl_target_name_override", TARGET_NAME)
#: Words of a gRPC status detail that mark a failed TLS handshake (BoringSSL's and gRPC's texts).
_HANDSHAKE_WORDS = ("ssl", "handshake", "tls", "certificate", "alert")


def generate_secret() -> str:
    """A new cluster secret: 32 random bytes, URL-safe base64 (43 characters).
    ``python -m exo.networking.grpc.tls`` prints one."""
    return secrets.token_urlsafe(32)


def looks_like_handshake_failure(details: str | None) -> bool:
    """Whether a gRPC status detail tells of a failed TLS handshake (a wrong or missing secret
    on one side, or a plaintext peer)."""
    text = (details or "").lower()
    return any(w in text for w in _HANDSHAKE_WORDS)


@functools.lru_cache(maxsize=8)
def stretch_secret(secret: str) -> bytes:
    """scrypt of the secret's UTF-8 bytes (see the module docstring); cached per secret.

    Raises:
        ValueError: ``secret`` is empty.
    """
    if not secret:
        raise ValueError("the cluster secret is empty")
    kdf = Scrypt(salt=SCRYPT_SALT, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return kdf.derive(secret.encode("utf-8"))


def _hkdf(stretched: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(stretched)


def cluster_tag(secret: str) -> str:
    """16 hex digits naming the cluster in mDNS: HMAC-SHA256(HKDF(stretched secret, ``TAG_INFO``),
    "tag"). Guessing the secret from it costs a scrypt per guess, as from a certificate."""
    key = _hkdf(stretch_secret(secret), TAG_INFO, 32)
    return hmac.new(key, b"tag", hashlib.sha256).hexdigest()[:16]


def ca_key(secret: str) -> ec.EllipticCurvePrivateKey:
    """The cluster CA's P-256 private key, derived from ``secret`` (the same on every node)."""
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # n of P-256
    scalar = int.from_bytes(_hkdf(stretch_secret(secret), CA_KEY_INFO, 48), "big") % (order - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _sign(builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    try:
        return builder.sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    except TypeError:  # cryptography < 44: randomised ECDSA; the CA's name and key still agree
        return builder.sign(key, hashes.SHA256())


def _ca_name() -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])


def ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The self-signed cluster CA certificate of ``key`` (fixed name, serial and validity)."""
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_ca_name())
        .issuer_name(_ca_name())
        .public_key(public)
        .serial_number(1)
        .not_valid_before(CA_NOT_BEFORE)
        .not_valid_after(CA_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    return _sign(builder, key)


def leaf_certificate(ca_private_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     key: ec.EllipticCurvePublicKey, common_name: str = TARGET_NAME,
                     now: datetime.datetime | None = None) -> x509.Certificate:
    """A node's certificate for ``key``, signed by the cluster CA: SAN DNS ``TARGET_NAME``,
    server and client auth, valid from a day before ``now`` (clock skew between nodes) for
    ``LEAF_VALIDITY``, random serial."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    ca_public = ca_private_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TARGET_NAME)]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False)
    )
    return _sign(builder, ca_private_key)


@dataclass(frozen=True)
class ClusterCredentials:
    """PEM material of one node in a cluster: the CA certificate it trusts, its own private key
    and its own certificate (signed by that CA)."""

    ca_pem: bytes
    key_pem: bytes
    cert_pem: bytes

    def server_credentials(self) -> grpc.ServerCredentials:
        """For ``server.add_secure_port``: this node's certificate, and a client certificate of
        the cluster CA required of every caller."""
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """For ``grpc.aio.secure_channel`` (with ``TARGET_NAME_OPTION`` among its options)."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)


def make_credentials(secret: str) -> ClusterCredentials:
    """New credentials of a node of the cluster of ``secret``: the derived CA, a fresh P-256 key,
    and its certificate.

    Raises:
        ValueError: ``secret`` is empty.
    """
    private = ca_key(secret)
    ca_cert = ca_certificate(private)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = leaf_certificate(private, ca_cert, key.public_key())
    return ClusterCredentials(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
    )


@functools.lru_cache(maxsize=8)
def cluster_credentials(secret: str) -> ClusterCredentials:
    """This process's credentials in the cluster of ``secret``, made once (the server and every
    peer handle of a node share them). Warns once when the secret is short.

    Raises:
        ValueError: ``secret`` is empty.
    """
    if len(secret) < MIN_SECRET_LENGTH:
        logger.warning("the cluster secret has only %d characters: anyone who can guess it can join the cluster "
                       "and read its traffic; use a long random one (python -m exo.networking.grpc.tls prints one)",
                       len(secret))
    return make_credentials(secret)


def open_channel(address: str, secret: str | None, options: tuple[tuple[str, object], ...] = ()) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to a node at ``address``: mutual TLS with this process's
    credentials for ``secret`` (see ``cluster_credentials``), or plaintext when ``secret`` is
    None or empty."""
    if not secret:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, cluster_credentials(secret).channel_credentials(),
                                   options=tuple(options) + (TARGET_NAME_OPTION,))


if __name__ == "__main__":
    print(generate_secret())
