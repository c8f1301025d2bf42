"""Cluster secret: the gRPC metadata key every call carries when the cluster has a secret.

The secret itself never travels. Calls carry ``sha256(secret)`` (hex) under
``CLUSTER_KEY_METADATA``; mDNS advertises a different, shorter tag (see
``exo.networking.mdns.discovery``) so the gRPC key cannot be read off the LAN from the
advertisement. Note that the key travels in clear text over the insecure channel: it keeps
foreign clusters apart, it is not protection against an attacker on the network.
"""

from __future__ import annotations

import hashlib
import hmac

#: gRPC metadata key (lower case, as gRPC requires) carrying the cluster key.
CLUSTER_KEY_METADATA = "x-exo-cluster-key"
#: What every server of a node (gRPC, ring WebSocket, ring lane) answers a wrong or missing key.
REFUSED_TEXT = "wrong or missing cluster key"


def cluster_key(secret: str) -> str:
    """The value of ``CLUSTER_KEY_METADATA`` for ``secret``: hex sha256 of its UTF-8 bytes."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def key_matches(expected_key: str, presented: str | bytes | None) -> bool:
    """Constant-time comparison of a presented key with the expected one (False when missing)."""
    if presented is None:
        return False
    if isinstance(presented, bytes):
        presented = presented.decode("utf-8", errors="replace")
    return hmac.compare_digest(expected_key.encode("utf-8"), presented.encode("utf-8"))
