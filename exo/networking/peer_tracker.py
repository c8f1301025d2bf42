"""PeerTracker: the health-checked peer set shared by every Discovery implementation.

A discovery mechanism (mDNS, a manual peer file) only *offers* candidates (node id, address,
capabilities) and *withdraws* them. The tracker admits a candidate once its health check
succeeds, health-checks admitted peers every ``health_check_interval`` seconds, and removes a
peer after ``health_check_failures`` consecutive failures. A removed peer stays a candidate
(retried with exponential backoff up to ``MAX_RETRY_BACKOFF`` seconds) until withdrawn, so a
node that restarts on the same address rejoins without a new announcement.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from exo.networking.discovery import Discovery
from exo.networking.peer_handle import PeerHandle
from exo.topology.device_capabilities import DeviceCapabilities

logger = logging.getLogger(__name__)

#: Builds a handle for (node_id, "host:port", capabilities).
PeerHandleFactory = Callable[[str, str, DeviceCapabilities], PeerHandle]
#: Called with no arguments whenever the set of live peers changes; may be a coroutine function.
PeerListener = Callable[[], Any]

#: Longest wait between two admission attempts of a candidate that fails its health check, in seconds.
MAX_RETRY_BACKOFF = 10.0


@dataclass(eq=False)
class _Entry:
    node_id: str
    address: str
    capabilities: DeviceCapabilities
    handle: PeerHandle
    backoff: float
    admitted: bool = False
    failures: int = 0
    next_attempt: float = 0.0  # loop time of the next admission attempt (candidates only)
    checking: bool = False


class PeerTracker:
    """The live peer set of one node.

    Args:
        create_peer_handle: factory of peer handles.
        health_check_interval: seconds between health checks of each peer (> 0).
        health_check_failures: consecutive failed checks that remove a peer (>= 1).
        tick: optional coroutine function awaited at the start of every health-check round
            (the manual discovery re-reads its file there); its exceptions are logged.

    Raises:
        ValueError: interval or failure count out of range.
    """

    def __init__(
        self,
        create_peer_handle: PeerHandleFactory,
        health_check_interval: float = 1.0,
        health_check_failures: int = 3,
        tick: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if not health_check_interval > 0:
            raise ValueError(f"health_check_interval must be > 0 seconds, got {health_check_interval}")
        if health_check_failures < 1:
            raise ValueError(f"health_check_failures must be >= 1, got {health_check_failures}")
        self._create_peer_handle = create_peer_handle
        self._interval = health_check_interval
        self._max_failures = health_check_failures
        self._tick = tick
        self._entries: dict[str, _Entry] = {}
        self._listeners: list[PeerListener] = []
        self._changed_event = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._disconnecting: set[asyncio.Task] = set()  # awaited by stop(), never cancelled
        self._loop_task: asyncio.Task | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the health-check loop (call from the event loop)."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._health_loop(), name="peer-health-loop")

    async def stop(self) -> None:
        """Stop the loop, cancel and await every task, disconnect and forget every peer."""
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        self._loop_task = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        entries, self._entries = list(self._entries.values()), {}
        # the peers that left before are still being disconnected: cancelled, a handle could
        # leave its connections open
        await asyncio.gather(*self._disconnecting, *(self._disconnect(e.handle) for e in entries))

    # --- what discovery feeds in -------------------------------------------------------------

    def offer(self, node_id: str, address: str, capabilities: DeviceCapabilities) -> None:
        """A peer is known at ``address``: check it now and admit it once healthy.

        Offering a known peer again with the same address and capabilities only hurries a
        pending admission; a different address replaces the peer (it is re-admitted after a
        health check of the new address).
        """
        entry = self._entries.get(node_id)
        if entry is not None and entry.address == address and entry.capabilities == capabilities:
            if not entry.admitted:
                entry.backoff = self._interval
                entry.next_attempt = 0.0
                self._check_soon(entry)
            return
        was_admitted = False
        if entry is not None:
            logger.info("peer %s moved from %s to %s", node_id, entry.address, address)
            del self._entries[node_id]
            was_admitted = entry.admitted
            self._spawn_disconnect(entry.handle)
        handle = self._create_peer_handle(node_id, address, capabilities)
        entry = _Entry(node_id, address, capabilities, handle, backoff=self._interval)
        self._entries[node_id] = entry
        logger.debug("candidate peer %s at %s", node_id, address)
        self._check_soon(entry)
        if was_admitted:
            self._changed()

    def withdraw(self, node_id: str) -> None:
        """The peer left (or is no longer configured): forget it at once."""
        entry = self._entries.pop(node_id, None)
        if entry is None:
            return
        self._spawn_disconnect(entry.handle)
        if entry.admitted:
            logger.info("peer %s at %s left", node_id, entry.address)
            self._changed()

    def known_ids(self) -> set[str]:
        """Ids of every offered peer, admitted or not."""
        return set(self._entries)

    # --- what the node reads -----------------------------------------------------------------

    def peers(self) -> list[PeerHandle]:
        """Handles of the live (admitted) peers, sorted by node id."""
        return [e.handle for _, e in sorted(self._entries.items()) if e.admitted]

    async def wait_for_peers(self, count: int = 0, timeout: float | None = None) -> list[PeerHandle]:
        """The live peers, after waiting until there are at least ``count`` of them or
        ``timeout`` seconds passed (None: no limit). Never raises on timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while len(self.peers()) < count:
            event = self._changed_event
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                break
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return self.peers()

    def add_listener(self, listener: PeerListener) -> None:
        """Call ``listener()`` (sync, or a coroutine function run as a task) whenever the live
        peer set changes. Its exceptions are logged, never raised."""
        self._listeners.append(listener)

    def remove_listener(self, listener: PeerListener) -> None:
        """Stop calling ``listener``. Raises ValueError if it was not added."""
        self._listeners.remove(listener)

    # --- internals ---------------------------------------------------------------------------

    def _spawn_disconnect(self, handle: PeerHandle) -> None:
        task = asyncio.get_running_loop().create_task(self._disconnect(handle))
        self._disconnecting.add(task)
        task.add_done_callback(self._disconnecting.discard)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _check_soon(self, entry: _Entry) -> None:
        if not entry.checking:
            entry.checking = True  # set before the task runs, so no second check is spawned
            self._spawn(self._check(entry))

    def _changed(self) -> None:
        event, self._changed_event = self._changed_event, asyncio.Event()
        event.set()
        for listener in list(self._listeners):
            try:
                result = listener()
                if inspect.isawaitable(result):
                    self._spawn(self._await_listener(listener, result))
            except Exception:
                logger.exception("peer listener %r failed", listener)

    @staticmethod
    async def _await_listener(listener: PeerListener, result: Awaitable[Any]) -> None:
        try:
            await result
        except Exception:
            logger.exception("peer listener %r failed", listener)

    @staticmethod
    async def _disconnect(handle: PeerHandle) -> None:
        try:
            await handle.disconnect()
        except Exception:
            logger.debug("disconnecting %s failed", handle.id(), exc_info=True)

    async def _check(self, entry: _Entry) -> None:
        try:
            healthy = await entry.handle.health_check()
        except Exception:  # health_check should never raise; a broken handle is unhealthy
            logger.exception("health check of %s raised", entry.node_id)
            healthy = False
        finally:
            entry.checking = False
        if self._entries.get(entry.node_id) is not entry:
            return  # withdrawn or replaced meanwhile
        now = asyncio.get_running_loop().time()
        if healthy:
            entry.failures = 0
            entry.backoff = self._interval
            if not entry.admitted:
                entry.admitted = True
                logger.info("peer %s at %s joined", entry.node_id, entry.address)
                self._changed()
        elif entry.admitted:
            entry.failures += 1
            logger.debug("peer %s failed %d health check(s) in a row", entry.node_id, entry.failures)
            if entry.failures >= self._max_failures:
                entry.admitted = False
                entry.failures = 0
                entry.next_attempt = now + entry.backoff
                logger.warning(
                    "peer %s at %s removed after %d failed health checks", entry.node_id, entry.address, self._max_failures
                )
                self._changed()
        else:
            entry.next_attempt = now + entry.backoff
            entry.backoff = min(entry.backoff * 2, MAX_RETRY_BACKOFF)

    async def _health_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._tick is not None:
                try:
                    await self._tick()
                except Exception:
                    logger.exception("discovery tick failed")
            now = loop.time()
            for entry in list(self._entries.values()):
                if entry.admitted or now >= entry.next_attempt:
                    self._check_soon(entry)
            await asyncio.sleep(self._interval)


class TrackedDiscovery(Discovery):
    """Base of the discoveries whose live peers a ``PeerTracker`` (``self._tracker``) keeps:
    the peer queries and listener registration are the tracker's."""

    _tracker: PeerTracker

    async def discover_peers(self, wait_for_peers: int = 0, timeout: float | None = None) -> list[PeerHandle]:
        """The live peers; with ``wait_for_peers > 0`` first wait until that many are live or
        ``timeout`` seconds passed (returns what there is then, never raises on timeout)."""
        return await self._tracker.wait_for_peers(wait_for_peers, timeout)

    def peers(self) -> list[PeerHandle]:
        """The live peers now, sorted by node id (no waiting)."""
        return self._tracker.peers()

    def add_peer_listener(self, listener: PeerListener) -> None:
        """Call ``listener()`` (sync or async, no arguments) whenever the live peer set changes."""
        self._tracker.add_listener(listener)
