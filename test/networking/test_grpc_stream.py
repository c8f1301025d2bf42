"""Ring messages over the persistent bidirectional gRPC ``Stream``, the one transport of the ring:
order, per-message errors, one stream reused, a peer that goes away and comes back, the end
of a request (cluster secrets: test_tls.py)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import numpy as np
import pytest

from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc import node_service_pb2_grpc as pb_grpc
from exo.networking.grpc.peer_handle import GRPCPeerHandle
from exo.networking.grpc.server import GRPCServer
from exo.orchestration.request import RequestContext, TokenResult
from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.topology import Topology

from helpers import make_request_context as make_ctx
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

    async def end_request(self, request_id: str, keep_tokens=()) -> None:
        if request_id == "unknown":
            raise KeyError(f"unknown request {request_id}")
        self.calls.append(("end", request_id))

    async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
        return Topology()

    def is_healthy(self) -> bool:
        return True


@contextlib.asynccontextmanager
async def served():
    """(recorder, its server on loopback, a handle to it), torn down after."""
    node = Recorder()
    server = GRPCServer(node, "127.0.0.1", 0)
    await server.start()
    handle = GRPCPeerHandle("b", f"127.0.0.1:{server.port}", CAPS)
    try:
        yield node, server, handle
    finally:
        await handle.disconnect()
        await server.stop(grace=0)


@pytest.mark.asyncio
async def test_stream_keeps_order_reports_errors_per_message_and_is_reused() -> None:
    async with served() as (node, server, handle):
        ctx = make_ctx()
        await handle.send_prompt(ctx, np.array([[1, 2, 3]], dtype=np.int64), 0)
        stream = handle._stream
        assert stream is not None and stream.alive
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
        # the end of a request rides the same stream
        await handle.end_request("r")
        with pytest.raises(RuntimeError, match="peer b: unknown request unknown"):
            await handle.end_request("unknown")
        assert node.calls[-1] == ("end", "r")
        assert handle._stream is stream and stream.alive  # one stream for all of it


@pytest.mark.asyncio
async def test_messages_sent_without_waiting_report_their_failures_later() -> None:
    async with served() as (node, server, handle):
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


@pytest.mark.asyncio
async def test_a_message_the_peer_never_confirmed_fails_when_the_stream_breaks() -> None:
    async with served() as (node, server, handle):
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
    handle = GRPCPeerHandle("b", f"127.0.0.1:{port}", CAPS)
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
async def test_a_prompt_carries_the_result_of_its_step_to_the_origin() -> None:
    async with served() as (node, server, handle):
        ids = np.array([[7]], dtype=np.int64)
        await handle.send_prompt(make_ctx(), ids, 5, result=TokenResult("r", tokens=[7]))
        assert node.calls == [("result", 7), ("prompt", 5)]  # the result first, as its own call would come
        # a result the origin refuses fails the message before its prompt is scheduled
        with pytest.raises(RuntimeError, match="peer b: no request bad here"):
            await handle.send_prompt(make_ctx(), ids, 6, result=TokenResult("bad", tokens=[7]))
        assert node.calls == [("result", 7), ("prompt", 5)]


@pytest.mark.asyncio
async def test_an_empty_ring_message_is_invalid_and_the_stream_goes_on() -> None:
    async with served() as (node, server, handle):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = pb_grpc.NodeServiceStub(channel).Stream()
            await call.write(pb.RingMessage(seq=1))
            bad = await call.read()
            await call.write(pb.RingMessage(seq=2, end=pb.EndRequestRequest(request_id="")))
            empty_id = await call.read()
            await call.write(pb.RingMessage(seq=3, end=pb.EndRequestRequest(request_id="r")))
            ok = await call.read()
            await call.done_writing()
        assert bad.seq == 1 and bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "needs a prompt" in bad.details
        assert empty_id.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "request_id is empty" in empty_id.details
        assert ok.seq == 3 and ok.code == 0 and node.calls == [("end", "r")]
