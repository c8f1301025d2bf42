"""The one place where numpy arrays and exo's dataclasses become protobuf messages and back.

Used by both the gRPC server and the peer handle, so the two sides cannot disagree. Imports no
ML backend: tensors cross the wire as dtype + shape + little-endian C-order bytes.

Every ``*_from_proto`` function validates what it decodes and raises ``ValueError`` with a
message naming the bad field; the server turns that into ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from exo.inference.generation import GenerationOptions
from exo.inference.shard import Shard
from exo.networking.grpc import node_service_pb2 as pb
from exo.orchestration.request import RequestContext, TokenResult
from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.topology.partitioning import Partition
from exo.topology.topology import NodeInfo, Topology

#: dtypes a Tensor may carry, by numpy name.
TENSOR_DTYPES: frozenset[str] = frozenset({"float32", "float16", "int64", "int32"})
#: most dimensions a Tensor may have.
MAX_TENSOR_DIMS = 8


# --- tensors -------------------------------------------------------------------------------


def tensor_to_proto(array: np.ndarray) -> pb.Tensor:
    """Encode a numpy array as a ``Tensor`` (little-endian, C order).

    Raises:
        ValueError: the dtype is not one of ``TENSOR_DTYPES`` or the array has more than
            ``MAX_TENSOR_DIMS`` dimensions.
    """
    array = np.asarray(array)
    dtype_name = array.dtype.name
    if dtype_name not in TENSOR_DTYPES:
        raise ValueError(f"tensor dtype {dtype_name!r} is not supported; use one of {sorted(TENSOR_DTYPES)}")
    if array.ndim > MAX_TENSOR_DIMS:
        raise ValueError(f"tensor has {array.ndim} dimensions; at most {MAX_TENSOR_DIMS} are supported")
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return pb.Tensor(data=little.tobytes(), shape=list(array.shape), dtype=dtype_name)


def tensor_from_proto(msg: pb.Tensor) -> np.ndarray:
    """Decode a ``Tensor`` into a new, writable numpy array in native byte order.

    Raises:
        ValueError: unsupported dtype, more than ``MAX_TENSOR_DIMS`` dimensions, a negative
            dimension, or ``product(shape) * itemsize != len(data)`` (bytes).
    """
    if msg.dtype not in TENSOR_DTYPES:
        raise ValueError(f"tensor dtype {msg.dtype!r} is not supported; expected one of {sorted(TENSOR_DTYPES)}")
    shape = tuple(int(d) for d in msg.shape)
    if len(shape) > MAX_TENSOR_DIMS:
        raise ValueError(f"tensor has {len(shape)} dimensions; at most {MAX_TENSOR_DIMS} are supported")
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
    dtype = np.dtype(msg.dtype).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if expected != len(msg.data):
        raise ValueError(
            f"tensor of shape {list(shape)} and dtype {msg.dtype} needs {expected} bytes, got {len(msg.data)}"
        )
    # astype to the native dtype copies, so the result is writable and independent of msg
    return np.frombuffer(msg.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


# --- shards, partitions, options, request context -----------------------------------------------


def shard_to_proto(shard: Shard) -> pb.Shard:
    """Encode a Shard."""
    return pb.Shard(
        model_id=shard.model_id, start_layer=shard.start_layer, end_layer=shard.end_layer, n_layers=shard.n_layers
    )


def shard_from_proto(msg: pb.Shard) -> Shard:
    """Decode a Shard. Raises ValueError for an empty model id or an invalid layer range."""
    if not msg.model_id:
        raise ValueError("shard has an empty model_id")
    return Shard(msg.model_id, int(msg.start_layer), int(msg.end_layer), int(msg.n_layers))


def partition_to_proto(p: Partition) -> pb.Partition:
    """Encode a Partition."""
    return pb.Partition(node_id=p.node_id, address=p.address, start_layer=p.start_layer, end_layer=p.end_layer)


def partition_from_proto(msg: pb.Partition) -> Partition:
    """Decode a Partition. Raises ValueError for an empty node id or address or an empty range."""
    if not msg.node_id:
        raise ValueError("partition has an empty node_id")
    if not msg.address:
        raise ValueError(f"partition of node {msg.node_id!r} has an empty address")
    if not 0 <= msg.start_layer <= msg.end_layer:
        raise ValueError(f"partition of node {msg.node_id!r} has an invalid layer range [{msg.start_layer}, {msg.end_layer}]")
    return Partition(msg.node_id, msg.address, int(msg.start_layer), int(msg.end_layer))


def options_to_proto(options: GenerationOptions) -> pb.GenerationOptions:
    """Encode GenerationOptions (``seed=None`` and ``grammar=None`` leave the optional fields unset)."""
    msg = pb.GenerationOptions(
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        stop_token_ids=list(options.stop_token_ids),
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        logprobs=options.logprobs,
        top_logprobs=options.top_logprobs,
        logit_bias=dict(options.logit_bias),
        pooling=options.pooling or "",
    )
    if options.seed is not None:
        msg.seed = options.seed
    if options.grammar is not None:
        msg.grammar = options.grammar
    return msg


def options_from_proto(msg: pb.GenerationOptions) -> GenerationOptions:
    """Decode GenerationOptions. Raises ValueError (from GenerationOptions) for an option out of range."""
    return GenerationOptions(
        max_tokens=int(msg.max_tokens),
        temperature=float(msg.temperature),
        top_p=float(msg.top_p),
        top_k=int(msg.top_k),
        seed=int(msg.seed) if msg.HasField("seed") else None,
        stop_token_ids=tuple(int(t) for t in msg.stop_token_ids),
        presence_penalty=float(msg.presence_penalty),
        frequency_penalty=float(msg.frequency_penalty),
        logprobs=bool(msg.logprobs),
        top_logprobs=int(msg.top_logprobs),
        grammar=msg.grammar if msg.HasField("grammar") else None,
        logit_bias=tuple((int(t), float(b)) for t, b in msg.logit_bias.items()),
        pooling=msg.pooling or None,
    )


def ctx_to_proto(ctx: RequestContext) -> pb.RequestContext:
    """Encode a RequestContext."""
    return pb.RequestContext(
        request_id=ctx.request_id,
        origin_node_id=ctx.origin_node_id,
        model_id=ctx.model_id,
        n_layers=ctx.n_layers,
        ring=[partition_to_proto(p) for p in ctx.ring],
        options=options_to_proto(ctx.options),
        prompt_len=ctx.prompt_len,
        epoch=ctx.epoch,
        generated_tokens=[int(t) for t in ctx.generated_tokens],
        prefix_entry=ctx.prefix_entry,
        prefix_tokens=ctx.prefix_tokens,
        prompt_cache=ctx.prompt_cache,
    )


def validate_ctx(ctx: RequestContext) -> None:
    """Check a RequestContext is usable.

    Requires non-empty ids, ``n_layers >= 1``, ``prompt_len >= 0``, ``epoch >= 0``, and a ring of distinct nodes
    whose layer ranges are contiguous, in order, and cover ``0 .. n_layers-1`` exactly.

    Raises:
        ValueError: naming the first problem found.
    """
    for name in ("request_id", "origin_node_id", "model_id"):
        if not getattr(ctx, name):
            raise ValueError(f"request context has an empty {name}")
    if ctx.n_layers < 1:
        raise ValueError(f"request {ctx.request_id}: n_layers must be >= 1, got {ctx.n_layers}")
    if ctx.prompt_len < 0:
        raise ValueError(f"request {ctx.request_id}: prompt_len must be >= 0, got {ctx.prompt_len}")
    if ctx.epoch < 0:
        raise ValueError(f"request {ctx.request_id}: epoch must be >= 0, got {ctx.epoch}")
    if any(t < 0 for t in ctx.generated_tokens):
        raise ValueError(f"request {ctx.request_id}: generated_tokens has a negative token id")
    if ctx.prefix_tokens < 0 or bool(ctx.prefix_entry) != (ctx.prefix_tokens > 0):
        raise ValueError(f"request {ctx.request_id}: a prompt cache prefix needs an entry and a positive token count, "
                         f"got {ctx.prefix_entry!r} and {ctx.prefix_tokens}")
    if not ctx.ring:
        raise ValueError(f"request {ctx.request_id}: the ring is empty")
    seen: set[str] = set()
    next_layer = 0
    for p in ctx.ring:
        if p.node_id in seen:
            raise ValueError(f"request {ctx.request_id}: node {p.node_id!r} appears twice in the ring")
        seen.add(p.node_id)
        if p.start_layer != next_layer or p.end_layer < p.start_layer:
            raise ValueError(
                f"request {ctx.request_id}: partition of {p.node_id!r} covers [{p.start_layer}, {p.end_layer}], "
                f"expected a range starting at layer {next_layer}"
            )
        next_layer = p.end_layer + 1
    if next_layer != ctx.n_layers:
        raise ValueError(f"request {ctx.request_id}: the ring covers layers 0..{next_layer - 1} of {ctx.n_layers}")


def ctx_from_proto(msg: pb.RequestContext) -> RequestContext:
    """Decode and validate a RequestContext (see ``validate_ctx``).

    Raises:
        ValueError: missing options, an option out of range, or a context failing ``validate_ctx``.
    """
    if not msg.HasField("options"):
        raise ValueError(f"request context of {msg.request_id!r} has no generation options")
    ctx = RequestContext(
        request_id=msg.request_id,
        origin_node_id=msg.origin_node_id,
        model_id=msg.model_id,
        n_layers=int(msg.n_layers),
        ring=tuple(partition_from_proto(p) for p in msg.ring),
        options=options_from_proto(msg.options),
        prompt_len=int(msg.prompt_len),
        epoch=int(msg.epoch),
        generated_tokens=tuple(int(t) for t in msg.generated_tokens),
        prefix_entry=msg.prefix_entry,
        prefix_tokens=int(msg.prefix_tokens),
        prompt_cache=msg.prompt_cache,
    )
    validate_ctx(ctx)
    return ctx


class ContextCache:
    """The encoded and decoded RequestContexts of recent requests.

    Every step of a request carries the same context, and turning it into protobuf and back
    (validation included) is most of a decode step's message handling in Python. ``encode``
    reuses the message made for the same context object; ``decode`` returns the same
    RequestContext for the same encoded bytes, so a node that passes a context on encodes it
    once. Both keep the ``size`` most recently used entries. Callers must not modify returned
    messages (copy them into the message they send).
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._encoded: OrderedDict[int, tuple[RequestContext, pb.RequestContext]] = OrderedDict()
        self._decoded: OrderedDict[bytes, RequestContext] = OrderedDict()

    def encode(self, ctx: RequestContext) -> pb.RequestContext:
        """``ctx_to_proto(ctx)``, made once per context object."""
        entry = self._encoded.get(id(ctx))
        if entry is not None and entry[0] is ctx:  # the entry holds ctx, so its id is not reused meanwhile
            self._encoded.move_to_end(id(ctx))
            return entry[1]
        msg = ctx_to_proto(ctx)
        self._encoded[id(ctx)] = (ctx, msg)
        while len(self._encoded) > self.size:
            self._encoded.popitem(last=False)
        return msg

    def decode(self, msg: pb.RequestContext) -> RequestContext:
        """``ctx_from_proto(msg)``, decoded and validated once per distinct encoding. Raises as
        ``ctx_from_proto``."""
        key = msg.SerializeToString(deterministic=True)
        ctx = self._decoded.get(key)
        if ctx is not None:
            self._decoded.move_to_end(key)
            return ctx
        ctx = ctx_from_proto(msg)
        self._decoded[key] = ctx
        while len(self._decoded) > self.size:
            self._decoded.popitem(last=False)
        return ctx


