from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_DIFFUSION: _ClassVar[Backend]
    BACKEND_AUTOREGRESSIVE: _ClassVar[Backend]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
BACKEND_UNSPECIFIED: Backend
BACKEND_DIFFUSION: Backend
BACKEND_AUTOREGRESSIVE: Backend
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class SamplingOverrides(_message.Message):
    __slots__ = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "confidence_threshold", "stability_threshold", "temperature", "top_p")
    MAX_DENOISING_STEPS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_BOUND_FIELD_NUMBER: _ClassVar[int]
    T_MIN_FIELD_NUMBER: _ClassVar[int]
    T_MAX_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STABILITY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    confidence_threshold: float
    stability_threshold: int
    temperature: float
    top_p: float
    def __init__(self, max_denoising_steps: _Optional[int] = ..., entropy_bound: _Optional[float] = ..., t_min: _Optional[float] = ..., t_max: _Optional[float] = ..., confidence_threshold: _Optional[float] = ..., stability_threshold: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ...) -> None: ...

class PinnedToken(_message.Message):
    __slots__ = ("position", "token_id")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    position: int
    token_id: int
    def __init__(self, position: _Optional[int] = ..., token_id: _Optional[int] = ...) -> None: ...

class Infill(_message.Message):
    __slots__ = ("prefix", "suffix")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    suffix: str
    def __init__(self, prefix: _Optional[str] = ..., suffix: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "max_new_tokens", "seed", "sampling", "stop_token_ids", "pinned", "infill", "routing", "stream_drafts", "request_id")
    class Routing(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ANY: _ClassVar[GenerateRequest.Routing]
        DIFFUSION_ONLY: _ClassVar[GenerateRequest.Routing]
        AUTOREGRESSIVE_ONLY: _ClassVar[GenerateRequest.Routing]
    ANY: GenerateRequest.Routing
    DIFFUSION_ONLY: GenerateRequest.Routing
    AUTOREGRESSIVE_ONLY: GenerateRequest.Routing
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    INFILL_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    STREAM_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    max_new_tokens: int
    seed: int
    sampling: SamplingOverrides
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    pinned: _containers.RepeatedCompositeFieldContainer[PinnedToken]
    infill: Infill
    routing: GenerateRequest.Routing
    stream_drafts: bool
    request_id: str
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., max_new_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., sampling: _Optional[_Union[SamplingOverrides, _Mapping]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., pinned: _Optional[_Iterable[_Union[PinnedToken, _Mapping]]] = ..., infill: _Optional[_Union[Infill, _Mapping]] = ..., routing: _Optional[_Union[GenerateRequest.Routing, str]] = ..., stream_drafts: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "first_chunk_ms", "total_ms", "tokens_per_second")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    first_chunk_ms: float
    total_ms: float
    tokens_per_second: float
    def __init__(self, queue_ms: _Optional[float] = ..., first_chunk_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class DenoisingStats(_message.Message):
    __slots__ = ("canvases", "steps_per_canvas", "tokens_per_step")
    CANVASES_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_CANVAS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    canvases: int
    steps_per_canvas: _containers.RepeatedScalarFieldContainer[int]
    tokens_per_step: float
    def __init__(self, canvases: _Optional[int] = ..., steps_per_canvas: _Optional[_Iterable[int]] = ..., tokens_per_step: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "finish_reason", "backend", "replica", "model", "usage", "timings", "denoising", "replica_in_flight")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DENOISING_FIELD_NUMBER: _ClassVar[int]
    REPLICA_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    backend: Backend
    replica: str
    model: str
    usage: Usage
    timings: Timings
    denoising: DenoisingStats
    replica_in_flight: int
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., backend: _Optional[_Union[Backend, str]] = ..., replica: _Optional[str] = ..., model: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., denoising: _Optional[_Union[DenoisingStats, _Mapping]] = ..., replica_in_flight: _Optional[int] = ...) -> None: ...

class TextChunk(_message.Message):
    __slots__ = ("index", "text", "token_ids", "steps")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    steps: int
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., steps: _Optional[int] = ...) -> None: ...

class DraftProgress(_message.Message):
    __slots__ = ("canvas_index", "step", "accepted", "token_ids", "text")
    CANVAS_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    canvas_index: int
    step: int
    accepted: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, canvas_index: _Optional[int] = ..., step: _Optional[int] = ..., accepted: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("request_id", "backend", "replica", "chunk", "draft", "finished", "finish_reason", "usage", "timings", "denoising", "model", "replica_in_flight")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DENOISING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPLICA_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    backend: Backend
    replica: str
    chunk: TextChunk
    draft: DraftProgress
    finished: bool
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    denoising: DenoisingStats
    model: str
    replica_in_flight: int
    def __init__(self, request_id: _Optional[str] = ..., backend: _Optional[_Union[Backend, str]] = ..., replica: _Optional[str] = ..., chunk: _Optional[_Union[TextChunk, _Mapping]] = ..., draft: _Optional[_Union[DraftProgress, _Mapping]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., denoising: _Optional[_Union[DenoisingStats, _Mapping]] = ..., model: _Optional[str] = ..., replica_in_flight: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicaStats(_message.Message):
    __slots__ = ("replica", "healthy", "in_flight", "peak_in_flight", "requests", "steps_per_canvas", "tokens_per_second", "engine_in_flight")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PEAK_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_CANVAS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ENGINE_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    replica: str
    healthy: bool
    in_flight: int
    peak_in_flight: int
    requests: int
    steps_per_canvas: float
    tokens_per_second: float
    engine_in_flight: int
    def __init__(self, replica: _Optional[str] = ..., healthy: _Optional[bool] = ..., in_flight: _Optional[int] = ..., peak_in_flight: _Optional[int] = ..., requests: _Optional[int] = ..., steps_per_canvas: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., engine_in_flight: _Optional[int] = ...) -> None: ...

class BackendInfo(_message.Message):
    __slots__ = ("backend", "model", "kind", "served_context_length", "max_batch", "running_replicas", "canvas_length", "tensor_parallel_size", "replicas", "router_in_flight", "router_capacity")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SERVED_CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CANVAS_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    ROUTER_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    backend: Backend
    model: str
    kind: str
    served_context_length: int
    max_batch: int
    running_replicas: int
    canvas_length: int
    tensor_parallel_size: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStats]
    router_in_flight: int
    router_capacity: int
    def __init__(self, backend: _Optional[_Union[Backend, str]] = ..., model: _Optional[str] = ..., kind: _Optional[str] = ..., served_context_length: _Optional[int] = ..., max_batch: _Optional[int] = ..., running_replicas: _Optional[int] = ..., canvas_length: _Optional[int] = ..., tensor_parallel_size: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStats, _Mapping]]] = ..., router_in_flight: _Optional[int] = ..., router_capacity: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "promised_context_length", "served_context_length", "canvas_length", "max_batch", "backends", "api_version", "queued")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMISED_CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SERVED_CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CANVAS_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    model: str
    promised_context_length: int
    served_context_length: int
    canvas_length: int
    max_batch: int
    backends: _containers.RepeatedCompositeFieldContainer[BackendInfo]
    api_version: str
    queued: int
    def __init__(self, model: _Optional[str] = ..., promised_context_length: _Optional[int] = ..., served_context_length: _Optional[int] = ..., canvas_length: _Optional[int] = ..., max_batch: _Optional[int] = ..., backends: _Optional[_Iterable[_Union[BackendInfo, _Mapping]]] = ..., api_version: _Optional[str] = ..., queued: _Optional[int] = ...) -> None: ...
