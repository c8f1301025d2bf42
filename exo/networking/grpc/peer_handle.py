"""GRPCPeerHandle: the gRPC client for one peer node."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from exo.networking.grpc import codec
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc import node_service_pb2_grpc as pb_grpc
from exo.networking.grpc.auth import CLUSTER_KEY_METADATA, cluster_key
from exo.networking.grpc.server import MAX_MESSAGE_LENGTH
from exo.networking.peer_handle import PeerHandle
from exo.networking.ring_lane import RingLane, Unconfirmed, ring_lane_by_default
from exo.networking.ring_socket import RingSocketCall
from exo.orchestration.request import RequestContext, TokenResult
from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.topology import Topology

logger = logging.getLogger(__name__)

#: Options of every channel to a peer.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_LENGTH),
    ("grpc.max_receive_message_length", MAX_MESSAGE_LENGTH),
    # gRPC's default reconnect backoff grows to 120 s; a peer that restarts must be reachable
    # again within a couple of health-check intervals.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

#: Deadline of a health check, in seconds.
HEALTH_CHECK_TIMEOUT = 2.0
#: Deadline of every other call, in seconds.
CALL_TIMEOUT = 30.0
#: Longest ``connect()`` waits for the channel to become ready, in seconds.
CONNECT_TIMEOUT = 5.0
#: Longest a failed stream write waits for the call's final status, in seconds.
STREAM_STATUS_WAIT = 1.0
#: Statuses of a call that mean the peer is unreachable or missed the deadline.
_UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
#: Final statuses of a stream call that mean the transport failed, not that the peer refused.
_BROKEN_STREAM_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED})

#: Seconds after a failed attempt to open a peer's ring lane before the next one.
LANE_RETRY_INTERVAL = 30.0
#: Largest message the event loop writes to a ring lane, in bytes (a decode step is ~2.5 KB);
#: larger ones (prefills) take the stream, so the loop never blocks on a full socket.
LANE_LOOP_MAX_BYTES = 64 * 1024

_T = TypeVar("_T")


def stream_by_default() -> bool:
    """Whether ring messages ride a persistent stream unless a handle says otherwise
    (``EXO_GRPC_STREAM=0`` turns it off, e.g. to compare with one call per message)."""
    return os.environ.get("EXO_GRPC_STREAM", "1") != "0"


def ring_socket_by_default() -> bool:
    """Whether the persistent stream is the peer's ring WebSocket when it has one, rather than
    the gRPC ``Stream`` call (``EXO_RING_SOCKET=0`` turns it off, e.g. to compare the two)."""
    return os.environ.get("EXO_RING_SOCKET", "1") != "0"


class _GrpcRingCall:
    """A gRPC ``Stream`` call in the shape ``_RingStream`` drives (that of ``RingSocketCall``)."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call

    async def ready(self) -> None:
        await self.call.initial_metadata()

    async def write(self, message: pb.RingMessage) -> None:
        await self.call.write(message)

    def acks(self) -> AsyncIterator[pb.RingAck]:
        return self.call.__aiter__()

    def done(self) -> bool:
        return self.call.done()

    async def close(self) -> None:
        self.call.cancel()


