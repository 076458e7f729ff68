"""Issue 13, items 6 and 12: what the sender loses is counted where someone can see it.

Item 6: batches the sender could not deliver while the shadow was down travel on the wire (each sink's own
count) and the shadow exports them, summed over the sender's restarts, as `vllm_shadow_sender_batches_lost_total`:
the shadow's own gap count cannot see them, since a restarted shadow joins the stream mid-way.
"""

from __future__ import annotations

import contextlib

from prometheus_client.parser import text_string_to_metric_families

from tests import shadow_support as support
from tests.waiting import wait_until
from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.grpc_ingest import GrpcSink, IngestServer
from vllm_shadow.adapters.publisher import EventBatch, Publisher
from vllm_shadow.readout.exporter import exposition
from vllm_shadow.runtime.core import ShadowConfig
from vllm_shadow.runtime.service import ServiceConfig, ShadowService
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.tracking.windows import WindowRules

INFO = support.info_of(support.events("fcfs-kv12"))


def test_batches_lost_while_the_shadow_was_down_are_exported_once_it_is_back() -> None:
    with IngestServer(lambda batch: None) as probe:
        address = probe.address  # a port that was just free, now closed: the shadow is down
    publisher = Publisher(
        [GrpcSink(address, timeout=0.2)], batch_size=1, flush_interval=0.005, max_backoff=0.05
    )
    (stats,) = publisher.sink_stats()
    try:
        for i in range(50):
            publisher.publish(RequestArrival(f"lost-{i}", float(i), 8))
        wait_until(lambda: stats.lost_batches == 50, 10, "the sender to count every batch as lost")
        config = ServiceConfig(
            shadow=ShadowConfig(windows=WindowRules(seconds=0.5), hardware="cpu"),
            grpc_address=address,
            metrics_port=None,
        )
        with contextlib.closing(ShadowService(config, LocalTasks())) as service:

            def exported() -> float | None:
                # The engine goes on: it announces itself (as after a restart; or the shadow's state file
                # knows it) and its requests keep coming, some lost while the sink still backs off.
                publisher.publish(INFO)
                publisher.publish(RequestArrival(f"kept-{publisher.accepted}", 100.0, 8))
                for family in text_string_to_metric_families(exposition(service.snapshot())):
                    if family.name == "vllm_shadow_sender_batches_lost":
                        return sum(s.value for s in family.samples if s.name.endswith("_total"))
                return None

            wait_until(lambda: exported() == stats.lost_batches, 10, "the shadow to export the sender's loss")
            (engine,) = service.snapshot().engines
            assert engine.sequence.sender_lost_batches == stats.lost_batches >= 50
    finally:
        publisher.close()


def test_each_sink_reports_its_own_losses() -> None:
    received: list[EventBatch] = []
    failures = iter([True, True, True])

    def flaky(batch: EventBatch) -> None:
        if next(failures, False):
            raise ConnectionError("shadow down")
        received.append(batch)

    def healthy(batch: EventBatch) -> None:
        assert batch.lost_batches == 0

    publisher = Publisher([flaky, healthy], batch_size=1, flush_interval=0.001, max_backoff=0.001)
    flaky_stats, healthy_stats = publisher.sink_stats()
    for i in range(20):  # one at a time, so that the back-off ends between batches
        publisher.publish(RequestArrival(f"r{i}", float(i), 8))
        wait_until(lambda n=i + 1: len(received) + flaky_stats.lost_batches == n, 10, f"batch {i} handled")
    publisher.close()
    assert flaky_stats.lost_batches >= 3 and healthy_stats.lost_batches == 0
    assert received[-1].lost_batches == flaky_stats.lost_batches  # the count travels with the next batch
    assert len(received) + flaky_stats.lost_batches == 20
