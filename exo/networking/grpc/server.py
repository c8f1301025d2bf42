"""The gRPC server of a node: decodes calls with the codec and hands them to the Node.

The server never crashes on bad input: undecodable or invalid requests are answered with
``INVALID_ARGUMENT``; exceptions of the node become ``INVALID_ARGUMENT`` (ValueError),
``NOT_FOUND`` (KeyError), ``UNAVAILABLE`` (NodeStoppingError: the node is shutting down, and the
sender fails over as from a node that is gone) or ``INTERNAL`` (anything else, logged with its
traceback).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from exo.networking.grpc import codec
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc import node_service_pb2_grpc as pb_grpc
from exo.networking.grpc.auth import CLUSTER_KEY_METADATA, REFUSED_TEXT, cluster_key, key_matches
from exo.networking.ring_lane import LaneSession, RingLaneServer, ring_lane_by_default
from exo.networking.ring_socket import RingSocketServer
from exo.orchestration.errors import NodeStoppingError
from exo.orchestration.request import RequestContext, TokenResult
from exo.topology.topology import Topology

logger = logging.getLogger(__name__)

#: Largest message either side sends or accepts, in bytes.
MAX_MESSAGE_LENGTH = 256 * 1024 * 1024

#: Options of every node's gRPC server.
SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_LENGTH),
    ("grpc.max_receive_message_length", MAX_MESSAGE_LENGTH),
    # gRPC sets SO_REUSEPORT by default on Linux, which would let two nodes bind the same port
    # and have the kernel split connections between them. One port, one node.
    ("grpc.so_reuseport", 0),
)

#: Longest error detail sent back to a caller, in characters.
MAX_ERROR_DETAIL = 2000
#: On a ring stream, longest time between OK acks while ``errors_only`` messages succeed, in
#: seconds: the sender forgets the messages they cover (see ``RingMessage.errors_only``).
CUMULATIVE_ACK_INTERVAL = 0.1
#: Longest a ring lane's thread waits for the event loop to take a message, in seconds.
LANE_HANDOFF_TIMEOUT = 30.0

_PROMPT_DTYPES = ("int64", "int32")
_HIDDEN_DTYPES = ("float32", "float16")


class NodeLike(Protocol):
    """What the server needs of the Node (``exo.orchestration.node.Node``). A node may also have
    ``step_now`` (see ``RingLaneSession``), for decode steps run on a ring lane's thread."""

    id: str

    async def process_prompt(self, ctx: RequestContext, token_ids: np.ndarray, position: int) -> None: ...

    async def process_tensor(self, ctx: RequestContext, hidden_states: np.ndarray, position: int) -> None: ...

    async def process_result(self, result: TokenResult) -> None: ...

    async def end_request(self, request_id: str) -> None: ...

    async def collect_topology(self, visited: set[str], max_depth: int) -> Topology: ...

    def is_healthy(self) -> bool: ...


_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Handler = Callable[[Any, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]]


def _detail(exc: BaseException) -> str:
    # KeyError's str() wraps its message in quotes; show the message itself
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = text or type(exc).__name__
    return text[:MAX_ERROR_DETAIL]


