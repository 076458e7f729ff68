"""Issue 13 at the core's ingest: an engine restarted under the same source name, forged sequence numbers, and
acknowledgements that never claim events the shadow dropped. Recorded real-engine streams, no evaluation."""

from __future__ import annotations

import dataclasses

from tests import shadow_support as support
from tests.waiting import ManualClock
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.runtime.core import ShadowConfig, ShadowCore
from vllm_shadow.runtime.tasks import LocalTasks
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
