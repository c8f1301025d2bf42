"""What this node knows of each request, in one bounded, TTL'd registry keyed by request id.

One entry per request id holds every side's state of it: the origin's (``OriginRequest``,
while this node streams the request to a client), the ring worker's (the latest epoch seen
here, the last shard's sampler, the latest result's delivery, the steps computing now), and
when the request ended here (late messages and results of an ended request are dropped).

Bounds: at most ``max_entries`` entries, and an entry nothing has touched for ``ttl`` seconds
(an ended request, or one whose origin went silent) goes. Eviction takes the least recently
touched entries first and never one in use: an origin request in flight, a step computing, a
delivery under way. A forgotten ended request's late message is then treated as a new one's
(a prompt at position 0 starts it again, a step at position > 0 is refused: no KV cache); a
forgotten epoch or sampler is rebuilt from the next message as after a re-partition.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from exo.inference.sampling import Sampler

if TYPE_CHECKING:
    from exo.orchestration.origin import OriginRequest

#: Most request ids remembered at once.
MAX_REQUESTS = 10_000
#: Seconds an entry nothing touched is kept (an ended request's, or an idle one's).
REQUEST_TTL = 600.0


@dataclass
class RequestEntry:
    """One request's state on this node.

    Attributes:
        origin: the origin's state while this node streams the request to its client, else None.
        epoch: the latest epoch of the request seen here (None: none, or forgotten at its end).
        sampler: (epoch, the last shard's sampler of it), on the node holding the last layer.
        delivery: done when the latest result sent to the origin is delivered (tokens go in order).
        computing: steps of the request running on this node's shard now.
        ended_at: monotonic time the request ended here, or None.
        touched: monotonic time of the latest change.
    """

    touched: float
    origin: OriginRequest | None = None
    epoch: int | None = None
    sampler: tuple[int, Sampler] | None = None
    delivery: asyncio.Future | None = None
    computing: int = 0
    ended_at: float | None = None

    @property
    def in_use(self) -> bool:
        return (self.origin is not None or self.computing > 0
                or (self.delivery is not None and not self.delivery.done()))


class RequestRegistry:
    """Entries by request id, least recently touched first (see the module's docstring)."""

    def __init__(self, max_entries: int = MAX_REQUESTS, ttl: float = REQUEST_TTL,
                 clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, RequestEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, request_id: str) -> RequestEntry | None:
        """The entry of ``request_id`` if there is one (touches nothing)."""
        return self._entries.get(request_id)

    def entry(self, request_id: str) -> RequestEntry:
        """The entry of ``request_id``, made if there is none, touched (for a change)."""
        now = self._clock()
        e = self._entries.get(request_id)
        if e is None:
            e = self._entries[request_id] = RequestEntry(now)
            self._evict(now, keep=request_id)
        else:
            e.touched = now
            self._entries.move_to_end(request_id)
        return e

    def _evict(self, now: float, keep: str) -> None:
        """Drop entries not in use that expired, and the oldest ones over ``max_entries``, but
        ``keep`` (the entry just made)."""
        excess = len(self._entries) - self.max_entries
        victims = []
        for rid, e in self._entries.items():
            if len(victims) >= excess and now - e.touched <= self.ttl:
                break
            if not e.in_use and rid != keep:
                victims.append(rid)
        for rid in victims:
            del self._entries[rid]

    # ---------------------------------------------------------------- the origin's side

    def origin(self, request_id: str) -> OriginRequest | None:
        e = self._entries.get(request_id)
        return e.origin if e is not None else None

    def origins(self) -> list[OriginRequest]:
        """The requests this node is the origin of, in flight."""
        return [e.origin for e in self._entries.values() if e.origin is not None]

    def add_origin(self, request_id: str, req: OriginRequest) -> None:
        """``request_id`` starts here with origin state ``req`` (no longer ended, if it was)."""
        e = self.entry(request_id)
        e.origin = req
        e.ended_at = None

    def finish_origin(self, request_id: str) -> None:
        """The origin's stream of ``request_id`` is over: results still arriving are dropped."""
        e = self.entry(request_id)
        e.origin = None
        e.ended_at = self._clock()

    # ---------------------------------------------------------------- the ring worker's side

    def is_ended(self, request_id: str) -> bool:
        e = self._entries.get(request_id)
        return e is not None and e.ended_at is not None

    def latest_epoch(self, request_id: str) -> int | None:
        e = self._entries.get(request_id)
        return e.epoch if e is not None else None

    def delivery(self, request_id: str) -> asyncio.Future | None:
        e = self._entries.get(request_id)
        return e.delivery if e is not None else None

    def end(self, request_id: str) -> None:
        """``request_id`` is over on this node: forget its epoch and sampler, drop its late messages."""
        e = self.entry(request_id)
        e.ended_at = self._clock()
        e.epoch = None
        e.sampler = None

    def begin_step(self, request_id: str) -> None:
        self.entry(request_id).computing += 1

    def end_step(self, request_id: str) -> None:
        e = self._entries.get(request_id)
        if e is not None and e.computing > 0:
            e.computing -= 1

    def computing_ids(self) -> set[str]:
        """Requests with a step running on this node's shard now."""
        return {rid for rid, e in self._entries.items() if e.computing}
