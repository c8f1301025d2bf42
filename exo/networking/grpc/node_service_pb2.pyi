from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Shard(_message.Message):
    __slots__ = ("model_id", "start_layer", "end_layer", "n_layers")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start_layer: int
    end_layer: int
    n_layers: int
    def __init__(self, model_id: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., n_layers: _Optional[int] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "grammar", "logit_bias", "pooling")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    presence_penalty: float
    frequency_penalty: float
    logprobs: bool
    top_logprobs: int
    grammar: str
    logit_bias: _containers.ScalarMap[int, float]
    pooling: str
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., grammar: _Optional[str] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., pooling: _Optional[str] = ...) -> None: ...

class Partition(_message.Message):
    __slots__ = ("node_id", "address", "start_layer", "end_layer")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    start_layer: int
    end_layer: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ...) -> None: ...

class RequestContext(_message.Message):
    __slots__ = ("request_id", "origin_node_id", "model_id", "n_layers", "ring", "options", "epoch", "prompt_len", "generated_tokens", "prefix_entry", "prefix_tokens", "prompt_cache")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    RING_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_ENTRY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    origin_node_id: str
    model_id: str
    n_layers: int
    ring: _containers.RepeatedCompositeFieldContainer[Partition]
    options: GenerationOptions
    epoch: int
    prompt_len: int
    generated_tokens: _containers.RepeatedScalarFieldContainer[int]
    prefix_entry: str
    prefix_tokens: int
    prompt_cache: bool
    def __init__(self, request_id: _Optional[str] = ..., origin_node_id: _Optional[str] = ..., model_id: _Optional[str] = ..., n_layers: _Optional[int] = ..., ring: _Optional[_Iterable[_Union[Partition, _Mapping]]] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., epoch: _Optional[int] = ..., prompt_len: _Optional[int] = ..., generated_tokens: _Optional[_Iterable[int]] = ..., prefix_entry: _Optional[str] = ..., prefix_tokens: _Optional[int] = ..., prompt_cache: _Optional[bool] = ...) -> None: ...

class PromptRequest(_message.Message):
    __slots__ = ("ctx", "token_ids", "position", "result")
    CTX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ctx: RequestContext
    token_ids: Tensor
    position: int
    result: ResultRequest
    def __init__(self, ctx: _Optional[_Union[RequestContext, _Mapping]] = ..., token_ids: _Optional[_Union[Tensor, _Mapping]] = ..., position: _Optional[int] = ..., result: _Optional[_Union[ResultRequest, _Mapping]] = ...) -> None: ...

class TensorRequest(_message.Message):
    __slots__ = ("ctx", "hidden_states", "position")
    CTX_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ctx: RequestContext
    hidden_states: Tensor
    position: int
    def __init__(self, ctx: _Optional[_Union[RequestContext, _Mapping]] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., position: _Optional[int] = ...) -> None: ...

