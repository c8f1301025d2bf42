"""The gRPC transport end to end on loopback: a real GRPCServer and GRPCPeerHandle around a
recording stand-in for the Node."""

from __future__ import annotations


import grpc
import numpy as np
import pytest
import pytest_asyncio

from exo.networking.grpc import codec
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc import node_service_pb2_grpc as pb_grpc
from exo.networking.grpc.peer_handle import GRPCPeerHandle
from exo.networking.grpc.server import GRPCServer
from exo.orchestration.request import RequestContext, TokenResult
from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.topology import NodeInfo, Topology

from helpers import make_request_context as make_ctx
from helpers import ring_exchange, unused_loopback_port

CAPS = DeviceCapabilities("test", "cpu", 1 << 30)


class RecordingNode:
    """Stands in for exo.orchestration.node.Node: records every call it receives."""

    def __init__(self, node_id: str = "b") -> None:
        self.id = node_id
        self.calls: list[tuple] = []
        self.requests = {"req-1"}
        self.healthy = True
        self.fail_with: Exception | None = None

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    async def process_prompt(self, ctx: RequestContext, token_ids: np.ndarray, position: int) -> None:
        self._maybe_fail()
        self.calls.append(("prompt", ctx, token_ids, position))

    async def process_tensor(self, ctx: RequestContext, hidden_states: np.ndarray, position: int) -> None:
        self._maybe_fail()
        self.calls.append(("tensor", ctx, hidden_states, position))

    async def process_result(self, result: TokenResult) -> None:
        self._maybe_fail()
        self.calls.append(("result", result))

    async def end_request(self, request_id: str, keep_tokens=()) -> None:
        if request_id not in self.requests:
            raise KeyError(f"unknown request {request_id}")
        self.calls.append(("end", request_id))

    async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
        self.calls.append(("topology", visited, max_depth))
        topology = Topology()
        topology.add_node(NodeInfo(self.id, "127.0.0.1:1", CAPS))
        topology.add_edge(self.id, "a")
        return topology

    def is_healthy(self) -> bool:
        return self.healthy


@pytest_asyncio.fixture
async def node():
    return RecordingNode()


@pytest_asyncio.fixture
async def server(node: RecordingNode):
    srv = GRPCServer(node, "127.0.0.1", 0)
    await srv.start()
    yield srv
    await srv.stop(grace=0)


@pytest_asyncio.fixture
async def handle(server: GRPCServer):
    h = GRPCPeerHandle("b", f"127.0.0.1:{server.port}", CAPS)
    yield h
    await h.disconnect()


@pytest_asyncio.fixture
async def stub(server: GRPCServer):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.NodeServiceStub(channel)


@pytest.mark.asyncio
async def test_every_rpc_round_trips(node: RecordingNode, server: GRPCServer, handle: GRPCPeerHandle) -> None:
    assert server.port > 0
    assert handle.id() == "b" and handle.address() == f"127.0.0.1:{server.port}" and handle.device_capabilities() == CAPS
    await handle.connect()
    assert await handle.is_connected()
    assert await handle.health_check() is True

    ctx = make_ctx()
    tokens = np.array([[1, 2, 3, 4]], dtype=np.int64)
    hidden = np.random.default_rng(0).standard_normal((1, 4, 576)).astype(np.float32)
    result = TokenResult("req-1", tokens=[7], logprobs=[-0.25], top_logprobs=[[(7, -0.25), (8, -3.0)]])
    await handle.send_prompt(ctx, tokens, 0)
    await handle.send_tensor(ctx, hidden, 4)
    await handle.send_result(result)
    await handle.end_request("req-1")
    topology = await handle.collect_topology({"a", "c"}, 3)

    kinds = [c[0] for c in node.calls]
    assert kinds == ["prompt", "tensor", "result", "end", "topology"]
    _, got_ctx, got_tokens, got_pos = node.calls[0]
    assert got_ctx == ctx and got_pos == 0
    assert got_tokens.dtype == np.int64 and np.array_equal(got_tokens, tokens)
    _, got_ctx, got_hidden, got_pos = node.calls[1]
    assert got_ctx == ctx and got_pos == 4
    assert got_hidden.dtype == np.float32 and np.array_equal(got_hidden, hidden)
    assert node.calls[2] == ("result", result)
    assert node.calls[3] == ("end", "req-1")
    assert node.calls[4] == ("topology", {"a", "c"}, 3)
    assert set(topology.nodes) == {"b"} and topology.edges == {("b", "a")}

    node.healthy = False
    assert await handle.health_check() is False


@pytest.mark.asyncio
async def test_int32_prompt_and_float16_hidden_states_are_accepted(node: RecordingNode, handle: GRPCPeerHandle) -> None:
    await handle.send_prompt(make_ctx(), np.array([[5, 6]], dtype=np.int32), 3)
    await handle.send_tensor(make_ctx(), np.zeros((1, 2, 8), dtype=np.float16), 3)
    assert node.calls[0][2].dtype == np.int64  # tokens always reach the node as int64
    assert node.calls[1][2].dtype == np.float16