# --- results -------------------------------------------------------------------------------


def result_to_proto(result: TokenResult) -> pb.ResultRequest:
    """Encode a TokenResult (``None`` finish_reason / error leave the optional fields unset)."""
    msg = pb.ResultRequest(
        request_id=result.request_id,
        epoch=result.epoch,
        cached_tokens=result.cached_tokens,
        tokens=[int(t) for t in result.tokens],
        logprobs=[float(lp) for lp in result.logprobs],
        top_logprobs=[
            pb.TopLogprobs(token_ids=[int(t) for t, _ in alts], logprobs=[float(lp) for _, lp in alts])
            for alts in result.top_logprobs
        ],
    )
    if result.finish_reason is not None:
        msg.finish_reason = result.finish_reason
    if result.error is not None:
        msg.error = result.error
    if result.embedding is not None:
        msg.embedding.CopyFrom(tensor_to_proto(np.asarray(result.embedding, dtype=np.float32)))
    return msg


def result_from_proto(msg: pb.ResultRequest) -> TokenResult:
    """Decode a TokenResult.

    Raises:
        ValueError: empty request id, a top-logprobs entry whose id and logprob lists differ in
            length, or an embedding that is not a float32 vector (``tensor_from_proto``'s errors too).
    """
    if not msg.request_id:
        raise ValueError("result has an empty request_id")
    if msg.epoch < 0:
        raise ValueError(f"result of {msg.request_id}: epoch must be >= 0, got {msg.epoch}")
    if msg.cached_tokens < 0:
        raise ValueError(f"result of {msg.request_id}: cached_tokens must be >= 0, got {msg.cached_tokens}")
    top: list[list[tuple[int, float]]] = []
    for i, alts in enumerate(msg.top_logprobs):
        if len(alts.token_ids) != len(alts.logprobs):
            raise ValueError(
                f"result of {msg.request_id}: top_logprobs[{i}] has {len(alts.token_ids)} token ids "
                f"but {len(alts.logprobs)} logprobs"
            )
        top.append([(int(t), float(lp)) for t, lp in zip(alts.token_ids, alts.logprobs)])
    embedding = None
    if msg.HasField("embedding"):
        embedding = tensor_from_proto(msg.embedding)
        if embedding.ndim != 1 or embedding.dtype != np.float32:
            raise ValueError(f"result of {msg.request_id}: embedding must be a float32 vector, got "
                             f"{embedding.dtype} of shape {list(embedding.shape)}")
    return TokenResult(
        request_id=msg.request_id,
        tokens=[int(t) for t in msg.tokens],
        finish_reason=msg.finish_reason if msg.HasField("finish_reason") else None,
        error=msg.error if msg.HasField("error") else None,
        logprobs=[float(lp) for lp in msg.logprobs],
        top_logprobs=top,
        epoch=int(msg.epoch),
        embedding=embedding,
        cached_tokens=int(msg.cached_tokens),
    )


