"""Protobuf wire form of an `EventBatch` (see `adapters/proto/shadow_events.proto`), both ways.

`decode_batch` is the trust boundary of the gRPC ingest: whatever bytes arrive, it returns a well-formed batch
of schema dataclasses whose numbers are possible (see `adapters.validation`) or raises `WireError`, never
anything else; an `InvalidWireBatch` is a well-formed message with an impossible number.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from vllm_shadow.adapters.events import (
    EngineInfo,
    EngineStep,
    Event,
    RequestArrival,
    RequestFinish,
    SchedulerSettings,
)
from vllm_shadow.adapters.proto import shadow_events_pb2 as pb
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.validation import InvalidBatch, validate_batch


class WireError(ValueError):
    """Bytes that are not a valid event batch."""


class InvalidWireBatch(WireError, InvalidBatch):
    """A well-formed message carrying a number no engine could have sent."""


def encode_batch(batch: EventBatch) -> bytes:
    msg = pb.EventBatch(
        source=batch.source,
        sequence=batch.sequence,
        dropped=batch.dropped,
        incarnation=batch.incarnation,
        part=batch.part,
        parts=batch.parts,
        lost_batches=batch.lost_batches,
    )
    add = msg.events.add
    for event in batch.events:
        _encode_event(event, add())
    return msg.SerializeToString()


def decode_batch(data: bytes) -> EventBatch:
    msg = pb.EventBatch()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"not an EventBatch message: {exc}") from exc
    events = [_decode_event(i, e) for i, e in enumerate(msg.events)]
    batch = EventBatch(
        events,
        msg.source,
        msg.sequence,
        msg.dropped,
        incarnation=msg.incarnation,
        part=msg.part,
        parts=msg.parts or 1,  # proto3 has no unset: 0 is a sender that never splits
        lost_batches=msg.lost_batches,
    )
    try:
        validate_batch(batch)
    except InvalidBatch as exc:
        raise InvalidWireBatch(str(exc)) from exc
    return batch


def _encode_event(event: Event, out: pb.Event) -> None:
    match event:
        case EngineStep():
            s = out.step
            s.step = event.step
            s.start_time = event.start_time
            s.duration = event.duration
            s.scheduled_ids.extend(event.scheduled_tokens.keys())
            s.scheduled_counts.extend(event.scheduled_tokens.values())
            s.preempted.extend(event.preempted)
            s.resumed.extend(event.resumed)
            s.finished.extend(event.finished)
            s.kv_blocks_used = event.kv_blocks_used
            s.cached_ids.extend(event.cached_tokens.keys())
            s.cached_counts.extend(event.cached_tokens.values())
        case RequestArrival():
            a = out.arrival
            a.request_id = event.request_id
            a.time = event.time
            a.prompt_tokens = event.prompt_tokens
            if event.output_tokens is not None:
                a.output_tokens = event.output_tokens
            if event.max_tokens is not None:
                a.max_tokens = event.max_tokens
            a.priority = event.priority
            a.prefix_block_hashes.extend(event.prefix_block_hashes)
            a.block_hashes.extend(event.block_hashes)
        case RequestFinish():
            f = out.finish
            f.request_id = event.request_id
            f.time = event.time
            f.output_tokens = event.output_tokens
            f.reason = event.reason
        case EngineInfo():
            i = out.info
            i.model = event.model
            i.block_size = event.block_size
            i.num_kv_blocks = event.num_kv_blocks
            sched = event.scheduler
            i.scheduler.policy = sched.policy
            i.scheduler.max_num_seqs = sched.max_num_seqs
            i.scheduler.max_num_batched_tokens = sched.max_num_batched_tokens
            i.scheduler.enable_chunked_prefill = sched.enable_chunked_prefill
            i.scheduler.long_prefill_token_threshold = sched.long_prefill_token_threshold
            i.scheduler.enable_prefix_caching = sched.enable_prefix_caching
            i.scheduler.max_model_len = sched.max_model_len
            i.scheduler.watermark = sched.watermark
            i.scheduler.scheduler_reserve_full_isl = sched.scheduler_reserve_full_isl
            i.scheduler.async_scheduling = sched.async_scheduling
            i.engine = event.engine
            i.model_config_json = json.dumps(event.model_config, sort_keys=True)
            i.tensor_parallel_size = event.tensor_parallel_size
        case _:
            raise TypeError(f"not a schema event: {type(event).__name__}")


def _decode_event(index: int, e: pb.Event) -> Event:
    kind = e.WhichOneof("kind")
    if kind == "step":
        s = e.step
        scheduled = _token_map(index, "scheduled", s.scheduled_ids, s.scheduled_counts)
        cached = _token_map(index, "cached", s.cached_ids, s.cached_counts)
        return EngineStep(
            step=s.step,
            start_time=s.start_time,
            duration=s.duration,
            scheduled_tokens=scheduled,
            preempted=tuple(s.preempted),
            resumed=tuple(s.resumed),
            finished=tuple(s.finished),
            kv_blocks_used=s.kv_blocks_used,
            cached_tokens=cached,
        )
    if kind == "arrival":
        a = e.arrival
        return RequestArrival(
            request_id=a.request_id,
            time=a.time,
            prompt_tokens=a.prompt_tokens,
            output_tokens=a.output_tokens if a.HasField("output_tokens") else None,
            max_tokens=a.max_tokens if a.HasField("max_tokens") else None,
            priority=a.priority,
            prefix_block_hashes=tuple(a.prefix_block_hashes),
            block_hashes=tuple(a.block_hashes),
        )
    if kind == "finish":
        f = e.finish
        return RequestFinish(f.request_id, f.time, f.output_tokens, f.reason)
    if kind == "info":
        i = e.info
        try:
            model_config = json.loads(i.model_config_json) if i.model_config_json else {}
        except ValueError as exc:
            raise WireError(f"event {index}: model_config_json is not JSON: {exc}") from exc
        if not isinstance(model_config, dict):
            raise WireError(f"event {index}: model_config_json is not a JSON object")
        sc = i.scheduler
        return EngineInfo(
            model=i.model,
            block_size=i.block_size,
            num_kv_blocks=i.num_kv_blocks,
            scheduler=SchedulerSettings(
                policy=sc.policy,
                max_num_seqs=sc.max_num_seqs,
                max_num_batched_tokens=sc.max_num_batched_tokens,
                enable_chunked_prefill=sc.enable_chunked_prefill,
                long_prefill_token_threshold=sc.long_prefill_token_threshold,
                enable_prefix_caching=sc.enable_prefix_caching,
                max_model_len=sc.max_model_len,
                watermark=sc.watermark,
                scheduler_reserve_full_isl=sc.scheduler_reserve_full_isl,
                async_scheduling=sc.async_scheduling,
            ),
            engine=i.engine,
            model_config=model_config,
            tensor_parallel_size=i.tensor_parallel_size,
        )
    raise WireError(f"event {index}: no event kind set")


def _token_map(index: int, name: str, ids: Sequence[str], counts: Sequence[int]) -> dict[str, int]:
    """Request id -> token count from two parallel arrays, refusing arrays of unequal length or a repeated id."""
    if len(ids) != len(counts):
        raise WireError(f"event {index}: {len(ids)} {name} ids but {len(counts)} counts")
    tokens = dict(zip(ids, counts, strict=True))
    if len(tokens) != len(ids):
        raise WireError(f"event {index}: a request id appears twice in one step's {name} tokens")
    return tokens