@pytest.mark.asyncio
async def test_bad_input_is_invalid_argument_and_server_keeps_serving(
    node: RecordingNode, stub: pb_grpc.NodeServiceStub, handle: GRPCPeerHandle
) -> None:
    ctx = codec.ctx_to_proto(make_ctx())
    bad_messages = [
        # tensor whose bytes do not match its shape
        pb.RingMessage(prompt=pb.PromptRequest(ctx=ctx, token_ids=pb.Tensor(data=b"\0" * 5, shape=[1, 2], dtype="int64"))),
        # unsupported dtype
        pb.RingMessage(tensor=pb.TensorRequest(ctx=ctx, hidden_states=pb.Tensor(data=b"", shape=[0], dtype="bfloat16"))),
        # wrong dtype for the message: float token ids, integer hidden states
        pb.RingMessage(prompt=pb.PromptRequest(ctx=ctx, token_ids=codec.tensor_to_proto(np.zeros((1, 2), np.float32)))),
        pb.RingMessage(tensor=pb.TensorRequest(ctx=ctx, hidden_states=codec.tensor_to_proto(np.zeros((1, 2, 3), np.int64)))),
        # wrong rank, negative position
        pb.RingMessage(prompt=pb.PromptRequest(ctx=ctx, token_ids=codec.tensor_to_proto(np.zeros(3, np.int64)))),
        pb.RingMessage(prompt=pb.PromptRequest(ctx=ctx, token_ids=codec.tensor_to_proto(np.zeros((1, 3), np.int64)), position=-1)),
        # request context failing validation, and none at all
        pb.RingMessage(prompt=pb.PromptRequest(ctx=pb.RequestContext(request_id="x"),
                                               token_ids=codec.tensor_to_proto(np.zeros((1, 3), np.int64)))),
        pb.RingMessage(result=pb.ResultRequest()),
        pb.RingMessage(end=pb.EndRequestRequest()),
    ]
    for ack in await ring_exchange(stub, bad_messages):
        assert ack.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], ack.details
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CollectTopology(pb.CollectTopologyRequest(max_depth=-1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert node.calls == []
    # through the handle, the peer's message arrives as a RuntimeError naming the peer
    with pytest.raises(RuntimeError, match=r"peer b: token_ids must have dtype int64 or int32, got float32"):
        await handle.send_prompt(make_ctx(), np.zeros((1, 2), np.float32), 0)
    assert await handle.health_check()
    await handle.send_result(TokenResult("req-1", tokens=[1]))
    assert node.calls == [("result", TokenResult("req-1", tokens=[1]))]


@pytest.mark.asyncio
async def test_node_errors_map_to_status_codes(node: RecordingNode, stub: pb_grpc.NodeServiceStub, handle: GRPCPeerHandle) -> None:
    ack, = await ring_exchange(stub, [pb.RingMessage(end=pb.EndRequestRequest(request_id="nope"))])
    assert ack.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert ack.details == "unknown request nope"
    with pytest.raises(RuntimeError, match="peer b: unknown request nope"):
        await handle.end_request("nope")

    node.fail_with = ValueError("max_tokens too large for this node")
    ack, = await ring_exchange(stub, [pb.RingMessage(result=codec.result_to_proto(TokenResult("req-1")))])
    assert ack.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "max_tokens too large" in ack.details

    node.fail_with = RuntimeError("engine exploded")
    ack, = await ring_exchange(stub, [pb.RingMessage(result=codec.result_to_proto(TokenResult("req-1")))])
    assert ack.code == grpc.StatusCode.INTERNAL.value[0]
    assert "engine exploded" in ack.details

    node.fail_with = None
    assert await handle.health_check()


@pytest.mark.asyncio
async def test_unreachable_peer_raises_connection_error() -> None:
    handle = GRPCPeerHandle("x", f"127.0.0.1:{unused_loopback_port()}", CAPS)
    try:
        assert await handle.health_check() is False
        with pytest.raises(ConnectionError, match="peer x"):
            await handle.send_result(TokenResult("r"))
    finally:
        await handle.disconnect()


@pytest.mark.asyncio
async def test_health_check_rejects_a_different_node_on_the_address(server: GRPCServer) -> None:
    impostor = GRPCPeerHandle("someone-else", f"127.0.0.1:{server.port}", CAPS)
    try:
        assert await impostor.health_check() is False
    finally:
        await impostor.disconnect()


@pytest.mark.asyncio
async def test_port_in_use_is_an_error(server: GRPCServer) -> None:
    second = GRPCServer(RecordingNode(), "127.0.0.1", server.port)
    with pytest.raises(OSError, match="cannot bind"):
        await second.start()


@pytest.mark.asyncio
async def test_large_tensor(node: RecordingNode, handle: GRPCPeerHandle) -> None:
    hidden = np.ones((1, 4096, 576), dtype=np.float32)  # 9 MiB, above gRPC's 4 MiB default
    await handle.send_tensor(make_ctx(), hidden, 0)
    assert node.calls[0][2].shape == hidden.shape
