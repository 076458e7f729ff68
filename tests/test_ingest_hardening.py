"""Issue 13 at the shadow's ingest: an engine restarted under the same source name, forged sequence numbers,
acknowledgements that never claim events the shadow dropped, and impossible numbers refused whole on every
transport. Recorded real-engine streams; windows are not evaluated."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import grpc
import pytest

from tests import shadow_support as support
from tests.waiting import ManualClock
from vllm_shadow.adapters.events import EngineStep, Event, RequestArrival, SchedulerSettings
from vllm_shadow.adapters.grpc_ingest import PUBLISH_METHOD
from vllm_shadow.adapters.proto import shadow_events_pb2 as pb
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.validation import InvalidBatch
from vllm_shadow.adapters.wire import encode_batch
from vllm_shadow.runtime.core import ShadowConfig, ShadowCore
from vllm_shadow.runtime.service import ServiceConfig, ShadowService
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.tracking.reasons import RefusalReason
from vllm_shadow.tracking.windows import WindowRules

SOURCE = "host:1234"  # both runs of the engine: same host, same pid (a container's pid 1, say)


def core(clock: ManualClock | None = None) -> ShadowCore:
    config = ShadowConfig(windows=WindowRules(seconds=0.5), hardware="cpu")
    return ShadowCore(config, LocalTasks(), monotonic=clock or ManualClock())


def stream(incarnation: int) -> list[EventBatch]:
    return [
        dataclasses.replace(b, source=SOURCE, incarnation=incarnation) for b in support.batches("fcfs-kv12")
    ]


def test_an_engine_restarted_under_the_same_source_name_is_a_restart_and_tracked_afresh() -> None:
    shadow = core()
    first, second = stream(0x1111), stream(0x2222)
    for batch in first:
        shadow.ingest(batch, "grpc")
    arrived_once = shadow.snapshot().engines[0].tracker.requests_arrived
    acks = [shadow.ingest(batch, "grpc") for batch in second]
    (engine,) = shadow.snapshot().engines
    assert engine.restarts == 1 and engine.sequence.restarts == 1
    # Before incarnations, every batch of the second run was dropped as late while the acks said accepted.
    assert engine.sequence.late_batches == 0
    assert engine.tracker.requests_arrived == 2 * arrived_once
    assert acks == [len(b.events) for b in second]


def test_a_forged_sequence_number_neither_poisons_the_loss_count_nor_silences_the_stream() -> None:
    clock = ManualClock()
    shadow = core(clock)
    batches = stream(0x1111)
    shadow.ingest(batches[0], "grpc")
    shadow.ingest(dataclasses.replace(batches[1], sequence=2**63), "grpc")
    acks = [shadow.ingest(batch, "grpc") for batch in batches[2:10]]
    for _ in range(3):  # the service ticks every 250 ms: each tick gives up one gap whose wait is over
        clock.now += 60.0
        shadow.tick()
    acks += [shadow.ingest(batch, "grpc") for batch in batches[10:]]
    (engine,) = shadow.snapshot().engines
    # Before the bound: batches_lost_total 9.2e18 and every later batch dropped as late, acks saying accepted.
    assert engine.sequence.lost_batches <= 1 and engine.sequence.late_batches == 0
    assert acks == [len(b.events) for b in batches[2:]]
    assert engine.tracker.steps > 0


def test_the_ack_of_a_batch_dropped_as_late_claims_no_event() -> None:
    shadow = core()
    batches = stream(0x1111)
    for batch in batches[:3]:
        shadow.ingest(batch, "grpc")
    assert shadow.ingest(batches[1], "grpc") == 0  # a duplicate: dropped, and the ack says so
    assert shadow.snapshot().engines[0].sequence.late_events == len(batches[1].events)


# ---- issue 13, item 5: impossible numbers refused whole and counted, on every transport ----------------------


def serving() -> ShadowService:
    config = ServiceConfig(
        shadow=ShadowConfig(windows=WindowRules(seconds=0.5), hardware="cpu"),
        metrics_port=None,
        tick_seconds=60,
    )
    return ShadowService(config, LocalTasks())


def publish(service: ShadowService, batch: EventBatch) -> grpc.RpcError | pb.Ack:
    with grpc.insecure_channel(service.addresses()["grpc"]) as channel:
        call = channel.unary_unary(
            PUBLISH_METHOD, request_serializer=None, response_deserializer=pb.Ack.FromString
        )
        try:
            return call(encode_batch(batch), timeout=10)
        except grpc.RpcError as exc:
            return exc


def poisoned(batches: list[EventBatch], index: int, event: Event) -> EventBatch:
    """`batches[index]` with `event` last: valid events before it, which must not be applied either."""
    return dataclasses.replace(batches[index], events=[*batches[index].events, event])


ZERO_SEQS = dataclasses.replace(
    support.info_of(support.events("fcfs-kv12")),
    scheduler=SchedulerSettings(max_num_seqs=0),
)


@pytest.mark.parametrize(
    "bad",
    [
        ZERO_SEQS,
        dataclasses.replace(support.info_of(support.events("fcfs-kv12")), block_size=0),
        EngineStep(10**6, 1.0, float("inf"), {}),
        EngineStep(10**6, 1.0, float("nan"), {}),
        RequestArrival("x", 1.0, prompt_tokens=-1),
    ],
    ids=["max_num_seqs=0", "block_size=0", "inf-duration", "nan-duration", "negative-prompt"],
)
def test_an_impossible_number_is_refused_whole_on_grpc_and_ray_and_the_stream_goes_on(bad: Event) -> None:
    batches = stream(0x1111)
    with contextlib.closing(serving()) as service:
        publish(service, batches[0])
        # gRPC: refused whole with INVALID_ARGUMENT and counted; before, some of these were INTERNAL for every
        # later batch, half-applied, or accepted (a NaN step time poisoned actual_gpu_seconds_total for good).
        refused = publish(service, poisoned(batches, 1, bad))
        assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Ray: the same check, the caller gets the error.
        with pytest.raises(InvalidBatch):
            service.ingest(poisoned(batches, 1, bad))
        snapshot = service.snapshot()
        assert snapshot.refused["grpc"][RefusalReason.INVALID] == 1
        assert snapshot.refused["ray"][RefusalReason.INVALID] == 1
        # Batch 1's own arrival was not applied either (batch 0 only announced the engine).
        assert [e.tracker.requests_arrived for e in snapshot.engines] in ([], [0])
        acks = [publish(service, batch) for batch in batches[1:]]
        assert all(
            isinstance(a, pb.Ack) and a.accepted == len(b.events)
            for a, b in zip(acks, batches[1:], strict=True)
        )
        (engine,) = service.snapshot().engines
        assert engine.tracker.steps > 0 and math.isfinite(engine.tracker.actual_gpu_seconds)
        assert engine.info.scheduler.max_num_seqs > 0
