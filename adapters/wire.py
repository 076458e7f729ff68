"""Protobuf wire form of an `EventBatch` (see `adapters/proto/shadow_events.proto`), both ways.

`decode_batch` is the trust boundary of the gRPC ingest: whatever bytes arrive, it returns a well-formed batch
of schema dataclasses whose numbers are possible (see `adapters.validation`) or raises `WireError`, never
anything else; an `InvalidWireBatch` is a well-formed message with an impossible number. It reads through the
compiled reader (adapters/_wire_compiled.pyx) where that is built, and through protobuf's own parser
(`decode_batch_upb`, the oracle) everything that reader leaves to it; the two decode alike.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TypeVar

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
from vllm_shadow.adapters.validation import MAX_PARTS, InvalidBatch, event_problem, validate_batch

_T = TypeVar("_T")


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
    fast = _compiled.decode(data, _decode_info_event) if _compiled is not None else None
    if fast is None:  # no compiled reader, or bytes it leaves to upb (an announcement, anything unusual)
        return decode_batch_upb(data)
    events, checked, source, sequence, dropped, incarnation, part, parts, lost_batches = fast
    return _checked_batch(events, checked, source, sequence, dropped, incarnation, part, parts, lost_batches)


def decode_batch_upb(data: bytes) -> EventBatch:
    """`decode_batch` through protobuf's own parser (upb): the oracle of the compiled reader, and the path of
    everything that reader leaves to it."""
    msg = pb.EventBatch()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"not an EventBatch message: {exc}") from exc
    events, checked = _decode_events(msg.events)
    return _checked_batch(
        events,
        checked,
        msg.source,
        msg.sequence,
        msg.dropped,
        msg.incarnation,
        msg.part,
        msg.parts,
        msg.lost_batches,
    )


def _decode_info_event(data: bytes) -> tuple[Event, bool] | None:
    """One Event message holding an EngineInfo (an announcement in a batch the compiled reader reads) as the
    upb path decodes it in a batch, with its quick check; None where that path refuses it, whatever it
    raises: the whole batch then goes through the upb path, which refuses it in its own words."""
    try:
        events, checked = _decode_events([pb.Event.FromString(data)])
    except Exception:
        return None
    return events[0], checked


def _checked_batch(
    events: list[Event],
    checked: bool,
    source: str,
    sequence: int,
    dropped: int,
    incarnation: int,
    part: int,
    parts: int,
    lost_batches: int,
) -> EventBatch:
    batch = EventBatch(
        events,
        source,
        sequence,
        dropped,
        incarnation=incarnation,
        part=part,
        parts=parts or 1,  # proto3 has no unset: 0 is a sender that never splits
        lost_batches=lost_batches,
    )
    if not (checked and 0 <= batch.part < batch.parts <= MAX_PARTS):
        # A number failed the decoder's quick checks: the validator finds it and words the refusal.
        try:
            validate_batch(batch)
        except InvalidBatch as exc:
            raise InvalidWireBatch(str(exc)) from exc
    return batch


def _encode_event(event: Event, out: pb.Event) -> None:
    match event:
        case EngineStep():
            # Most steps preempt, resume, finish and find in the cache nothing: an empty field is not touched
            # (the same bytes, at about two thirds of the cost per step).
            s = out.step
            s.step = event.step
            s.start_time = event.start_time
            s.duration = event.duration
            scheduled = event.scheduled_tokens
            if scheduled:
                s.scheduled_ids.extend(scheduled.keys())
                s.scheduled_counts.extend(scheduled.values())
            if event.preempted:
                s.preempted.extend(event.preempted)
            if event.resumed:
                s.resumed.extend(event.resumed)
            if event.finished:
                s.finished.extend(event.finished)
            s.kv_blocks_used = event.kv_blocks_used
            cached = event.cached_tokens
            if cached:
                s.cached_ids.extend(cached.keys())
                s.cached_counts.extend(cached.values())
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
            if event.block_hashes:
                f.block_hashes.extend(event.block_hashes)
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


def _frozen_builder(cls: type[_T]) -> Callable[..., _T]:
    """A positional constructor for the frozen slots dataclass `cls`, taking every field in declaration order,
    that builds the object its `__init__` builds at half the cost: a frozen dataclass's `__init__` sets each
    field through `object.__setattr__`, this sets each slot through its descriptor. Decoding builds one event
    per message, and at 100,000 events a second that difference is a tenth of a core."""
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__, which this builder would skip")
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    scope: dict[str, object] = {"_new": object.__new__, "_cls": cls}
    scope.update({f"_set_{name}": getattr(cls, name).__set__ for name in names})
    body = "".join(f"    _set_{name}(event, {name})\n" for name in names)
    exec(f"def build({', '.join(names)}):\n    event = _new(_cls)\n{body}    return event\n", scope)
    return scope["build"]  # type: ignore[return-value]


_new_step = _frozen_builder(EngineStep)
_new_arrival = _frozen_builder(RequestArrival)
_new_finish = _frozen_builder(RequestFinish)
_INF = math.inf


def _decode_events(messages: Sequence[pb.Event]) -> tuple[list[Event], bool]:
    """The batch's events, and whether every number passed the quick checks: the validator's own bounds
    (`adapters.validation`) on the numbers as they are decoded, so that a valid batch (nearly all of them) is
    not walked again. Infos, rare, get the validator's own check. A `WireError` for a malformed event comes
    first, whichever event it is in, as when the whole batch was decoded before it was validated."""
    events: list[Event] = []
    append = events.append
    checked = True
    for index, e in enumerate(messages):
        kind = e.WhichOneof("kind")
        if kind == "step":
            s = e.step
            ids, counts = s.scheduled_ids, s.scheduled_counts
            scheduled = dict(zip(ids, counts, strict=False))  # unequal lengths are refused just below
            if len(scheduled) != len(ids) or len(ids) != len(counts):
                _token_map(index, "scheduled", ids, counts)  # raises, naming what is wrong
            cached_ids, cached_counts = s.cached_ids, s.cached_counts
            cached = (
                _token_map(index, "cached", cached_ids, cached_counts) if cached_ids or cached_counts else {}
            )
            number, start, duration, kv = s.step, s.start_time, s.duration, s.kv_blocks_used
            if checked and not (
                number >= 0
                and -_INF < start < _INF
                and 0.0 <= duration < _INF
                and kv >= 0
                and (not counts or min(counts) >= 0)
                and (not cached or min(cached_counts) >= 0)
            ):
                checked = False
            preempted, resumed, finished = s.preempted, s.resumed, s.finished
            append(
                _new_step(
                    number,
                    start,
                    duration,
                    scheduled,
                    tuple(preempted) if preempted else (),
                    tuple(resumed) if resumed else (),
                    tuple(finished) if finished else (),
                    kv,
                    cached,
                )
            )
        elif kind == "arrival":
            a = e.arrival
            time, prompt = a.time, a.prompt_tokens
            output = a.output_tokens if a.HasField("output_tokens") else None
            max_tokens = a.max_tokens if a.HasField("max_tokens") else None
            if checked and not (
                -_INF < time < _INF
                and prompt >= 0
                and (output is None or output >= 0)
                and (max_tokens is None or max_tokens >= 0)
            ):
                checked = False
            prefix, hashes = a.prefix_block_hashes, a.block_hashes
            append(
                _new_arrival(
                    a.request_id,
                    time,
                    prompt,
                    output,
                    max_tokens,
                    a.priority,
                    tuple(prefix) if prefix else (),
                    tuple(hashes) if hashes else (),
                )
            )
        elif kind == "finish":
            f = e.finish
            time, output = f.time, f.output_tokens
            if checked and not (-_INF < time < _INF and output >= 0):
                checked = False
            hashes = f.block_hashes
            append(_new_finish(f.request_id, time, output, f.reason, tuple(hashes) if hashes else ()))
        elif kind == "info":
            info = _decode_info(index, e.info)
            if checked and event_problem(info) is not None:
                checked = False
            append(info)
        else:
            raise WireError(f"event {index}: no event kind set")
    return events, checked


def _decode_info(index: int, i: pb.EngineInfo) -> EngineInfo:
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


def _token_map(index: int, name: str, ids: Sequence[str], counts: Sequence[int]) -> dict[str, int]:
    """Request id -> token count from two parallel arrays, refusing arrays of unequal length or a repeated id."""
    if len(ids) != len(counts):
        raise WireError(f"event {index}: {len(ids)} {name} ids but {len(counts)} counts")
    tokens = dict(zip(ids, counts, strict=True))
    if len(tokens) != len(ids):
        raise WireError(f"event {index}: a request id appears twice in one step's {name} tokens")
    return tokens


# ---- the compiled reader ------------------------------------------------------------------------------------

COMPILED_MODULE = "vllm_shadow.adapters._wire_compiled"


def compiled_reader() -> ModuleType | None:
    """adapters/_wire_compiled.pyx as built by setup.py, or None: not built (VLLM_SHADOW_SKIP_COMPILE=1, a
    checkout used without installing), not wanted (VLLM_SHADOW_PURE_PYTHON=1), older than its source in a
    checkout (with a warning), or on a big-endian machine (it reads doubles as little-endian). A build that is
    there but does not load is an error, not a fallback."""
    if os.environ.get("VLLM_SHADOW_PURE_PYTHON", "") not in ("", "0") or sys.byteorder != "little":
        return None
    try:
        module = importlib.import_module(COMPILED_MODULE)
    except ModuleNotFoundError as error:
        if error.name != COMPILED_MODULE:
            raise
        return None
    source = Path(__file__).with_name("_wire_compiled.pyx")
    built = Path(module.__file__).stat().st_mtime if module.__file__ is not None else math.inf
    if source.exists() and source.stat().st_mtime > built:
        warnings.warn(
            "the compiled wire reader is older than _wire_compiled.pyx: decoding through upb until it is "
            "rebuilt (`pip install -e .`)",
            stacklevel=2,
        )
        return None
    return module


_compiled = compiled_reader()
COMPILED = _compiled is not None  # whether decode_batch reads through the compiled reader first
# `_new_arrival` for the engine tracker, which builds one per request of every window: the same event, built in C
# where the reader is built. (The upb path, the compiled reader's oracle, keeps its own builder.)
build_arrival = _compiled.new_arrival if _compiled is not None else _new_arrival