def _status(exc: Exception, name: str) -> tuple[grpc.StatusCode, str]:
    """The status code and detail of a handler's exception (see the module docstring), logged."""
    if isinstance(exc, ValueError):
        logger.info("%s: invalid argument: %s", name, exc)
        return grpc.StatusCode.INVALID_ARGUMENT, _detail(exc)
    if isinstance(exc, KeyError):
        logger.info("%s: not found: %s", name, _detail(exc))
        return grpc.StatusCode.NOT_FOUND, _detail(exc)
    if isinstance(exc, NodeStoppingError):
        logger.info("%s: %s", name, exc)
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    logger.error("%s failed", name, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {_detail(exc)}"


def _rpc(handler: _Handler) -> _Handler:
    """Map a handler's exceptions to gRPC status codes (see the module docstring)."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            code, details = _status(e, handler.__name__)
            await context.abort(code, details)

    return wrapper


def _check_tensor(name: str, array: np.ndarray, dtypes: tuple[str, ...], ndim: int) -> None:
    if array.dtype.name not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(dtypes)}, got {array.dtype.name}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {list(array.shape)}")


def _check_position(position: int) -> None:
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")


def _decode_step(request: pb.PromptRequest | pb.TensorRequest,
                 contexts: codec.ContextCache) -> tuple[RequestContext, np.ndarray, int, TokenResult | None]:
    """A prompt's or a tensor's step, decoded and checked: its context, its input (token ids,
    int64, (1, T), or hidden states, float32/float16, (1, T, hidden)), its position, and the
    previous step's result a prompt may carry (else None).

    Raises:
        ValueError: a field the codec rejects, a wrong dtype or rank, a negative position.
    """
    ctx = contexts.decode(request.ctx)
    prompt = isinstance(request, pb.PromptRequest)
    if prompt:
        x = codec.tensor_from_proto(request.token_ids)
        _check_tensor("token_ids", x, _PROMPT_DTYPES, 2)
        x = x.astype(np.int64, copy=False)
    else:
        x = codec.tensor_from_proto(request.hidden_states)
        _check_tensor("hidden_states", x, _HIDDEN_DTYPES, 3)
    _check_position(request.position)
    result = codec.result_from_proto(request.result) if prompt and request.HasField("result") else None
    return ctx, x, int(request.position), result


class RingSession:
    """One peer's stream of ring messages (a gRPC ``Stream`` call or a ring WebSocket): each
    message is handled like its unary counterpart and answered, in order, with a RingAck
    carrying that call's status; a message marked ``errors_only`` is answered when it fails,
    and when it succeeds only if no ack went out for ``CUMULATIVE_ACK_INTERVAL`` seconds (an OK
    ack covers every earlier message)."""

    def __init__(self, servicer: "NodeServicer") -> None:
        self._handlers = {"prompt": servicer._prompt, "tensor": servicer._tensor, "result": servicer._result}
        self._loop = asyncio.get_running_loop()  # made on the loop, for its clock
        self._last_ack = self._loop.time()

    async def handle(self, message: pb.RingMessage) -> pb.RingAck | None:
        """Handle one message; the ack to send back, or None."""
        kind = message.WhichOneof("body")
        try:
            if kind is None:
                raise ValueError("a ring message needs a prompt, tensor or result")
            await self._handlers[kind](getattr(message, kind))
        except Exception as e:
            code, details = _status(e, f"Stream/{kind}")
            self._last_ack = self._loop.time()
            return pb.RingAck(seq=message.seq, code=code.value[0], details=details)
        if message.errors_only and self._loop.time() - self._last_ack < CUMULATIVE_ACK_INTERVAL:
            return None
        self._last_ack = self._loop.time()
        return pb.RingAck(seq=message.seq)

    async def handle_bytes(self, data: bytes) -> pb.RingAck | None:
        """``handle`` for a serialized message; undecodable bytes get an INVALID_ARGUMENT ack
        of seq 0 (their seq is unknown)."""
        try:
            message = pb.RingMessage.FromString(data)
        except DecodeError as e:
            logger.info("ring socket: an undecodable message: %s", e)
            return pb.RingAck(seq=0, code=grpc.StatusCode.INVALID_ARGUMENT.value[0], details=f"not a RingMessage: {e}")
        return await self.handle(message)


class RingLaneSession(LaneSession):
    """One ring lane connection's messages (``exo.networking.ring_lane``), on its thread.

    A decode step that the node can run at once (``Node.step_now``: a lone request's step on a
    shard it holds) runs on this thread, which also sends its output on. Every other message,
    and every message that fails to decode, is handled by a ``RingSession`` on the event loop,
    as if it came over the ring WebSocket (same checks, same acks) while this thread waits: the
    connection's messages keep their order.
    """

    def __init__(self, servicer: "NodeServicer", loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._loop = loop
        self._step_now = getattr(servicer._node, "step_now", None)
        self._contexts = codec.ContextCache()  # this thread's own: the servicer's is the loop's
        self._session: RingSession | None = None
        self._last_ack = time.monotonic()
        self._handoff: concurrent.futures.Future | None = None  # a message the loop is handling
        self._closed = False

    def handle(self, data: bytes) -> pb.RingAck | None:
        try:
            message = pb.RingMessage.FromString(data)
        except DecodeError as e:
            logger.info("ring lane: an undecodable message: %s", e)
            return pb.RingAck(seq=0, code=grpc.StatusCode.INVALID_ARGUMENT.value[0], details=f"not a RingMessage: {e}")
        if self._step_now is not None and self._run_now(message):
            now = time.monotonic()
            if message.errors_only and now - self._last_ack < CUMULATIVE_ACK_INTERVAL:
                return None
            self._last_ack = now
            return pb.RingAck(seq=message.seq)
        return self._on_loop(message)

    def _run_now(self, message: pb.RingMessage) -> bool:
        """Whether the node took ``message`` as a step run at once (see ``Node.step_now``)."""
        kind = message.WhichOneof("body")
        if kind not in ("prompt", "tensor"):
            return False
        request = getattr(message, kind)
        if request.position <= 0:  # a prefill: the loop's path
            return False
        try:
            ctx, x, position, result = _decode_step(request, self._contexts)
        except Exception:  # the loop's handler tells the sender what is wrong
            return False
        return self._step_now(ctx, x, position, result)

    def _on_loop(self, message: pb.RingMessage) -> pb.RingAck | None:
        async def handle() -> pb.RingAck | None:
            if self._session is None:
                self._session = RingSession(self._servicer)
            return await self._session.handle(message)

        try:
            if self._closed:
                raise RuntimeError("the server is stopping")
            coro = handle()
            try:
                self._handoff = asyncio.run_coroutine_threadsafe(coro, self._loop)
            except RuntimeError:  # the loop is closed
                coro.close()
                raise
            if self._closed:  # close() ran before the handoff was set
                self._handoff.cancel()
            return self._handoff.result(LANE_HANDOFF_TIMEOUT)
        except (RuntimeError, concurrent.futures.TimeoutError, concurrent.futures.CancelledError) as e:
            # the loop is closed or stuck: as a stopping node, so the sender fails over
            return pb.RingAck(seq=message.seq, code=grpc.StatusCode.UNAVAILABLE.value[0],
                              details=f"node {self._servicer._node.id} did not take the message: {type(e).__name__}")
        finally:
            self._handoff = None

    def close(self) -> None:
        self._closed = True
        handoff = self._handoff
        if handoff is not None:
            handoff.cancel()


class NodeServicer(pb_grpc.NodeServiceServicer):
    """NodeService implementation that forwards decoded calls to a node."""

    def __init__(self, node: NodeLike) -> None:
        self._node = node
        self._contexts = codec.ContextCache()
        #: The port of the node's ring WebSocket, told in health checks (0: none).
        self.ring_port = 0
        #: The port of the node's ring lane, told in health checks (0: none).
        self.lane_port = 0

    async def _prompt(self, request: pb.PromptRequest) -> None:
        ctx, token_ids, position, result = _decode_step(request, self._contexts)
        if result is not None:  # the previous step's result, for this node as the origin
            await self._node.process_result(result)
        await self._node.process_prompt(ctx, token_ids, position)

    async def _tensor(self, request: pb.TensorRequest) -> None:
        ctx, hidden_states, position, _ = _decode_step(request, self._contexts)
        await self._node.process_tensor(ctx, hidden_states, position)

    async def _result(self, request: pb.ResultRequest) -> None:
        await self._node.process_result(codec.result_from_proto(request))

    @_rpc
    async def SendPrompt(self, request: pb.PromptRequest, context: grpc.aio.ServicerContext) -> pb.Empty:
        await self._prompt(request)
        return pb.Empty()

    @_rpc
    async def SendTensor(self, request: pb.TensorRequest, context: grpc.aio.ServicerContext) -> pb.Empty:
        await self._tensor(request)
        return pb.Empty()

    @_rpc
    async def SendResult(self, request: pb.ResultRequest, context: grpc.aio.ServicerContext) -> pb.Empty:
        await self._result(request)
        return pb.Empty()

    async def Stream(self, request_iterator: AsyncIterator[pb.RingMessage], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RingAck]:
        """Serve a peer's persistent stream of ring messages (see ``RingSession``)."""
        # accepted (the key check passed): say so before the first message, so a client never
        # writes into a call that is being refused (see _RingStream.ready)
        await context.send_initial_metadata(())
        session = RingSession(self)
        try:
            async for message in request_iterator:
                ack = await session.handle(message)
                if ack is not None:
                    yield ack
        except asyncio.CancelledError:
            # the server is stopping (or the peer cancelled): end the stream quietly; gRPC
            # would otherwise log the cancellation as an unhandled servicer exception
            logger.debug("a ring stream ended by cancellation")
            return

    @_rpc
    async def EndRequest(self, request: pb.EndRequestRequest, context: grpc.aio.ServicerContext) -> pb.Empty:
        if not request.request_id:
            raise ValueError("request_id is empty")
        await self._node.end_request(request.request_id)
        return pb.Empty()

    @_rpc
    async def HealthCheck(
        self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(is_healthy=bool(self._node.is_healthy()), node_id=self._node.id, ring_port=self.ring_port,
                                      lane_port=self.lane_port)

    @_rpc
    async def CollectTopology(self, request: pb.CollectTopologyRequest, context: grpc.aio.ServicerContext) -> pb.Topology:
        if request.max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {request.max_depth}")
        topology = await self._node.collect_topology(set(request.visited), int(request.max_depth))
        return codec.topology_to_proto(topology)


class ClusterKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call whose ``x-exo-cluster-key`` metadata is not hex sha256 of the secret
    with ``UNAUTHENTICATED`` ("wrong or missing cluster key")."""

    def __init__(self, cluster_secret: str) -> None:
        self._key = cluster_key(cluster_secret)

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED_TEXT)

        async def deny_stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED_TEXT)

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny_stream)
        self._rejected = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        presented = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == CLUSTER_KEY_METADATA:
                presented = value
                break
        if key_matches(self._key, presented):
            return await continuation(handler_call_details)
        self._rejected += 1
        # a foreign node retries every health-check interval: warn on the first and every 100th
        level = logging.WARNING if self._rejected % 100 == 1 else logging.DEBUG
        logger.log(level, "rejected %s: %s (%d rejected calls)", handler_call_details.method, REFUSED_TEXT, self._rejected)
        return self._deny_stream if handler_call_details.method.endswith("/Stream") else self._deny


class GRPCServer:
    """A node's gRPC server (``grpc.aio``).

    Args:
        node: the Node whose methods serve the calls (see ``NodeLike``).
        host: address to bind, e.g. "127.0.0.1" or "0.0.0.0" (IPv6 literals without brackets are fine).
        port: TCP port; 0 binds an ephemeral port, readable from ``.port`` after ``start()``.
        cluster_secret: when set, calls without the matching cluster key are rejected
            with ``UNAUTHENTICATED``.
        ring_port: TCP port of the ring WebSocket served next to it on ``host``
            (``exo.networking.ring_socket``; 0: a free port, readable from ``.ring_port``);
            None: none, peers use the gRPC ``Stream``.
        lane_port: TCP port of the ring lane served on ``host`` (``exo.networking.ring_lane``;
            0: a free port, readable from ``.lane_port``); None: none (``EXO_RING_LANE=0``
            makes that the default).
    """

    def __init__(self, node: NodeLike, host: str, port: int, cluster_secret: str | None = None,
                 ring_port: int | None = 0, lane_port: int | None = 0) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.ring_port = ring_port
        self.lane_port = lane_port if ring_lane_by_default() else None
        self._lane: RingLaneServer | None = None
        self._cluster_secret = cluster_secret
        self._server: grpc.aio.Server | None = None
        self._ring_socket: RingSocketServer | None = None

    @property
    def address(self) -> str:
        """"host:port" the server is bound to (the actual port once started)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            RuntimeError: already started.
            OSError: the address cannot be bound (e.g. the port is in use: servers do not
                share ports, SO_REUSEPORT is off).
        """
        if self._server is not None:
            raise RuntimeError("GRPCServer already started")
        interceptors = [ClusterKeyInterceptor(self._cluster_secret)] if self._cluster_secret else []
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        servicer = NodeServicer(self.node)
        pb_grpc.add_NodeServiceServicer_to_server(servicer, server)
        try:
            bound = server.add_insecure_port(self.address)
        except RuntimeError as e:
            await server.stop(None)  # an unstopped server warns when garbage-collected
            raise OSError(f"cannot bind gRPC server to {self.address}: {e}") from e
        if bound == 0:  # older gRPC versions report failure this way
            await server.stop(None)
            raise OSError(f"cannot bind gRPC server to {self.address}")
        self.port = bound
        if self.ring_port is not None:
            ring_socket = RingSocketServer(lambda: RingSession(servicer), self.host, self.ring_port,
                                           cluster_key(self._cluster_secret) if self._cluster_secret else None, MAX_MESSAGE_LENGTH)
            try:
                await ring_socket.start()
            except BaseException:
                await server.stop(None)
                raise
            self._ring_socket = ring_socket
            self.ring_port = servicer.ring_port = ring_socket.port
        if self.lane_port is not None:
            loop = asyncio.get_running_loop()
            lane = RingLaneServer(lambda: RingLaneSession(servicer, loop), self.host, self.lane_port,
                                  cluster_key(self._cluster_secret) if self._cluster_secret else None, MAX_MESSAGE_LENGTH)
            try:
                lane.start()
            except BaseException:
                if self._ring_socket is not None:
                    await self._ring_socket.stop()
                    self._ring_socket = None
                await server.stop(None)
                raise
            self._lane = lane
            self.lane_port = servicer.lane_port = lane.port
        await server.start()
        self._server = server
        logger.info("gRPC server of node %s listening on %s", getattr(self.node, "id", "?"), self.address)

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving: new calls are refused at once, calls in flight get ``grace`` seconds to
        finish before being cancelled. Does nothing if not started."""
        server, self._server = self._server, None
        if server is None:
            return
        ring_socket, self._ring_socket = self._ring_socket, None
        if ring_socket is not None:
            await ring_socket.stop()
        lane, self._lane = self._lane, None
        if lane is not None:  # in a thread: its connections' threads may be waiting on this loop
            await asyncio.to_thread(lane.stop)
        await server.stop(grace)
        logger.info("gRPC server on %s stopped", self.address)