# --- capabilities and topology -------------------------------------------------------------


def capabilities_to_proto(caps: DeviceCapabilities) -> pb.DeviceCapabilities:
    """Encode DeviceCapabilities."""
    return pb.DeviceCapabilities(
        model=caps.model,
        chip=caps.chip,
        memory=caps.memory,
        flops=pb.DeviceFlops(fp32=caps.flops.fp32, fp16=caps.flops.fp16, int8=caps.flops.int8),
        available_memory=caps.available_memory,
        gpu=caps.gpu,
        gpu_memory=caps.gpu_memory,
    )


def capabilities_from_proto(msg: pb.DeviceCapabilities) -> DeviceCapabilities:
    """Decode DeviceCapabilities. Raises ValueError for negative memory sizes."""
    for name in ("memory", "available_memory", "gpu_memory"):
        if getattr(msg, name) < 0:
            raise ValueError(f"device capabilities have a negative {name}: {getattr(msg, name)}")
    return DeviceCapabilities(
        model=msg.model,
        chip=msg.chip,
        memory=int(msg.memory),
        flops=DeviceFlops(fp32=msg.flops.fp32, fp16=msg.flops.fp16, int8=msg.flops.int8),
        available_memory=int(msg.available_memory),
        gpu=msg.gpu,
        gpu_memory=int(msg.gpu_memory),
    )


