"""Discovery: finds peers and keeps the list of live ones."""

from __future__ import annotations

from abc import ABC, abstractmethod

from exo.networking.peer_handle import PeerHandle


class Discovery(ABC):
    """Finds peers. A peer is reported only after its gRPC health check succeeded, and is
    dropped when it leaves cleanly or stops answering health checks."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    async def discover_peers(self, wait_for_peers: int = 0, timeout: float | None = None) -> list[PeerHandle]:
        """The live peers now; with ``wait_for_peers > 0``, first wait until at least that many
        are live (or ``timeout`` seconds pass)."""
