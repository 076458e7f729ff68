"""Hypothesis strategies for the schema's events (valid ones: see adapters/validation.py), shared by the wire and
recorder round-trip tests."""

from __future__ import annotations

from hypothesis import strategies as st

from vllm_shadow.adapters.events import (
    EngineInfo,
    EngineStep,
    RequestArrival,
    RequestFinish,
    SchedulerSettings,
)
from vllm_shadow.adapters.publisher import EventBatch

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
COUNT = st.integers(min_value=0, max_value=2**40)
POSITIVE = st.integers(min_value=1, max_value=2**40)  # sizes vLLM requires to be at least 1
TIME = st.floats(allow_nan=False, allow_infinity=False, width=64)
ID = st.text(min_size=1, max_size=24)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | TIME | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

arrivals = st.builds(
    RequestArrival,
    request_id=ID,
    time=TIME,
    prompt_tokens=COUNT,
    output_tokens=st.none() | COUNT,
    max_tokens=st.none() | COUNT,
    priority=INT64,
    prefix_block_hashes=st.lists(INT64, max_size=6).map(tuple),
    block_hashes=st.lists(INT64, max_size=6).map(tuple),
)
finishes = st.builds(
    RequestFinish,
    request_id=ID,
    time=TIME,
    output_tokens=COUNT,
    reason=st.text(max_size=10),
    block_hashes=st.lists(INT64, max_size=6).map(tuple),
)
steps = st.builds(
    EngineStep,
    step=COUNT,
    start_time=TIME,
    duration=st.floats(min_value=0.0, allow_infinity=False, width=64),
    scheduled_tokens=st.dictionaries(ID, COUNT, max_size=8),
    preempted=st.lists(ID, max_size=3).map(tuple),
    resumed=st.lists(ID, max_size=3).map(tuple),
    finished=st.lists(ID, max_size=3).map(tuple),
    kv_blocks_used=COUNT,
    cached_tokens=st.dictionaries(ID, COUNT, max_size=4),
)
settings = st.builds(
    SchedulerSettings,
    policy=st.sampled_from(["fcfs", "priority"]),
    max_num_seqs=POSITIVE,
    max_num_batched_tokens=POSITIVE,
    enable_chunked_prefill=st.booleans(),
    long_prefill_token_threshold=COUNT,
    enable_prefix_caching=st.booleans(),
    max_model_len=POSITIVE,
    watermark=st.floats(min_value=0.0, max_value=0.99),
    scheduler_reserve_full_isl=st.booleans(),
    async_scheduling=st.booleans(),
)
infos = st.builds(
    EngineInfo,
    model=st.text(max_size=20),
    block_size=POSITIVE,
    num_kv_blocks=POSITIVE,
    scheduler=settings,
    engine=st.text(max_size=5),
    model_config=st.dictionaries(st.text(max_size=8), JSON, max_size=5),
    tensor_parallel_size=POSITIVE,
)
events = st.one_of(arrivals, finishes, steps, infos)
batches = st.builds(
    EventBatch,
    events=st.lists(events, max_size=8),
    source=st.text(max_size=12),
    sequence=st.integers(0, 2**64 - 1),
    dropped=st.integers(0, 2**64 - 1),
)
# With what only the wire carries (a recording keeps a batch's source, sequence and drop count).
wire_batches = st.builds(
    lambda batch, incarnation, parts, lost: EventBatch(
        batch.events,
        batch.source,
        batch.sequence,
        batch.dropped,
        incarnation=incarnation,
        part=parts[0],
        parts=parts[1],
        lost_batches=lost,
    ),
    batches,
    st.integers(0, 2**64 - 1),
    st.integers(1, 2**16).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n))),
    st.integers(0, 2**64 - 1),
)