def node_info_to_proto(info: NodeInfo) -> pb.NodeInfo:
    """Encode a NodeInfo."""
    return pb.NodeInfo(node_id=info.node_id, address=info.address, capabilities=capabilities_to_proto(info.capabilities),
                       engine=info.engine, param_bytes=info.param_bytes)


def node_info_from_proto(msg: pb.NodeInfo) -> NodeInfo:
    """Decode a NodeInfo. Raises ValueError for an empty node id or bad capabilities."""
    if not msg.node_id:
        raise ValueError("topology node has an empty node_id")
    if not math.isfinite(msg.param_bytes) or msg.param_bytes < 0:
        raise ValueError(f"node {msg.node_id}: bad param_bytes {msg.param_bytes}")
    return NodeInfo(msg.node_id, msg.address, capabilities_from_proto(msg.capabilities), msg.engine, msg.param_bytes)


def topology_to_proto(topology: Topology) -> pb.Topology:
    """Encode a Topology (nodes and edges sorted, so equal topologies encode identically)."""
    return pb.Topology(
        nodes=[node_info_to_proto(n) for _, n in sorted(topology.nodes.items())],
        edges=[pb.Edge(from_id=a, to_id=b) for a, b in sorted(topology.edges)],
    )


def topology_from_proto(msg: pb.Topology) -> Topology:
    """Decode a Topology (a node id listed twice: the last entry wins).

    Raises:
        ValueError: a node with an empty id or bad capabilities, or an edge with an empty end.
    """
    topology = Topology()
    for n in msg.nodes:
        topology.add_node(node_info_from_proto(n))
    for e in msg.edges:
        if not e.from_id or not e.to_id:
            raise ValueError(f"topology edge {e.from_id!r} -> {e.to_id!r} has an empty end")
        topology.add_edge(e.from_id, e.to_id)
    return topology
