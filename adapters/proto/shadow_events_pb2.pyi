# ruff: noqa
# fmt: off
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestArrival(_message.Message):
    __slots__ = ("request_id", "time", "prompt_tokens", "output_tokens", "max_tokens", "priority", "prefix_block_hashes", "block_hashes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    time: float
    prompt_tokens: int
    output_tokens: int
    max_tokens: int
    priority: int
    prefix_block_hashes: _containers.RepeatedScalarFieldContainer[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., time: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., priority: _Optional[int] = ..., prefix_block_hashes: _Optional[_Iterable[int]] = ..., block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class RequestFinish(_message.Message):
    __slots__ = ("request_id", "time", "output_tokens", "reason", "block_hashes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    time: float
    output_tokens: int
    reason: str
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., time: _Optional[float] = ..., output_tokens: _Optional[int] = ..., reason: _Optional[str] = ..., block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class EngineStep(_message.Message):
    __slots__ = ("step", "start_time", "duration", "scheduled_ids", "scheduled_counts", "preempted", "resumed", "finished", "kv_blocks_used", "cached_ids", "cached_counts")
    STEP_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_IDS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_COUNTS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    CACHED_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHED_COUNTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    start_time: float
    duration: float
    scheduled_ids: _containers.RepeatedScalarFieldContainer[str]
    scheduled_counts: _containers.RepeatedScalarFieldContainer[int]
    preempted: _containers.RepeatedScalarFieldContainer[str]
    resumed: _containers.RepeatedScalarFieldContainer[str]
    finished: _containers.RepeatedScalarFieldContainer[str]
    kv_blocks_used: int
    cached_ids: _containers.RepeatedScalarFieldContainer[str]
    cached_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step: _Optional[int] = ..., start_time: _Optional[float] = ..., duration: _Optional[float] = ..., scheduled_ids: _Optional[_Iterable[str]] = ..., scheduled_counts: _Optional[_Iterable[int]] = ..., preempted: _Optional[_Iterable[str]] = ..., resumed: _Optional[_Iterable[str]] = ..., finished: _Optional[_Iterable[str]] = ..., kv_blocks_used: _Optional[int] = ..., cached_ids: _Optional[_Iterable[str]] = ..., cached_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class SchedulerSettings(_message.Message):
    __slots__ = ("policy", "max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill", "long_prefill_token_threshold", "enable_prefix_caching", "max_model_len", "watermark", "scheduler_reserve_full_isl", "async_scheduling")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENABLE_CHUNKED_PREFILL_FIELD_NUMBER: _ClassVar[int]
    LONG_PREFILL_TOKEN_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ENABLE_PREFIX_CACHING_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_RESERVE_FULL_ISL_FIELD_NUMBER: _ClassVar[int]
    ASYNC_SCHEDULING_FIELD_NUMBER: _ClassVar[int]
    policy: str
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    long_prefill_token_threshold: int
    enable_prefix_caching: bool
    max_model_len: int
    watermark: float
    scheduler_reserve_full_isl: bool
    async_scheduling: bool
    def __init__(self, policy: _Optional[str] = ..., max_num_seqs: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., enable_chunked_prefill: bool = ..., long_prefill_token_threshold: _Optional[int] = ..., enable_prefix_caching: bool = ..., max_model_len: _Optional[int] = ..., watermark: _Optional[float] = ..., scheduler_reserve_full_isl: bool = ..., async_scheduling: bool = ...) -> None: ...

class EngineInfo(_message.Message):
    __slots__ = ("model", "block_size", "num_kv_blocks", "scheduler", "engine", "model_config_json", "tensor_parallel_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    block_size: int
    num_kv_blocks: int
    scheduler: SchedulerSettings
    engine: str
    model_config_json: str
    tensor_parallel_size: int
    def __init__(self, model: _Optional[str] = ..., block_size: _Optional[int] = ..., num_kv_blocks: _Optional[int] = ..., scheduler: _Optional[_Union[SchedulerSettings, _Mapping]] = ..., engine: _Optional[str] = ..., model_config_json: _Optional[str] = ..., tensor_parallel_size: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("arrival", "finish", "step", "info")
    ARRIVAL_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    arrival: RequestArrival
    finish: RequestFinish
    step: EngineStep
    info: EngineInfo
    def __init__(self, arrival: _Optional[_Union[RequestArrival, _Mapping]] = ..., finish: _Optional[_Union[RequestFinish, _Mapping]] = ..., step: _Optional[_Union[EngineStep, _Mapping]] = ..., info: _Optional[_Union[EngineInfo, _Mapping]] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("source", "sequence", "dropped", "events", "incarnation", "part", "parts", "lost_batches")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    LOST_BATCHES_FIELD_NUMBER: _ClassVar[int]
    source: str
    sequence: int
    dropped: int
    events: _containers.RepeatedCompositeFieldContainer[Event]
    incarnation: int
    part: int
    parts: int
    lost_batches: int
    def __init__(self, source: _Optional[str] = ..., sequence: _Optional[int] = ..., dropped: _Optional[int] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., incarnation: _Optional[int] = ..., part: _Optional[int] = ..., parts: _Optional[int] = ..., lost_batches: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...
