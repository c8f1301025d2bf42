"""GRPCPeerHandle: the gRPC client for one peer node."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Sequence, TypeVar

import grpc
import numpy as np

from exo.networking.grpc import codec, image_codec
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc import node_service_pb2_grpc as pb_grpc
from exo.networking.grpc.ring_stream import RingStream
from exo.networking.grpc.tls import cluster_credentials, looks_like_handshake_failure, open_channel
from exo.networking.grpc.server import MAX_MESSAGE_LENGTH
from exo.networking.peer_handle import PeerHandle
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
#: Statuses of a call that mean the peer is unreachable or missed the deadline.
_UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_T = TypeVar("_T")


class GRPCPeerHandle(PeerHandle):
    """A connection to one peer's NodeService.

    The channel is opened lazily on the first call (or by ``connect()``) and must be used from
    the event loop it was opened on. Every call has a deadline (``HEALTH_CHECK_TIMEOUT`` for
    health checks, ``CALL_TIMEOUT`` otherwise).

    Args:
        node_id: the peer's node id.
        address: "host:port" of the peer's gRPC server.
        device_capabilities: the peer's device, as discovery learnt it.
        cluster_secret: when set, the channel is mutual TLS with this node's certificate of the
            cluster CA derived from the secret (``exo.networking.grpc.tls``), and accepts only a
            peer whose certificate that CA signed; a failed handshake (another secret, or none,
            on the peer) is logged as a warning and the peer is unreachable. Without it the
            channel is plaintext.

    Prompts, hidden states and results ride one persistent bidirectional ``Stream`` call
    (``RingStream``), opened on first use and again after it breaks; every message is
    acknowledged with its own status, so errors are raised as for a unary call, except for a
    send with ``on_error``, which returns once written (see ``PeerHandle``).

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
    ) -> None:
        self._id = node_id
        self._secret = cluster_secret or None
        if self._secret:
            cluster_credentials(self._secret)  # made now (scrypt: a fraction of a second), not at the first call
        self._handshake_failures = 0
        self._stream: RingStream | None = None
        self._stream_lock = asyncio.Lock()
        self._address = address
        self._device_capabilities = device_capabilities
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
            self._channel = open_channel(self._address, self._secret, CHANNEL_OPTIONS)
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
            response = await self._get_stub().HealthCheck(pb.HealthCheckRequest(), timeout=HEALTH_CHECK_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            if not self._note_handshake_failure(e):
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

    def _note_handshake_failure(self, e: grpc.aio.AioRpcError) -> bool:
        """Log a call that failed in the TLS handshake (a warning on the first and every 100th of
        this handle: a foreign node keeps being health-checked). Whether it was one."""
        if e.code() != grpc.StatusCode.UNAVAILABLE or not looks_like_handshake_failure(e.details()):
            return False
        self._handshake_failures += 1
        level = logging.WARNING if self._handshake_failures % 100 == 1 else logging.DEBUG
        mine = "a cluster secret" if self._secret else "no cluster secret"
        logger.log(level, "TLS handshake with peer %s at %s failed: wrong cluster secret, or a peer without one? "
                   "(this node has %s; %d failures) %s", self._id, self._address, mine, self._handshake_failures,
                   e.details())
        return True

    def _rpc_error(self, method: str, e: grpc.aio.AioRpcError, unreachable: frozenset[grpc.StatusCode]) -> Exception:
        """``ConnectionError`` for a status in ``unreachable`` (the peer is gone or too slow;
        a failed TLS handshake is logged, see ``_note_handshake_failure``), else
        ``RuntimeError`` with the peer's message."""
        code, details = e.code(), e.details()
        if self._note_handshake_failure(e):
            return ConnectionError(f"peer {self._id} at {self._address}: {method}: TLS handshake failed "
                                   f"(wrong cluster secret?): {details}")
        if code in unreachable:
            return ConnectionError(f"peer {self._id} at {self._address}: {method}: {code.name}: {details}")
        return RuntimeError(f"peer {self._id}: {details}")

    async def _call(self, method: str, call: Callable[[pb_grpc.NodeServiceStub], Awaitable[_T]]) -> _T:
        try:
            return await call(self._get_stub())
        except grpc.aio.AioRpcError as e:
            raise self._rpc_error(method, e, _UNREACHABLE_CODES) from e

    async def _open_stream(self) -> RingStream:
        """The open ``Stream`` call to the peer, opened if needed. Raises as ``_call``."""
        async with self._stream_lock:
            if self._stream is not None and self._stream.alive:
                return self._stream
            if self._stream is not None:
                await self._stream.close()
                self._stream = None
            disconnects = self._disconnects
            stream = self._stream = RingStream(self._get_stub().Stream())
            try:
                await stream.ready(CALL_TIMEOUT)
                if self._disconnects != disconnects:  # disconnect() ran meanwhile: it would miss this call
                    raise ConnectionError("disconnected while opening the ring stream")
            except BaseException as e:
                if self._stream is stream:
                    self._stream = None
                await stream.close()
                if isinstance(e, (grpc.aio.AioRpcError, asyncio.TimeoutError, ConnectionError)):
                    raise self._ring_error("Stream", e) from e
                raise
            return stream

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
            cause = e.__cause__
            if isinstance(cause, grpc.aio.AioRpcError) and self._note_handshake_failure(cause):
                return ConnectionError(f"peer {self._id} at {self._address}: {method}: TLS handshake failed "
                                       f"(wrong cluster secret?): {cause.details()}")
            return ConnectionError(f"peer {self._id} at {self._address}: {method}: {e}")
        return e

    async def _send_ring(self, method: str, message: pb.RingMessage,
                         on_error: Callable[[BaseException], None] | None = None) -> None:
        """Send over the persistent stream; errors as ``_call`` raises them, or later to
        ``on_error`` (see ``PeerHandle.send_tensor``)."""
        report = None if on_error is None else (lambda e: on_error(self._ring_error(method, e)))
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
        await self._send_ring("SendPrompt", pb.RingMessage(prompt=request), on_error)

    async def send_tensor(self, ctx: RequestContext, hidden_states: np.ndarray, position: int,
                          on_error: Callable[[BaseException], None] | None = None) -> None:
        request = pb.TensorRequest(
            ctx=self._contexts.encode(ctx), hidden_states=codec.tensor_to_proto(hidden_states), position=position
        )
        await self._send_ring("SendTensor", pb.RingMessage(tensor=request), on_error)

    async def send_result(self, result: TokenResult, on_error: Callable[[BaseException], None] | None = None) -> None:
        request = codec.result_to_proto(result)
        await self._send_ring("SendResult", pb.RingMessage(result=request), on_error)

    async def end_request(self, request_id: str, keep_tokens: Sequence[int] = ()) -> None:
        end = pb.EndRequestRequest(request_id=request_id, keep_tokens=[int(t) for t in keep_tokens])
        await self._send_ring("EndRequest", pb.RingMessage(end=end))

    async def send_image_job(self, job: image_codec.ImageJob) -> None:
        await self._send_ring("SendImage", pb.RingMessage(image=image_codec.job_to_proto(job)))

    async def send_image_event(self, event: image_codec.ImageEvent,
                               on_error: Callable[[BaseException], None] | None = None) -> None:
        await self._send_ring("SendImageEvent", pb.RingMessage(image_event=image_codec.event_to_proto(event)), on_error)

    async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
        request = pb.CollectTopologyRequest(visited=sorted(visited), max_depth=max_depth)
        response = await self._call(
            "CollectTopology", lambda s: s.CollectTopology(request, timeout=CALL_TIMEOUT)
        )
        try:
            return codec.topology_from_proto(response)
        except ValueError as e:
            raise RuntimeError(f"peer {self._id}: invalid topology: {e}") from e