class TopLogprobs(_message.Message):
    __slots__ = ("token_ids", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ResultRequest(_message.Message):
    __slots__ = ("request_id", "tokens", "finish_reason", "error", "logprobs", "top_logprobs", "epoch", "embedding", "cached_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    error: str
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    epoch: int
    embedding: Tensor
    cached_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., error: _Optional[str] = ..., logprobs: _Optional[_Iterable[float]] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ..., epoch: _Optional[int] = ..., embedding: _Optional[_Union[Tensor, _Mapping]] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class EndRequestRequest(_message.Message):
    __slots__ = ("request_id", "keep_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    keep_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., keep_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class HealthCheckRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthCheckResponse(_message.Message):
    __slots__ = ("is_healthy", "node_id")
    IS_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    is_healthy: bool
    node_id: str
    def __init__(self, is_healthy: _Optional[bool] = ..., node_id: _Optional[str] = ...) -> None: ...

class CollectTopologyRequest(_message.Message):
    __slots__ = ("visited", "max_depth")
    VISITED_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    visited: _containers.RepeatedScalarFieldContainer[str]
    max_depth: int
    def __init__(self, visited: _Optional[_Iterable[str]] = ..., max_depth: _Optional[int] = ...) -> None: ...

class DeviceFlops(_message.Message):
    __slots__ = ("fp32", "fp16", "int8")
    FP32_FIELD_NUMBER: _ClassVar[int]
    FP16_FIELD_NUMBER: _ClassVar[int]
    INT8_FIELD_NUMBER: _ClassVar[int]
    fp32: float
    fp16: float
    int8: float
    def __init__(self, fp32: _Optional[float] = ..., fp16: _Optional[float] = ..., int8: _Optional[float] = ...) -> None: ...

class DeviceCapabilities(_message.Message):
    __slots__ = ("model", "chip", "memory", "flops", "available_memory", "gpu", "gpu_memory")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_FIELD_NUMBER: _ClassVar[int]
    model: str
    chip: str
    memory: int
    flops: DeviceFlops
    available_memory: int
    gpu: str
    gpu_memory: int
    def __init__(self, model: _Optional[str] = ..., chip: _Optional[str] = ..., memory: _Optional[int] = ..., flops: _Optional[_Union[DeviceFlops, _Mapping]] = ..., available_memory: _Optional[int] = ..., gpu: _Optional[str] = ..., gpu_memory: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "address", "capabilities", "engine", "param_bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PARAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    capabilities: DeviceCapabilities
    engine: str
    param_bytes: float
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., capabilities: _Optional[_Union[DeviceCapabilities, _Mapping]] = ..., engine: _Optional[str] = ..., param_bytes: _Optional[float] = ...) -> None: ...

class Edge(_message.Message):
    __slots__ = ("from_id", "to_id")
    FROM_ID_FIELD_NUMBER: _ClassVar[int]
    TO_ID_FIELD_NUMBER: _ClassVar[int]
    from_id: str
    to_id: str
    def __init__(self, from_id: _Optional[str] = ..., to_id: _Optional[str] = ...) -> None: ...

class Topology(_message.Message):
    __slots__ = ("nodes", "edges")
    NODES_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    edges: _containers.RepeatedCompositeFieldContainer[Edge]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., edges: _Optional[_Iterable[_Union[Edge, _Mapping]]] = ...) -> None: ...

class ImageRequest(_message.Message):
    __slots__ = ("request_id", "origin_node_id", "origin_address", "model_id", "prompt", "negative_prompt", "n", "width", "height", "steps", "guidance_scale", "seed", "init_image", "strength")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    origin_node_id: str
    origin_address: str
    model_id: str
    prompt: str
    negative_prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    init_image: bytes
    strength: float
    def __init__(self, request_id: _Optional[str] = ..., origin_node_id: _Optional[str] = ..., origin_address: _Optional[str] = ..., model_id: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., n: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., init_image: _Optional[bytes] = ..., strength: _Optional[float] = ...) -> None: ...

class ImageEvent(_message.Message):
    __slots__ = ("request_id", "kind", "index", "step", "total_steps", "png", "error", "code", "seed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kind: str
    index: int
    step: int
    total_steps: int
    png: bytes
    error: str
    code: str
    seed: int
    def __init__(self, request_id: _Optional[str] = ..., kind: _Optional[str] = ..., index: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., png: _Optional[bytes] = ..., error: _Optional[str] = ..., code: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class RingMessage(_message.Message):
    __slots__ = ("seq", "prompt", "tensor", "result", "end", "image", "image_event", "errors_only")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_EVENT_FIELD_NUMBER: _ClassVar[int]
    ERRORS_ONLY_FIELD_NUMBER: _ClassVar[int]
    seq: int
    prompt: PromptRequest
    tensor: TensorRequest
    result: ResultRequest
    end: EndRequestRequest
    image: ImageRequest
    image_event: ImageEvent
    errors_only: bool
    def __init__(self, seq: _Optional[int] = ..., prompt: _Optional[_Union[PromptRequest, _Mapping]] = ..., tensor: _Optional[_Union[TensorRequest, _Mapping]] = ..., result: _Optional[_Union[ResultRequest, _Mapping]] = ..., end: _Optional[_Union[EndRequestRequest, _Mapping]] = ..., image: _Optional[_Union[ImageRequest, _Mapping]] = ..., image_event: _Optional[_Union[ImageEvent, _Mapping]] = ..., errors_only: _Optional[bool] = ...) -> None: ...

class RingAck(_message.Message):
    __slots__ = ("seq", "code", "details")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    code: int
    details: str
    def __init__(self, seq: _Optional[int] = ..., code: _Optional[int] = ..., details: _Optional[str] = ...) -> None: ...
