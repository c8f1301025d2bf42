"""Ring messages over the persistent bidirectional ``Stream`` (the ring WebSocket, the gRPC call)
and the ring lane: order, per-message errors, one stream reused, a peer that goes away and
comes back, cluster keys."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import grpc
import numpy as np
import pytest

from exo.networking.grpc import codec
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc.auth import cluster_key
from exo.networking.grpc.peer_handle import GRPCPeerHandle, _GrpcRingCall
from exo.networking.grpc.server import MAX_MESSAGE_LENGTH, GRPCServer
from exo.networking.ring_lane import ACCEPTED, RingLane, read_frame, write_frame
from exo.networking.ring_socket import RingSocketCall
from exo.orchestration.request import RequestContext, TokenResult
from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.topology import Topology

from helpers import make_request_context as make_ctx
from helpers import unused_loopback_port
from helpers import wait_for

CAPS = DeviceCapabilities("test", "cpu", 1 << 30)


class Recorder:
    """Stands in for the Node: records ring messages; a result for request "bad" fails."""

    def __init__(self) -> None:
        self.id = "b"
        self.calls: list[tuple] = []
        self.release = asyncio.Event()  # a result for request "held" waits for it

    async def process_prompt(self, ctx: RequestContext, token_ids: np.ndarray, position: int) -> None:
        self.calls.append(("prompt", position))

    async def process_tensor(self, ctx: RequestContext, hidden_states: np.ndarray, position: int) -> None:
        self.calls.append(("tensor", position))

    async def process_result(self, result: TokenResult) -> None:
        if result.request_id == "bad":
            raise KeyError("no request bad here")
        if result.request_id == "held":
            await self.release.wait()
        self.calls.append(("result", result.tokens[0] if result.tokens else None))

    async def end_request(self, request_id: str) -> None: ...

    async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
        return Topology()

    def is_healthy(self) -> bool:
        return True


@contextlib.asynccontextmanager
async def served(stream: bool, transport: str = "websocket"):
    """(recorder, its server on loopback, a handle to it with ``stream``), torn down after.
    ``transport``: "websocket" (the ring WebSocket, the default), "grpc" (the Stream call) or
    "lane" (the ring lane for messages sent with ``on_error``, the WebSocket for the others)."""
    node = Recorder()
    server = GRPCServer(node, "127.0.0.1", 0)
    await server.start()
    handle = GRPCPeerHandle("b", f"127.0.0.1:{server.port}", CAPS, stream=stream, ring_socket=transport == "websocket",
                            ring_lane=transport == "lane")
    if transport == "lane":
        await handle.open_lane()
        assert handle._lane is not None and handle._lane.alive
    try:
        yield node, server, handle
    finally:
        await handle.disconnect()
        await server.stop(grace=0)


TRANSPORTS = pytest.mark.parametrize("transport", ["websocket", "grpc", "lane"])


@TRANSPORTS
@pytest.mark.asyncio
async def test_stream_keeps_order_reports_errors_per_message_and_is_reused(transport) -> None:
    async with served(stream=True, transport=transport) as (node, server, handle):
        ctx = make_ctx()
        await handle.send_prompt(ctx, np.array([[1, 2, 3]], dtype=np.int64), 0)
        stream = handle._stream
        assert stream is not None and stream.alive
        assert isinstance(stream.call, RingSocketCall if transport == "websocket" else _GrpcRingCall)
        # many messages at once from concurrent tasks: all delivered, in the order written
        await asyncio.gather(*(handle.send_result(TokenResult("r", tokens=[i])) for i in range(50)))
        assert [c for c in node.calls if c[0] == "result"] == [("result", i) for i in range(50)]
        # a message the peer rejects raises like the unary call would; the stream stays usable
        with pytest.raises(RuntimeError, match="peer b: no request bad here"):
            await handle.send_result(TokenResult("bad", tokens=[1]))
        with pytest.raises(RuntimeError, match="peer b: hidden_states must have 3 dimensions"):
            await handle.send_tensor(ctx, np.zeros((2, 576), np.float32), 3)
        await handle.send_tensor(ctx, np.zeros((1, 1, 576), np.float32), 3)
        assert node.calls[-1] == ("tensor", 3)
        assert handle._stream is stream and stream.alive  # one stream for all of it


@TRANSPORTS
@pytest.mark.asyncio
async def test_messages_sent_without_waiting_report_their_failures_later(transport) -> None:
    async with served(stream=True, transport=transport) as (node, server, handle):
        errors: list[BaseException] = []
        for i in range(50):
            await handle.send_result(TokenResult("r", tokens=[i]), on_error=errors.append)
        await handle.send_result(TokenResult("bad", tokens=[1]), on_error=errors.append)
        await handle.send_tensor(make_ctx(), np.zeros((2, 576), np.float32), 3, on_error=errors.append)
        await handle.send_result(TokenResult("r", tokens=[50]), on_error=errors.append)
        await wait_for(lambda: len(errors) == 2, timeout=10)
        assert isinstance(errors[0], RuntimeError) and str(errors[0]) == "peer b: no request bad here"
        assert isinstance(errors[1], RuntimeError) and "hidden_states must have 3 dimensions" in str(errors[1])
        assert [c for c in node.calls if c[0] == "result"] == [("result", i) for i in range(51)]
        # an acknowledged message confirms every one before it: nothing is left to report
        await handle.send_result(TokenResult("r", tokens=[51]))
        stream = handle._stream
        assert stream is not None and stream.alive and not stream._unconfirmed and len(errors) == 2


@TRANSPORTS
@pytest.mark.asyncio
async def test_a_message_the_peer_never_confirmed_fails_when_the_stream_breaks(transport) -> None:
    async with served(stream=True, transport=transport) as (node, server, handle):
        errors: list[BaseException] = []
        await handle.send_result(TokenResult("r", tokens=[1]))
        await handle.send_result(TokenResult("held", tokens=[2]), on_error=errors.append)
        await server.stop(grace=0)  # while the peer still handles it
        await wait_for(lambda: errors, timeout=10)
        assert len(errors) == 1 and isinstance(errors[0], ConnectionError) and "peer b" in str(errors[0])


@pytest.mark.asyncio
async def test_stream_to_a_peer_that_restarts() -> None:
    node = Recorder()
    server = GRPCServer(node, "127.0.0.1", 0)
    await server.start()
    port = server.port
    handle = GRPCPeerHandle("b", f"127.0.0.1:{port}", CAPS, stream=True)
    try:
        await handle.send_result(TokenResult("r", tokens=[1]))
        await server.stop(grace=0)
        with pytest.raises(ConnectionError, match="peer b"):
            await handle.send_result(TokenResult("r", tokens=[2]))
        server = GRPCServer(node, "127.0.0.1", port)
        await server.start()

        async def delivered() -> bool:
            try:
                await handle.send_result(TokenResult("r", tokens=[3]))
                return True
            except ConnectionError:
                return False

        await wait_for(delivered, timeout=20, interval=0.1)  # the channel reconnects with a short backoff
        assert node.calls[0] == ("result", 1) and node.calls[-1] == ("result", 3)
    finally:
        await handle.disconnect()
        await server.stop(grace=0)


@pytest.mark.asyncio
async def test_unary_calls_when_streaming_is_off() -> None:
    async with served(stream=False) as (node, server, handle):
        await handle.send_prompt(make_ctx(), np.array([[1]], dtype=np.int64), 0)
        with pytest.raises(RuntimeError, match="peer b: no request bad here"):
            await handle.send_result(TokenResult("bad", tokens=[1]))
        assert handle._stream is None and node.calls == [("prompt", 0)]


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.asyncio
async def test_a_prompt_carries_the_result_of_its_step_to_the_origin(stream) -> None:
    async with served(stream=stream) as (node, server, handle):
        ids = np.array([[7]], dtype=np.int64)
        await handle.send_prompt(make_ctx(), ids, 5, result=TokenResult("r", tokens=[7]))
        assert node.calls == [("result", 7), ("prompt", 5)]  # the result first, as its own call would come
        # a result the origin refuses fails the message before its prompt is scheduled
        with pytest.raises(RuntimeError, match="peer b: no request bad here"):
            await handle.send_prompt(make_ctx(), ids, 6, result=TokenResult("bad", tokens=[7]))
        assert node.calls == [("result", 7), ("prompt", 5)]


@pytest.mark.asyncio
async def test_wrong_cluster_key_on_the_stream_says_so() -> None:
    # Regression: a stream refused by the server's key check surfaced as "the stream broke"
    # (when the refusal ended the call under the first write) instead of the peer's
    # UNAUTHENTICATED status and message.
    node = Recorder()
    server = GRPCServer(node, "127.0.0.1", 0, cluster_secret="s3cret")
    await server.start()
    hidden = np.zeros((1, 512, 576), dtype=np.float32)  # a large first write, still in flight when refused
    try:
        for _ in range(20):  # a fresh stream each time: the refusal lands before or during the write
            wrong = GRPCPeerHandle("b", f"127.0.0.1:{server.port}", CAPS, cluster_secret="other", stream=True)
            try:
                with pytest.raises(RuntimeError, match="wrong or missing cluster key"):
                    await wrong.send_tensor(make_ctx(), hidden, 0)
            finally:
                await wrong.disconnect()
        assert node.calls == []
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_a_peer_without_a_ring_socket_gets_the_grpc_stream() -> None:
    node = Recorder()
    server = GRPCServer(node, "127.0.0.1", 0, ring_port=None)
    await server.start()
    handle = GRPCPeerHandle("b", f"127.0.0.1:{server.port}", CAPS, stream=True, ring_socket=True)
    try:
        await handle.send_result(TokenResult("r", tokens=[1]))
        assert isinstance(handle._stream.call, _GrpcRingCall) and node.calls == [("result", 1)]
    finally:
        await handle.disconnect()
        await server.stop(grace=0)


@pytest.mark.asyncio
async def test_the_ring_socket_takes_its_configured_port_and_refuses_a_wrong_key() -> None:
    port = unused_loopback_port()
    server = GRPCServer(Recorder(), "127.0.0.1", 0, cluster_secret="s3cret", ring_port=port)
    await server.start()
    try:
        assert server.ring_port == port
        with pytest.raises(PermissionError, match="wrong or missing cluster key"):
            await RingSocketCall.connect("127.0.0.1", port, cluster_key("other"), MAX_MESSAGE_LENGTH, 5.0)
        with pytest.raises(PermissionError):
            await RingSocketCall.connect("127.0.0.1", port, None, MAX_MESSAGE_LENGTH, 5.0)
        call = await RingSocketCall.connect("127.0.0.1", port, cluster_key("s3cret"), MAX_MESSAGE_LENGTH, 5.0)
        await call.close()
    finally:
        await server.stop(grace=0)


@pytest.mark.asyncio
async def test_a_ring_socket_that_cannot_be_reached_falls_back_to_the_grpc_stream(caplog) -> None:
    async with served(stream=True) as (node, server, handle):
        await server._ring_socket.stop()  # the health check still tells its port: a firewalled port, say
        await handle.send_result(TokenResult("r", tokens=[1]))
        assert isinstance(handle._stream.call, _GrpcRingCall) and node.calls == [("result", 1)]
        assert "ring messages take the gRPC stream" in caplog.text


@pytest.mark.asyncio
async def test_a_ring_socket_that_never_answers_the_upgrade_fails_within_the_deadline() -> None:
    # Regression: the connect's deadline bounded only the close, so a port that accepted the
    # connection but never answered kept the sender waiting (aiohttp's default: 5 minutes).
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # holds the connection open, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10):
            with pytest.raises(ConnectionError, match="ring socket at 127.0.0.1"):
                await RingSocketCall.connect("127.0.0.1", port, None, MAX_MESSAGE_LENGTH, 0.5)
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_the_ring_lane_takes_its_configured_port_and_refuses_a_wrong_or_missing_key() -> None:
    port = unused_loopback_port()
    server = GRPCServer(Recorder(), "127.0.0.1", 0, cluster_secret="s3cret", lane_port=port)
    await server.start()
    try:
        assert server.lane_port == port
        for key in (cluster_key("other"), None):
            with pytest.raises(PermissionError, match="wrong or missing cluster key"):
                await asyncio.to_thread(RingLane.connect, "127.0.0.1", server.lane_port, key, MAX_MESSAGE_LENGTH, 5.0)
        lane = await asyncio.to_thread(RingLane.connect, "127.0.0.1", server.lane_port, cluster_key("s3cret"), MAX_MESSAGE_LENGTH, 5.0)
        assert lane.alive
        await asyncio.to_thread(lane.close)
        assert not lane.alive
    finally:
        await server.stop(grace=0)


@pytest.mark.asyncio
async def test_an_undecodable_lane_frame_is_answered_and_the_lane_goes_on() -> None:
    async with served(stream=True) as (node, server, handle):
        def exchange() -> list[pb.RingAck]:
            with socket.create_connection(("127.0.0.1", server.lane_port), timeout=10) as s:
                write_frame(s, b"")  # no cluster key
                assert s.recv(1) == ACCEPTED
                write_frame(s, b"\xff\xff\xff")
                first = pb.RingAck.FromString(read_frame(s, 1 << 20))
                message = pb.RingMessage(seq=7, result=codec.result_to_proto(TokenResult("r", tokens=[4])))
                write_frame(s, message.SerializeToString())
                return [first, pb.RingAck.FromString(read_frame(s, 1 << 20))]

        bad, ok = await asyncio.to_thread(exchange)
        assert bad.seq == 0 and bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "not a RingMessage" in bad.details
        assert ok.seq == 7 and ok.code == 0 and node.calls == [("result", 4)]


@pytest.mark.asyncio
async def test_a_peer_without_a_ring_lane_keeps_to_the_stream() -> None:
    node = Recorder()
    server = GRPCServer(node, "127.0.0.1", 0, lane_port=None)
    await server.start()
    handle = GRPCPeerHandle("b", f"127.0.0.1:{server.port}", CAPS, ring_lane=True)
    try:
        await handle.open_lane()
        assert handle._lane is None and not handle.wants_lane()
        errors: list[BaseException] = []
        await handle.send_result(TokenResult("r", tokens=[1]), on_error=errors.append)
        assert not handle.send_tensor_now(make_ctx(), np.zeros((1, 1, 576), np.float32), 3, errors.append)
        await wait_for(lambda: node.calls == [("result", 1)], timeout=10)
        assert errors == []
    finally:
        await handle.disconnect()
        await server.stop(grace=0)
