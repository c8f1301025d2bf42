"""The gRPC server of a node: decodes calls with the codec and hands them to the Node.

The server never crashes on bad input: undecodable or invalid requests are answered with
``INVALID_ARGUMENT``; exceptions of the node become ``INVALID_ARGUMENT`` (ValueError),
``NOT_FOUND`` (KeyError), ``UNAVAILABLE`` (NodeStoppingError: the node is shutting down, and the
sender fails over as from a node that is gone) or ``INTERNAL`` (anything else, logged with its
traceback).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, Sequence, TypeVar

import grpc
import numpy as np

from exo.networking.grpc import codec, image_codec
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc import node_service_pb2_grpc as pb_grpc
from exo.networking.grpc.tls import cluster_credentials
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

_PROMPT_DTYPES = ("int64", "int32")
_HIDDEN_DTYPES = ("float32", "float16")


class NodeLike(Protocol):
    """What the server needs of the Node (``exo.orchestration.node.Node``)."""

    id: str

    async def process_prompt(self, ctx: RequestContext, token_ids: np.ndarray, position: int) -> None: ...

    async def process_tensor(self, ctx: RequestContext, hidden_states: np.ndarray, position: int) -> None: ...

    async def process_result(self, result: TokenResult) -> None: ...

    async def end_request(self, request_id: str, keep_tokens: Sequence[int] = ()) -> None: ...

    async def process_image_job(self, job: image_codec.ImageJob) -> None: ...

    async def process_image_event(self, event: "image_codec.ImageEvent") -> None: ...

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
    """One peer's ``Stream`` of ring messages: each message is handled in order and answered
    with a RingAck carrying its status (the module docstring's mapping); a message marked
    ``errors_only`` is answered when it fails, and when it succeeds only if no ack went out for
    ``CUMULATIVE_ACK_INTERVAL`` seconds (an OK ack covers every earlier message)."""

    def __init__(self, servicer: "NodeServicer") -> None:
        self._handlers = {"prompt": servicer._prompt, "tensor": servicer._tensor, "result": servicer._result,
                          "end": servicer._end, "image": servicer._image, "image_event": servicer._image_event}
        self._loop = asyncio.get_running_loop()  # made on the loop, for its clock
        self._last_ack = self._loop.time()

    async def handle(self, message: pb.RingMessage) -> pb.RingAck | None:
        """Handle one message; the ack to send back, or None."""
        kind = message.WhichOneof("body")
        try:
            if kind is None:
                raise ValueError("a ring message needs a prompt, tensor, result, end, image or image_event")
            await self._handlers[kind](getattr(message, kind))
        except Exception as e:
            code, details = _status(e, f"Stream/{kind}")
            self._last_ack = self._loop.time()
            return pb.RingAck(seq=message.seq, code=code.value[0], details=details)
        if message.errors_only and self._loop.time() - self._last_ack < CUMULATIVE_ACK_INTERVAL:
            return None
        self._last_ack = self._loop.time()
        return pb.RingAck(seq=message.seq)


class NodeServicer(pb_grpc.NodeServiceServicer):
    """NodeService implementation that forwards decoded calls to a node."""

    def __init__(self, node: NodeLike) -> None:
        self._node = node
        self._contexts = codec.ContextCache()

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

    async def _end(self, request: pb.EndRequestRequest) -> None:
        if not request.request_id:
            raise ValueError("request_id is empty")
        if any(t < 0 for t in request.keep_tokens):
            raise ValueError("keep_tokens has a negative token id")
        await self._node.end_request(request.request_id, tuple(request.keep_tokens))

    async def _image(self, request: pb.ImageRequest) -> None:
        await self._node.process_image_job(image_codec.job_from_proto(request))

    async def _image_event(self, request: pb.ImageEvent) -> None:
        await self._node.process_image_event(image_codec.event_from_proto(request))

    async def Stream(self, request_iterator: AsyncIterator[pb.RingMessage], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RingAck]:
        """Serve a peer's persistent stream of ring messages (see ``RingSession``)."""
        # accepted: say so before the first message, so a client never writes into a call that
        # is being refused (see RingStream.ready)
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
    async def HealthCheck(
        self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(is_healthy=bool(self._node.is_healthy()), node_id=self._node.id)

    @_rpc
    async def CollectTopology(self, request: pb.CollectTopologyRequest, context: grpc.aio.ServicerContext) -> pb.Topology:
        if request.max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {request.max_depth}")
        topology = await self._node.collect_topology(set(request.visited), int(request.max_depth))
        return codec.topology_to_proto(topology)


class GRPCServer:
    """A node's gRPC server (``grpc.aio``).

    Args:
        node: the Node whose methods serve the calls (see ``NodeLike``).
        host: address to bind, e.g. "127.0.0.1" or "0.0.0.0" (IPv6 literals without brackets are fine).
        port: TCP port; 0 binds an ephemeral port, readable from ``.port`` after ``start()``.
        cluster_secret: when set, the server speaks only mutual TLS with certificates of the
            cluster CA derived from the secret (``exo.networking.grpc.tls``): a caller with another
            secret, none, or plaintext gRPC fails the handshake and reaches no method. Without
            it the server is plaintext and open to anyone who reaches the port (logged as a
            warning at start).
    """

    def __init__(self, node: NodeLike, host: str, port: int, cluster_secret: str | None = None) -> None:
        self.node = node
        self.host = host
        self.port = port
        self._cluster_secret = cluster_secret
        self._server: grpc.aio.Server | None = None

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
        credentials = cluster_credentials(self._cluster_secret) if self._cluster_secret else None
        server = grpc.aio.server(options=SERVER_OPTIONS)
        servicer = NodeServicer(self.node)
        pb_grpc.add_NodeServiceServicer_to_server(servicer, server)
        try:
            if credentials is not None:
                bound = server.add_secure_port(self.address, credentials.server_credentials())
            else:
                bound = server.add_insecure_port(self.address)
        except RuntimeError as e:
            await server.stop(None)  # an unstopped server warns when garbage-collected
            raise OSError(f"cannot bind gRPC server to {self.address}: {e}") from e
        if bound == 0:  # older gRPC versions report failure this way
            await server.stop(None)
            raise OSError(f"cannot bind gRPC server to {self.address}")
        self.port = bound
        await server.start()
        self._server = server
        node_id = getattr(self.node, "id", "?")
        if credentials is not None:
            logger.info("gRPC server of node %s listening on %s (mutual TLS, cluster CA from the secret)",
                        node_id, self.address)
        else:
            logger.warning("gRPC server of node %s listening on %s WITHOUT a cluster secret: cluster traffic "
                           "(prompts, activations, tokens) is unencrypted and unauthenticated, and anyone who "
                           "reaches this port can join; set a cluster secret (--cluster-secret or "
                           "EXO_CLUSTER_SECRET, the same long random string on every node) for mutual TLS",
                           node_id, self.address)

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving: new calls are refused at once, calls in flight get ``grace`` seconds to
        finish before being cancelled. Does nothing if not started."""
        server, self._server = self._server, None
        if server is None:
            return
        await server.stop(grace)
        logger.info("gRPC server on %s stopped", self.address)
