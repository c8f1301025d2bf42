"""Formatting "host:port" addresses (IPv6 literals in brackets)."""

from __future__ import annotations


def join_host_port(host: str, port: int) -> str:
    """"host:port", with an IPv6 literal host in brackets ("[::1]:5000").

    Raises:
        ValueError: empty host or port outside 1..65535.
    """
    if not host:
        raise ValueError("empty host")
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"