class _RingStream:
    """One open stream of ring messages to a peer (its ring WebSocket, or a gRPC ``Stream``
    call): writes are serialised, acks matched to writes by seq.

    A message sent with ``on_error`` is not waited for: the peer answers it only if it fails
    (``RingMessage.errors_only``), and an OK ack of a later seq confirms it. When the call ends
    (the peer went away, or ``close``), every message still waiting for its ack fails with that
    error, every unconfirmed message's ``on_error`` gets it, and so does every later ``send``;
    the handle then opens a new one.
    """

    def __init__(self, call: _GrpcRingCall | RingSocketCall) -> None:
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
            async for ack in self.call.acks():
                fut = self._pending.pop(ack.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(ack)
                on_error = self._unconfirmed.settle(ack)
                if on_error is not None:
                    on_error(ack)
            error = ConnectionError("the peer closed the stream")
        except grpc.aio.AioRpcError as e:
            # a refusal by the peer (e.g. a wrong cluster key) keeps its status; a transport
            # failure (the peer went away mid-call) is a ConnectionError, as for unary calls
            error = ConnectionError(f"the stream broke: {e.details()}") if e.code() in _BROKEN_STREAM_CODES else e
        except ConnectionError as e:  # the ring socket broke
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

    def settle(self) -> None:
        """Forget the messages sent with ``on_error`` that the peer has not confirmed, without
        calling their ``on_error``: for when later messages take another connection (the ring
        lane), which means no later message here will confirm them. A request's next step
        follows its previous one around the ring, so a message that later steps of its request
        went past on the other connection was handled; one still in flight goes unreported here
        (the origin's stall check notices a lost step)."""
        self._unconfirmed.take_all()

    async def ready(self, timeout: float) -> None:
        """Wait until the peer accepted the call (its initial metadata, sent before any message)
        or ended it. A refused call (a wrong cluster key) raises its status here, before the
        first write: a write racing the refusal would end the call as a local INTERNAL error,
        losing the peer's status. Raises as ``send``."""
        await asyncio.wait_for(self.call.ready(), timeout)
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
                # peer went away, or refused the call, e.g. a wrong cluster key) reaches the ack
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
        await self.call.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        self._fail(ConnectionError("the stream was closed"))


class GRPCPeerHandle(PeerHandle):
    """A connection to one peer's NodeService.

    The channel is opened lazily on the first call (or by ``connect()``) and must be used from
    the event loop it was opened on. Every call has a deadline (``HEALTH_CHECK_TIMEOUT`` for
    health checks, ``CALL_TIMEOUT`` otherwise).

    Args:
        node_id: the peer's node id.
        address: "host:port" of the peer's gRPC server.
        device_capabilities: the peer's device, as discovery learnt it.
        cluster_secret: when set, every call carries the cluster key derived from it.
        stream: send prompts, tensors and results over one persistent bidirectional ``Stream``
            call (default: ``stream_by_default()``) instead of one unary call each; every message
            is still acknowledged with its own status, so errors are raised the same way, except
            for a send with ``on_error``, which returns once written (see ``PeerHandle``).
        ring_socket: the persistent stream is the peer's ring WebSocket when its health check
            tells one (default: ``ring_socket_by_default()``), else a gRPC ``Stream`` call; the
            messages and acks are the same (``exo.networking.ring_socket``).
        ring_lane: once ``open_lane`` opened the peer's ring lane (its health check tells the
            port; default: ``ring_lane_by_default()``; ``exo.networking.ring_lane``), the
            ``*_now`` sends and every send with ``on_error`` of up to ``LANE_LOOP_MAX_BYTES``
            take it, so that the steps and results of a request keep one order.

    Calls other than ``health_check`` raise ``ConnectionError`` when the peer is unreachable or
    misses the deadline (UNAVAILABLE, DEADLINE_EXCEEDED), ``RuntimeError(f"peer {id}: {details}")``
    for any other error it reports, and ``ValueError`` for an argument the codec cannot encode.
    """

    def __init__(
        self,
        node_id: str,
        address: str,
        device_capabilities: DeviceCapabilities,
        cluster_secret: str | None = None,
        stream: bool | None = None,
        ring_socket: bool | None = None,
        ring_lane: bool | None = None,
    ) -> None:
        self._id = node_id
        self._use_lane = ring_lane_by_default() if ring_lane is None else ring_lane
        self._lane: RingLane | None = None
        self._lane_opening = False
        self._lane_failed_at = -LANE_RETRY_INTERVAL
        self._lane_lock = threading.Lock()  # the lane's context cache, between sending threads
        self._lane_contexts = codec.ContextCache()
        self._use_stream = stream_by_default() if stream is None else stream
        self._use_socket = ring_socket_by_default() if ring_socket is None else ring_socket
        self._cluster_key = cluster_key(cluster_secret) if cluster_secret else None
        self._stream: _RingStream | None = None
        self._stream_lock = asyncio.Lock()
        self._address = address
        self._device_capabilities = device_capabilities
        self._metadata: tuple[tuple[str, str], ...] = ((CLUSTER_KEY_METADATA, self._cluster_key),) if self._cluster_key else ()
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.NodeServiceStub | None = None
        self._contexts = codec.ContextCache()
        self._disconnects = 0  # disconnect() calls, so that a stream opened across one is closed

    def __repr__(self) -> str:
        return f"GRPCPeerHandle({self._id!r}, {self._address!r})"

    def id(self) -> str:
        return self._id

    def address(self) -> str:
        return self._address

    def device_capabilities(self) -> DeviceCapabilities:
        return self._device_capabilities

    def _get_stub(self) -> pb_grpc.NodeServiceStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self._address, options=CHANNEL_OPTIONS)
            self._stub = pb_grpc.NodeServiceStub(self._channel)
        return self._stub

    async def connect(self) -> None:
        """Open the channel and wait until it is ready.

        Raises:
            ConnectionError: the peer is not reachable within ``CONNECT_TIMEOUT`` seconds.
        """
        self._get_stub()
        assert self._channel is not None
        try:
            await asyncio.wait_for(self._channel.channel_ready(), CONNECT_TIMEOUT)
        except asyncio.TimeoutError as e:
            raise ConnectionError(f"peer {self._id} at {self._address}: not reachable within {CONNECT_TIMEOUT} s") from e

    async def is_connected(self) -> bool:
        """Whether the channel is open and ready (no network traffic)."""
        return self._channel is not None and self._channel.get_state() == grpc.ChannelConnectivity.READY

    async def disconnect(self) -> None:
        """Close the channel (calls in flight are cancelled). The next call opens a new one."""
        self._disconnects += 1
        lane, self._lane = self._lane, None
        if lane is not None:
            await asyncio.to_thread(lane.close)
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def health_check(self) -> bool:
        """True when the peer answers healthy within ``HEALTH_CHECK_TIMEOUT`` seconds and is the
        node this handle expects. Never raises."""
        try:
            response = await self._get_stub().HealthCheck(
                pb.HealthCheckRequest(), timeout=HEALTH_CHECK_TIMEOUT, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            logger.debug("health check of %s at %s failed: %s %s", self._id, self._address, e.code(), e.details())
            return False
        except Exception:
            logger.debug("health check of %s at %s failed", self._id, self._address, exc_info=True)
            return False
        if response.node_id and response.node_id != self._id:
            logger.warning(
                "health check: %s answers as node %s, expected %s", self._address, response.node_id, self._id
            )
            return False
        return response.is_healthy

    def _rpc_error(self, method: str, e: grpc.aio.AioRpcError, unreachable: frozenset[grpc.StatusCode]) -> Exception:
        """``ConnectionError`` for a status in ``unreachable`` (the peer is gone or too slow),
        else ``RuntimeError`` with the peer's message."""
        code, details = e.code(), e.details()
        if code in unreachable:
            return ConnectionError(f"peer {self._id} at {self._address}: {method}: {code.name}: {details}")
        return RuntimeError(f"peer {self._id}: {details}")

    async def _call(self, method: str, call: Callable[[pb_grpc.NodeServiceStub], Awaitable[_T]]) -> _T:
        try:
            return await call(self._get_stub())
        except grpc.aio.AioRpcError as e:
            raise self._rpc_error(method, e, _UNREACHABLE_CODES) from e

    async def _open_stream(self) -> _RingStream:
        """The open stream to the peer, opened if needed: its ring WebSocket when it has one
        (and ``ring_socket``), else a gRPC ``Stream`` call. Raises as ``_call``."""
        async with self._stream_lock:
            if self._stream is None or not self._stream.alive:
                if self._stream is not None:
                    await self._stream.close()
                    self._stream = None
                disconnects = self._disconnects
                call = await self._open_ring_socket() if self._use_socket else None
                if self._disconnects != disconnects:  # disconnect() ran meanwhile: it would miss this socket
                    if call is not None:
                        await call.close()
                    raise ConnectionError(f"peer {self._id} at {self._address}: disconnected while opening the ring stream")
                stream = self._stream = _RingStream(call or _GrpcRingCall(self._get_stub().Stream(metadata=self._metadata)))
                try:
                    await stream.ready(CALL_TIMEOUT)
                    if self._disconnects != disconnects:
                        raise ConnectionError("disconnected while opening the ring stream")
                except BaseException as e:
                    if self._stream is stream:
                        self._stream = None
                    await stream.close()
                    if isinstance(e, (grpc.aio.AioRpcError, asyncio.TimeoutError, ConnectionError)):
                        raise self._ring_error("Stream", e) from e
                    raise
                return stream
            return self._stream

    async def _open_ring_socket(self) -> RingSocketCall | None:
        """Connect to the peer's ring WebSocket; None when it has none, or it cannot be reached
        (then this handle keeps to the gRPC stream). Raises as ``_call`` (its health check
        tells the port), and RuntimeError when the peer refuses the cluster key."""
        response = await self._call("HealthCheck", lambda s: s.HealthCheck(
            pb.HealthCheckRequest(), timeout=CONNECT_TIMEOUT, metadata=self._metadata))
        if not response.ring_port:
            return None
        host = self._address.rsplit(":", 1)[0]
        try:
            return await RingSocketCall.connect(host, response.ring_port, self._cluster_key, MAX_MESSAGE_LENGTH, CONNECT_TIMEOUT)
        except PermissionError as e:
            raise RuntimeError(f"peer {self._id}: {e}") from e
        except ConnectionError as e:
            logger.warning("peer %s: its ring socket is not reachable (%s); ring messages take the gRPC stream", self._id, e)
            self._use_socket = False
            return None

    def _ring_error(self, method: str, e: BaseException | pb.RingAck) -> BaseException:
        """What a ring send raises (or passes to ``on_error``) for a failing ack or a stream's
        error: as ``_call`` raises them."""
        if isinstance(e, pb.RingAck):
            if e.code == grpc.StatusCode.UNAVAILABLE.value[0]:  # the peer is stopping: as if it were gone
                return ConnectionError(f"peer {self._id} at {self._address}: {method}: UNAVAILABLE: {e.details}")
            return RuntimeError(f"peer {self._id}: {e.details}")
        if isinstance(e, grpc.aio.AioRpcError):  # a stream call also ends CANCELLED when the peer goes away
            return self._rpc_error(method, e, _UNREACHABLE_CODES | {grpc.StatusCode.CANCELLED})
        if isinstance(e, asyncio.TimeoutError):
            return ConnectionError(f"peer {self._id} at {self._address}: {method}: no answer within {CALL_TIMEOUT} s")
        if isinstance(e, ConnectionError):
            return ConnectionError(f"peer {self._id} at {self._address}: {method}: {e}")
        return e

    async def _send_ring(self, method: str, message: pb.RingMessage,
                         on_error: Callable[[BaseException], None] | None = None) -> None:
        """Send over the persistent stream; errors as ``_call`` raises them, or later to
        ``on_error`` (see ``PeerHandle.send_tensor``)."""
        report = None if on_error is None else (lambda e: on_error(self._ring_error(method, e)))
        lane = self._lane
        if report is not None and lane is not None and lane.alive and message.ByteSize() <= LANE_LOOP_MAX_BYTES:
            # one ordered connection for the request's messages, whichever thread sends them
            loop = asyncio.get_running_loop()

            def report_on_loop(e: BaseException | pb.RingAck) -> None:  # called on the lane's thread
                try:
                    loop.call_soon_threadsafe(report, e)
                except RuntimeError:  # the loop closed
                    logger.debug("peer %s: a ring lane error after the event loop closed: %s", self._id, e)

            try:
                lane.send(message, report_on_loop)
                return
            except ConnectionError as e:
                logger.debug("peer %s: the ring lane broke (%s); the stream takes the message", self._id, e)
        stream = await self._open_stream()
        try:
            ack = await stream.send(message, CALL_TIMEOUT, report)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError, ConnectionError) as e:
            raise self._ring_error(method, e) from e
        if ack is not None and ack.code != grpc.StatusCode.OK.value[0]:
            raise self._ring_error(method, ack)

    async def send_prompt(self, ctx: RequestContext, token_ids: np.ndarray, position: int,
                          on_error: Callable[[BaseException], None] | None = None, result: TokenResult | None = None) -> None:
        request = pb.PromptRequest(ctx=self._contexts.encode(ctx), token_ids=codec.tensor_to_proto(token_ids), position=position)
        if result is not None:
            request.result.CopyFrom(codec.result_to_proto(result))
        if self._use_stream:
            return await self._send_ring("SendPrompt", pb.RingMessage(prompt=request), on_error)
        await self._call("SendPrompt", lambda s: s.SendPrompt(request, timeout=CALL_TIMEOUT, metadata=self._metadata))

    async def send_tensor(self, ctx: RequestContext, hidden_states: np.ndarray, position: int,
                          on_error: Callable[[BaseException], None] | None = None) -> None:
        request = pb.TensorRequest(
            ctx=self._contexts.encode(ctx), hidden_states=codec.tensor_to_proto(hidden_states), position=position
        )
        if self._use_stream:
            return await self._send_ring("SendTensor", pb.RingMessage(tensor=request), on_error)
        await self._call("SendTensor", lambda s: s.SendTensor(request, timeout=CALL_TIMEOUT, metadata=self._metadata))

    async def send_result(self, result: TokenResult, on_error: Callable[[BaseException], None] | None = None) -> None:
        request = codec.result_to_proto(result)
        if self._use_stream:
            return await self._send_ring("SendResult", pb.RingMessage(result=request), on_error)
        await self._call("SendResult", lambda s: s.SendResult(request, timeout=CALL_TIMEOUT, metadata=self._metadata))

    def wants_lane(self) -> bool:
        """Whether ``open_lane`` would try now: lanes are on, none is open or being opened, and
        the last failed attempt is ``LANE_RETRY_INTERVAL`` seconds old."""
        return (self._use_lane and not self._lane_opening and (self._lane is None or not self._lane.alive)
                and time.monotonic() - self._lane_failed_at >= LANE_RETRY_INTERVAL)

    async def open_lane(self) -> None:
        """Open the ring lane to the peer, on the port its health check tells (none: no lane).
        Never raises: without a lane, ring messages keep to the stream (a failure is logged, and
        retried after ``LANE_RETRY_INTERVAL`` seconds)."""
        if not self.wants_lane():
            return
        self._lane_opening = True
        disconnects = self._disconnects
        try:
            response = await self._get_stub().HealthCheck(pb.HealthCheckRequest(), timeout=CONNECT_TIMEOUT, metadata=self._metadata)
            if not response.lane_port:
                self._use_lane = False
                return
            host = self._address.rsplit(":", 1)[0]
            lane = await asyncio.to_thread(RingLane.connect, host, response.lane_port, self._cluster_key, MAX_MESSAGE_LENGTH,
                                           CONNECT_TIMEOUT, self._id)
            if self._disconnects != disconnects:  # disconnect() ran meanwhile: it would miss this lane
                await asyncio.to_thread(lane.close)
                return
            self._lane = lane
            if self._stream is not None:  # the lane takes the messages that would confirm them
                self._stream.settle()
            logger.debug("opened the ring lane to %s at %s:%d", self._id, host, response.lane_port)
        except Exception as e:
            self._lane_failed_at = time.monotonic()
            level = logging.DEBUG if isinstance(e, grpc.aio.AioRpcError) else logging.WARNING
            logger.log(level, "peer %s: no ring lane (%s: %s); ring messages take the stream", self._id, type(e).__name__, e)
        finally:
            self._lane_opening = False

    def _send_now(self, method: str, message: Callable[[pb.RequestContext], pb.RingMessage],
                  ctx: RequestContext, on_error: Callable[[BaseException], None]) -> bool:
        lane = self._lane
        if lane is None or not lane.alive:
            return False
        try:
            with self._lane_lock:
                ring_message = message(self._lane_contexts.encode(ctx))
            lane.send(ring_message, lambda e: on_error(self._ring_error(method, e)))
        except ConnectionError as e:
            logger.debug("peer %s: the ring lane broke: %s", self._id, e)
            return False
        except Exception:
            logger.exception("peer %s: a message could not go on the ring lane", self._id)
            return False
        return True

    def send_prompt_now(self, ctx: RequestContext, token_ids: np.ndarray, position: int,
                        on_error: Callable[[BaseException], None], result: TokenResult | None = None) -> bool:
        def message(context: pb.RequestContext) -> pb.RingMessage:
            request = pb.PromptRequest(ctx=context, token_ids=codec.tensor_to_proto(token_ids), position=position)
            if result is not None:
                request.result.CopyFrom(codec.result_to_proto(result))
            return pb.RingMessage(prompt=request)

        return self._send_now("SendPrompt", message, ctx, on_error)

    def send_tensor_now(self, ctx: RequestContext, hidden_states: np.ndarray, position: int,
                        on_error: Callable[[BaseException], None]) -> bool:
        return self._send_now("SendTensor", lambda context: pb.RingMessage(tensor=pb.TensorRequest(
            ctx=context, hidden_states=codec.tensor_to_proto(hidden_states), position=position)), ctx, on_error)

    async def end_request(self, request_id: str) -> None:
        request = pb.EndRequestRequest(request_id=request_id)
        await self._call("EndRequest", lambda s: s.EndRequest(request, timeout=CALL_TIMEOUT, metadata=self._metadata))

    async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
        request = pb.CollectTopologyRequest(visited=sorted(visited), max_depth=max_depth)
        response = await self._call(
            "CollectTopology", lambda s: s.CollectTopology(request, timeout=CALL_TIMEOUT, metadata=self._metadata)
        )
        try:
            return codec.topology_from_proto(response)
        except ValueError as e:
            raise RuntimeError(f"peer {self._id}: invalid topology: {e}") from e
