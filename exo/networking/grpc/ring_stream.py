"""The one open ``Stream`` call to a peer that carries its ring messages (``RingStream``), and
the bookkeeping of messages sent without waiting for their ack (``Unconfirmed``)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

import grpc

from exo.networking.grpc import node_service_pb2 as pb

#: Longest a failed stream write waits for the call's final status, in seconds.
STREAM_STATUS_WAIT = 1.0
#: Final statuses of a stream call that mean the transport failed, not that the peer refused.
_BROKEN_STREAM_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED})

#: Messages sent ``errors_only`` whose ``on_error`` a stream keeps until the peer confirms them.
MAX_UNCONFIRMED = 4096

OnError = Callable[[BaseException | pb.RingAck], None]


class Unconfirmed:
    """The ``on_error`` of each message sent ``errors_only`` that the peer has not confirmed,
    by seq. The peer handles a stream's messages in order, so an ack settles its own message
    and every earlier one. Holds ``MAX_UNCONFIRMED`` at most, forgetting the oldest."""

    def __init__(self) -> None:
        self._by_seq: OrderedDict[int, OnError] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_seq)

    def add(self, seq: int, on_error: OnError) -> None:
        """Remember the message ``seq`` (seqs rise)."""
        self._by_seq[seq] = on_error
        while len(self._by_seq) > MAX_UNCONFIRMED:
            self._by_seq.popitem(last=False)

    def discard(self, seq: int) -> None:
        """Forget the message ``seq`` (it was never sent)."""
        self._by_seq.pop(seq, None)

    def settle(self, ack: pb.RingAck) -> OnError | None:
        """Settle ``ack.seq`` and every earlier message; the ``on_error`` to call with ``ack``
        when the acked message failed (a code other than OK), else None."""
        on_error = self._by_seq.pop(ack.seq, None)
        while self._by_seq and next(iter(self._by_seq)) < ack.seq:
            self._by_seq.popitem(last=False)
        return on_error if ack.code != 0 else None

    def take_all(self) -> list[OnError]:
        """Forget every message; their ``on_error``, for the caller to call with the stream's error."""
        taken, self._by_seq = list(self._by_seq.values()), OrderedDict()
        return taken


class RingStream:
    """The open ``Stream`` call to a peer, which carries every ring message (prompts, hidden
    states, results): writes are serialised, acks matched to writes by seq.

    A message sent with ``on_error`` is not waited for: the peer answers it only if it fails
    (``RingMessage.errors_only``), and an OK ack of a later seq confirms it. When the call ends
    (the peer went away, or ``close``), every message still waiting for its ack fails with that
    error, every unconfirmed message's ``on_error`` gets it, and so does every later ``send``;
    the handle then opens a new one.
    """

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call
        self.error: BaseException | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._unconfirmed = Unconfirmed()
        self._seq = 0
        self._write_lock = asyncio.Lock()
        self._reader = asyncio.create_task(self._read(), name="grpc-ring-stream-acks")

    async def _read(self) -> None:
        error: BaseException = ConnectionError("the stream was closed")
        try:
            async for ack in self.call:
                fut = self._pending.pop(ack.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(ack)
                on_error = self._unconfirmed.settle(ack)
                if on_error is not None:
                    on_error(ack)
            error = ConnectionError("the peer closed the stream")
        except grpc.aio.AioRpcError as e:
            # a refusal by the peer keeps its status; a transport failure (the peer went away
            # mid-call, or the TLS handshake failed) is a ConnectionError, as for unary calls,
            # caused by the call's error
            if e.code() in _BROKEN_STREAM_CODES:
                error = ConnectionError(f"the stream broke: {e.details()}")
                error.__cause__ = e
            else:
                error = e
        except asyncio.CancelledError:
            pass
        finally:
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self.error)
        for on_error in self._unconfirmed.take_all():
            on_error(self.error)

    async def ready(self, timeout: float) -> None:
        """Wait until the peer accepted the call (its initial metadata, sent before any message)
        or ended it. A refused call raises its status here, before the
        first write: a write racing the refusal would end the call as a local INTERNAL error,
        losing the peer's status. Raises as ``send``."""
        await asyncio.wait_for(self.call.initial_metadata(), timeout)
        if self.call.done():
            await asyncio.wait({self._reader}, timeout=STREAM_STATUS_WAIT)
            raise self.error or ConnectionError("the peer ended the stream")

    @property
    def alive(self) -> bool:
        return self.error is None and not self.call.done()

    async def send(self, message: pb.RingMessage, timeout: float,
                   on_error: Callable[[BaseException | pb.RingAck], None] | None = None) -> pb.RingAck | None:
        """Write ``message`` and wait for its ack; with ``on_error``, return once it is written
        (None) and pass its failing ack, or the stream's error if the stream ends before the
        peer confirmed it, to ``on_error`` later (on the event loop). Raises the stream's error
        (an ``AioRpcError`` from the peer, or ``ConnectionError`` when the stream broke or was
        closed), or ``asyncio.TimeoutError``."""
        async with self._write_lock:
            if self.error is not None:
                raise self.error
            self._seq += 1
            message.seq = self._seq
            fut: asyncio.Future | None = None
            if on_error is None:
                fut = self._pending[self._seq] = asyncio.get_running_loop().create_future()
            else:
                message.errors_only = True
                self._unconfirmed.add(self._seq, on_error)
            try:
                await self.call.write(message)
            except BaseException as e:
                self._pending.pop(message.seq, None)
                self._unconfirmed.discard(message.seq)
                if fut is not None and fut.done():
                    fut.exception()  # retrieved: the error is raised below instead
                elif fut is not None:
                    fut.cancel()
                if isinstance(e, asyncio.CancelledError):
                    raise
                # The call ended under the write: the message was not sent. Its final status (the
                # peer went away, or refused the call) reaches the ack
                # reader; wait for it briefly so that status, not a bare "broke", is raised.
                await asyncio.wait({self._reader}, timeout=STREAM_STATUS_WAIT)
                self._fail(ConnectionError(f"the stream broke: {e}"))
                raise self.error from e
        if fut is None:
            return None
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(message.seq, None)

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        self._fail(ConnectionError("the stream was closed"))
