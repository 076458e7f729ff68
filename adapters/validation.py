"""The numbers an event batch may carry, checked before any of it is applied.

A batch that passes the wire decoder is well formed, but its numbers may still be impossible: a zero
`max_num_seqs` or block size, a negative block count or prompt length, a NaN or infinite time or duration.
Applied, such a value fails later and far away (every later batch of the engine refused as INTERNAL), or
silently poisons a running sum for good (a NaN step time in `actual_gpu_seconds_total`). Every transport
checks the whole batch with `validate_batch` before handing it on, so an invalid batch is refused as a whole
and counted, never half-applied. The bounds are vLLM's own where it has them (`max_num_seqs >= 1`,
`block_size >= 1`, ...).
"""

from __future__ import annotations

import math

from vllm_shadow.adapters.events import EngineInfo, EngineStep, Event, RequestArrival, RequestFinish
from vllm_shadow.adapters.publisher import EventBatch

POLICIES = ("fcfs", "priority")  # vLLM's scheduling policies
MAX_PARTS = 1 << 16  # a split batch: halving a message at most 16 times is far more than any sender needs


class InvalidBatch(ValueError):
    """A batch with a number no engine could have sent; the message names the event and the field."""


def validate_batch(batch: EventBatch) -> None:
    """Raise `InvalidBatch` naming the first impossible value; return if the whole batch is valid."""
    if not 0 <= batch.part < batch.parts <= MAX_PARTS:
        raise InvalidBatch(f"part {batch.part} of {batch.parts}: not a part of a split batch")
    for index, event in enumerate(batch.events):
        problem = event_problem(event)
        if problem is not None:
            raise InvalidBatch(f"event {index} ({type(event).__name__}): {problem}")


def event_problem(event: Event) -> str | None:
    """What is impossible about `event`, or None."""
    match event:
        case RequestArrival():
            return (
                _finite("time", event.time)
                or _at_least("prompt_tokens", event.prompt_tokens, 0)
                or _optional_at_least("output_tokens", event.output_tokens, 0)
                or _optional_at_least("max_tokens", event.max_tokens, 0)
            )
        case RequestFinish():
            return _finite("time", event.time) or _at_least("output_tokens", event.output_tokens, 0)
        case EngineStep():
            bad_count = next((n for n in event.scheduled_tokens.values() if n < 0), None)
            bad_cached = next((n for n in event.cached_tokens.values() if n < 0), None)
            return (
                _at_least("step", event.step, 0)
                or _finite("start_time", event.start_time)
                or _finite("duration", event.duration)
                or _at_least("duration", event.duration, 0.0)
                or (f"scheduled_tokens has a negative count {bad_count}" if bad_count is not None else None)
                or _at_least("kv_blocks_used", event.kv_blocks_used, 0)
                or (f"cached_tokens has a negative count {bad_cached}" if bad_cached is not None else None)
            )
        case EngineInfo():
            return _info_problem(event)
    return f"not a schema event: {type(event).__name__}"


def _info_problem(info: EngineInfo) -> str | None:
    s = info.scheduler
    if s.policy not in POLICIES:
        return f"scheduler.policy {s.policy!r} is not one of {', '.join(POLICIES)}"
    if not (math.isfinite(s.watermark) and 0.0 <= s.watermark < 1.0):
        return f"scheduler.watermark {s.watermark} is not in [0, 1)"
    return (
        _at_least("block_size", info.block_size, 1)
        or _at_least("num_kv_blocks", info.num_kv_blocks, 1)
        or _at_least("tensor_parallel_size", info.tensor_parallel_size, 1)
        or _at_least("scheduler.max_num_seqs", s.max_num_seqs, 1)
        or _at_least("scheduler.max_num_batched_tokens", s.max_num_batched_tokens, 1)
        or _at_least("scheduler.long_prefill_token_threshold", s.long_prefill_token_threshold, 0)
        or _at_least("scheduler.max_model_len", s.max_model_len, 1)
    )


def _finite(name: str, value: float) -> str | None:
    return None if math.isfinite(value) else f"{name} is {value}"


def _at_least(name: str, value: float, least: float) -> str | None:
    return None if value >= least else f"{name} {value} is below {least}"


def _optional_at_least(name: str, value: int | None, least: int) -> str | None:
    return None if value is None else _at_least(name, value, least)
