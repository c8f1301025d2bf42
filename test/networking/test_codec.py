"""Round trips through the codec, and rejection of malformed tensors and contexts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from exo.inference.generation import GenerationOptions
from exo.inference.shard import Shard
from exo.networking.grpc import codec
from exo.networking.grpc import node_service_pb2 as pb
from exo.orchestration.request import RequestContext, TokenResult
from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.topology.partitioning import Partition
from exo.topology.topology import NodeInfo, Topology

from helpers import make_request_context as make_ctx


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "int32"])
@pytest.mark.parametrize("shape", [(), (0,), (1, 7), (1, 3, 576), (2, 1, 1, 1, 1, 1, 1, 3)])
def test_tensor_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    back = codec.tensor_from_proto(codec.tensor_to_proto(array))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable


def test_tensor_non_contiguous_and_big_endian() -> None:
    array = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]  # non-contiguous view
    np.testing.assert_array_equal(codec.tensor_from_proto(codec.tensor_to_proto(array)), array)
    big = np.arange(5, dtype=">i8")
    msg = codec.tensor_to_proto(big)
    assert msg.dtype == "int64" and msg.data == np.arange(5, dtype="<i8").tobytes()
    np.testing.assert_array_equal(codec.tensor_from_proto(msg), np.arange(5))


def test_tensor_to_proto_rejects_unsupported() -> None:
    with pytest.raises(ValueError, match="float64"):
        codec.tensor_to_proto(np.zeros(3))
    with pytest.raises(ValueError, match="dimensions"):
        codec.tensor_to_proto(np.zeros((1,) * 9, dtype=np.float32))


@pytest.mark.parametrize(
    "msg, match",
    [
        (pb.Tensor(data=b"\0" * 8, shape=[1], dtype="float64"), "dtype"),
        (pb.Tensor(data=b"\0" * 8, shape=[2], dtype=""), "dtype"),
        (pb.Tensor(data=b"\0" * 7, shape=[2], dtype="float32"), "needs 8 bytes, got 7"),
        (pb.Tensor(data=b"\0" * 12, shape=[2], dtype="float32"), "needs 8 bytes, got 12"),
        (pb.Tensor(data=b"", shape=[-1, 0], dtype="int32"), "negative"),
        (pb.Tensor(data=b"\0" * 4, shape=[1] * 9, dtype="int32"), "dimensions"),
        (pb.Tensor(data=b"", shape=[2**62, 2**62], dtype="int64"), "bytes"),
    ],
)
def test_tensor_from_proto_rejects_malformed(msg: pb.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        codec.tensor_from_proto(msg)


def test_ctx_round_trip() -> None:
    ctx = make_ctx()
    assert codec.ctx_from_proto(codec.ctx_to_proto(ctx)) == ctx
    no_seed = make_ctx(options=GenerationOptions(seed=None))
    msg = codec.ctx_to_proto(no_seed)
    assert not msg.options.HasField("seed")
    assert codec.ctx_from_proto(msg) == no_seed
    zero_seed = make_ctx(options=GenerationOptions(seed=0))
    assert codec.ctx_from_proto(codec.ctx_to_proto(zero_seed)).options.seed == 0


def test_grammar_and_logit_bias_round_trip() -> None:
    from exo.inference.grammar import json_schema_grammar

    options = GenerationOptions(grammar=json_schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}}),
                                logit_bias={49151: -100, 7: 2.5, 0: 100})
    ctx = make_ctx(options=options)
    decoded = codec.ctx_from_proto(pb.RequestContext.FromString(codec.ctx_to_proto(ctx).SerializeToString()))
    assert decoded == ctx
    assert decoded.options.logit_bias == ((0, 100.0), (7, 2.5), (49151, -100.0))
    plain = codec.ctx_to_proto(make_ctx(options=GenerationOptions()))
    assert not plain.options.HasField("grammar") and not plain.options.logit_bias
    assert codec.ctx_from_proto(plain).options.grammar is None


def test_options_from_proto_rejects_a_bias_out_of_range() -> None:
    msg = codec.ctx_to_proto(make_ctx())
    msg.options.logit_bias[5] = 101.0
    with pytest.raises(ValueError, match="logit_bias"):
        codec.ctx_from_proto(msg)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(request_id=""), "request_id"),
        (dict(origin_node_id=""), "origin_node_id"),
        (dict(n_layers=0), "n_layers"),
        (dict(epoch=-1), "epoch"),
        (dict(prompt_len=-1), "prompt_len"),
        (dict(ring=()), "ring is empty"),
        (dict(ring=(Partition("a", "h:1", 0, 9), Partition("b", "h:2", 11, 29))), "starting at layer 10"),
        (dict(ring=(Partition("a", "h:1", 0, 9),)), "covers layers 0..9 of 30"),
        (dict(ring=(Partition("a", "h:1", 0, 9), Partition("a", "h:1", 10, 29))), "twice"),
    ],
)
def test_ctx_from_proto_rejects_invalid(overrides: dict, match: str) -> None:
    msg = codec.ctx_to_proto(make_ctx(**overrides))
    with pytest.raises(ValueError, match=match):
        codec.ctx_from_proto(msg)


def test_ctx_from_proto_rejects_bad_options() -> None:
    msg = codec.ctx_to_proto(make_ctx())
    msg.options.temperature = 5.0
    with pytest.raises(ValueError, match="temperature"):
        codec.ctx_from_proto(msg)
    msg.ClearField("options")
    with pytest.raises(ValueError, match="no generation options"):
        codec.ctx_from_proto(msg)
    msg = codec.ctx_to_proto(make_ctx())
    msg.ring[0].address = ""
    with pytest.raises(ValueError, match="empty address"):
        codec.ctx_from_proto(msg)


@pytest.mark.parametrize(
    "result",
    [
        TokenResult("r"),
        TokenResult("r", tokens=[5, 6, 7]),
        TokenResult("r", tokens=[2], finish_reason="stop"),
        TokenResult("r", finish_reason="error", error="node b: out of memory"),
        TokenResult("r", tokens=[3, 4], logprobs=[-0.5, -1.25], top_logprobs=[[(3, -0.5), (9, -2.0)], [(4, -1.25)]]),
        TokenResult("r", finish_reason="", error=""),  # empty strings are not None
    ],
)
def test_result_round_trip(result: TokenResult) -> None:
    assert codec.result_from_proto(codec.result_to_proto(result)) == result


def test_result_from_proto_rejects_malformed() -> None:
    with pytest.raises(ValueError, match="request_id"):
        codec.result_from_proto(pb.ResultRequest())
    msg = pb.ResultRequest(request_id="r", top_logprobs=[pb.TopLogprobs(token_ids=[1, 2], logprobs=[-1.0])])
    with pytest.raises(ValueError, match="top_logprobs"):
        codec.result_from_proto(msg)


def test_embedding_request_and_result_round_trip() -> None:
    ctx = make_ctx(options=GenerationOptions(max_tokens=1, pooling="last"))
    assert codec.ctx_from_proto(codec.ctx_to_proto(ctx)).options.pooling == "last"
    assert codec.ctx_from_proto(codec.ctx_to_proto(make_ctx())).options.pooling is None  # a generation
    vector = np.array([0.25, -1.5, 3.0], dtype=np.float32)
    back = codec.result_from_proto(codec.result_to_proto(TokenResult("r", finish_reason="stop", embedding=vector)))
    assert back == TokenResult("r", finish_reason="stop") and back.embedding.dtype == np.float32
    np.testing.assert_array_equal(back.embedding, vector)
    assert codec.result_from_proto(codec.result_to_proto(TokenResult("r"))).embedding is None
    msg = codec.ctx_to_proto(ctx)
    msg.options.pooling = "max"
    with pytest.raises(ValueError, match="pooling"):
        codec.ctx_from_proto(msg)
    msg = pb.ResultRequest(request_id="r", embedding=codec.tensor_to_proto(np.zeros((2, 3), dtype=np.float32)))
    with pytest.raises(ValueError, match="embedding"):
        codec.result_from_proto(msg)


def test_topology_and_capabilities_round_trip() -> None:
    caps_a = DeviceCapabilities("Linux x86_64", "Xeon", 64 << 30, DeviceFlops(1.5, 3.0, 6.0), 32 << 30, "H100", 80 << 30)
    caps_b = DeviceCapabilities("Mac", "M2", 16 << 30)
    assert codec.capabilities_from_proto(codec.capabilities_to_proto(caps_a)) == caps_a
    topology = Topology()
    topology.add_node(NodeInfo("a", "127.0.0.1:5000", caps_a))
    topology.add_node(NodeInfo("b", "[::1]:5001", caps_b))
    topology.add_edge("a", "b")
    topology.add_edge("b", "a")
    back = codec.topology_from_proto(codec.topology_to_proto(topology))
    assert back == topology
    assert codec.topology_from_proto(pb.Topology()) == Topology()
    with pytest.raises(ValueError, match="empty end"):
        codec.topology_from_proto(pb.Topology(edges=[pb.Edge(from_id="a")]))


def test_shard_round_trip() -> None:
    shard = Shard("m", 3, 9, 30)
    assert codec.shard_from_proto(codec.shard_to_proto(shard)) == shard
    with pytest.raises(ValueError):
        codec.shard_from_proto(pb.Shard(model_id="m", start_layer=5, end_layer=2, n_layers=30))


@pytest.mark.parametrize(
    "cls, message",
    [
        (RequestContext, pb.RequestContext),
        (GenerationOptions, pb.GenerationOptions),
        (TokenResult, pb.ResultRequest),
        (DeviceCapabilities, pb.DeviceCapabilities),
        (DeviceFlops, pb.DeviceFlops),
        (Partition, pb.Partition),
        (Shard, pb.Shard),
        (NodeInfo, pb.NodeInfo),
    ],
)
def test_proto_has_every_dataclass_field(cls: type, message: type) -> None:
    """A field added to a dataclass must be added to the proto (and the codec) too."""
    proto_fields = set(message.DESCRIPTOR.fields_by_name)
    missing = {f.name for f in dataclasses.fields(cls)} - proto_fields
    assert not missing, f"{message.DESCRIPTOR.full_name} lacks {sorted(missing)}: update node_service.proto and codec.py"


def test_failover_fields_round_trip() -> None:
    replay = make_ctx(epoch=3, generated_tokens=(5, 0, 49151))
    back = codec.ctx_from_proto(codec.ctx_to_proto(replay))
    assert back == replay and back.generated_tokens == (5, 0, 49151)
    msg = codec.ctx_to_proto(make_ctx(generated_tokens=(1, -2)))
    with pytest.raises(ValueError, match="generated_tokens"):
        codec.ctx_from_proto(msg)
    result = TokenResult("r", [7], epoch=4)
    assert codec.result_from_proto(codec.result_to_proto(result)).epoch == 4
    bad = codec.result_to_proto(result)
    bad.epoch = -1
    with pytest.raises(ValueError, match="epoch"):
        codec.result_from_proto(bad)


def test_context_cache_encodes_a_context_once_and_decodes_an_encoding_once():
    cache = codec.ContextCache(size=2)
    ctx = make_ctx()
    msg = cache.encode(ctx)
    assert cache.encode(ctx) is msg and msg == codec.ctx_to_proto(ctx)
    decoded = cache.decode(msg)
    assert decoded == ctx and cache.decode(codec.ctx_to_proto(ctx)) is decoded  # equal bytes, one object
    for i in range(3):  # bounded: the oldest entries go
        cache.decode(codec.ctx_to_proto(make_ctx(request_id=f"other-{i}")))
    assert cache.decode(msg) is not decoded and cache.decode(msg) == ctx
    # an invalid context is refused every time, never cached
    bad = codec.ctx_to_proto(make_ctx())
    bad.n_layers = 0
    for _ in range(2):
        with pytest.raises(ValueError, match="n_layers"):
            cache.decode(bad)
