"""A bad peer against a real node (real gRPC on loopback, the dummy engine): unknown request
ids, a ring the node is not in, garbage bytes and tensors of the wrong dtype get a gRPC error;
the node stays up and keeps answering requests."""

from __future__ import annotations

import uuid

import grpc
import numpy as np
import pytest

from exo.inference.dummy import expected_tokens
from exo.inference.generation import GenerationOptions
from exo.networking.grpc import codec
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc import node_service_pb2_grpc as pb_grpc
from exo.networking.grpc.tls import open_channel
from exo.orchestration.request import TokenResult
from exo.topology.partitioning import Partition

from helpers import loopback_config, make_request_context, ring_exchange

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"


async def test_bad_calls_get_grpc_errors_and_the_node_stays_up() -> None:
    from exo.orchestration.launcher import start_node

    secret = uuid.uuid4().hex
    running = await start_node(loopback_config(node_id=f"bad-{secret[:6]}", discovery_module="none", cluster_secret=secret,
                                               inference_engine="dummy", serve_api=False))
    node = running.node
    address = f"127.0.0.1:{running.server.port}"
    channel = open_channel(address, secret)  # a bad peer inside the cluster: it holds the secret
    stub = pb_grpc.NodeServiceStub(channel)
    try:
        ring = (Partition(node.id, node.address, 0, 29),)
        ctx = codec.ctx_to_proto(make_request_context(request_id="never-seen", origin_node_id=node.id, ring=ring))
        other_ring = codec.ctx_to_proto(make_request_context(origin_node_id=node.id))  # nodes "a" and "b" only
        tokens = codec.tensor_to_proto(np.array([[40, 41]], dtype=np.int64))
        expect = [
            (pb.RingMessage(prompt=pb.PromptRequest(ctx=ctx, token_ids=tokens, position=3)),
             grpc.StatusCode.NOT_FOUND, "unknown request never-seen"),
            (pb.RingMessage(result=codec.result_to_proto(TokenResult("never-seen", [5]))),
             grpc.StatusCode.NOT_FOUND, "unknown request never-seen"),
            (pb.RingMessage(prompt=pb.PromptRequest(ctx=other_ring, token_ids=tokens)),
             grpc.StatusCode.NOT_FOUND, "is not in the ring"),
            (pb.RingMessage(prompt=pb.PromptRequest(ctx=ctx, token_ids=codec.tensor_to_proto(np.zeros((1, 2), np.float16)))),
             grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
            (pb.RingMessage(tensor=pb.TensorRequest(ctx=ctx, hidden_states=codec.tensor_to_proto(np.zeros((1, 2, 8), np.float32)))),
             grpc.StatusCode.INVALID_ARGUMENT, "holds layer 0"),
        ]
        acks = await ring_exchange(stub, [m for m, _, _ in expect])
        for ack, (_, code, text) in zip(acks, expect):
            assert ack.code == code.value[0] and text in ack.details, ack.details
        # bytes that are no protobuf message at all end the stream, and only it
        raw = channel.stream_stream("/exo.node_service.NodeService/Stream")
        call = raw()
        await call.write(b"\xff\xfe garbage \x00\x01")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        # grpcio answers a message it cannot deserialize with UNKNOWN or INTERNAL ("... corrupt")
        assert info.value.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), info.value
        # without the secret, nothing gets through (a plaintext client fails before any call)
        async with grpc.aio.insecure_channel(address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.NodeServiceStub(plain).HealthCheck(pb.HealthCheckRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # still up and serving
        assert (await stub.HealthCheck(pb.HealthCheckRequest())).is_healthy
        out = [t async for r in node.generate(MODEL, [40, 41, 42], GenerationOptions(max_tokens=5, temperature=0.0))
               for t in r.tokens]
        assert out == expected_tokens([40, 41, 42], 5)
    finally:
        await channel.close()
        await running.stop()
