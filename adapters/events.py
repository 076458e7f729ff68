"""The event schema the whole project shares.

Everything that crosses a boundary (trace file -> simulator, vLLM hook -> shadow, recorder -> replay) is one of
these plain dataclasses. Times are seconds as floats: wall-clock for arrivals read from the engine, seconds since
trace start for arrivals read from a file. Token counts are ints.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RequestArrival:
    """A request as it enters the engine."""

    request_id: str
    time: float
    prompt_tokens: int
    output_tokens: int | None = None  # known for traces and once the request finishes
    max_tokens: int | None = None
    priority: int = 0  # vLLM semantics: lower value is served first
    prefix_block_hashes: tuple[int, ...] = ()  # equal hashes = shared prompt prefix blocks
    # vLLM's own block hashes (`Request.block_hashes`, one per full block of the engine's block_size prompt
    # tokens, chained), as ints: the prefix identity the simulator's prefix cache looks up.
    block_hashes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestFinish:
    """A request leaving the engine, with what it really produced."""

    request_id: str
    time: float
    output_tokens: int
    reason: str = "length"  # vLLM's finish reason: length, stop, abort, ...
    # vLLM's hashes of the request's full blocks past its prompt's (`Request.block_hashes` beyond
    # `RequestArrival.block_hashes`): blocks of generated tokens, which stay cached after it finishes and which a
    # later prompt holding its output (a conversation's next turn) hits.
    block_hashes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class EngineStep:
    """One scheduling step (iteration) of the engine: what ran, and what it cost."""

    step: int
    start_time: float
    duration: float
    scheduled_tokens: dict[str, int]  # request id -> tokens computed in this step
    preempted: tuple[str, ...] = ()
    resumed: tuple[str, ...] = ()
    finished: tuple[str, ...] = ()
    kv_blocks_used: int = 0
    # request id -> prompt tokens found in the prefix cache when it was admitted (or resumed) in this step
    cached_tokens: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """The vLLM scheduler knobs the shadow models (names follow vLLM's engine arguments)."""

    policy: str = "fcfs"  # "fcfs" or "priority"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # 0 = no cap on a running request's prefill chunk
    enable_prefix_caching: bool = False
    max_model_len: int = 131072
    # vLLM 0.32 admission rules beyond the knobs above (a faithful replay needs them):
    watermark: float = 0.0  # fraction of KV blocks kept free when admitting waiting/preempted requests
    scheduler_reserve_full_isl: bool = True  # admit only if the whole current sequence fits in free blocks
    async_scheduling: bool = False  # step N+1 is scheduled before step N's output (finishes) is processed


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What an engine announces when it starts: the facts a faithful replay needs."""

    model: str
    block_size: int
    num_kv_blocks: int
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    engine: str = "0"
    model_config: dict = field(default_factory=dict)  # the model's Hugging Face config.json, when known
    tensor_parallel_size: int = 1


Event = RequestArrival | RequestFinish | EngineStep | EngineInfo
