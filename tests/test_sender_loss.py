"""Issue 13, items 6 and 12: what the sender loses is counted where someone can see it.

Item 12: the hook's close gives the delivery thread a bounded time to send what is queued; whatever it could
not deliver by then (a black-holed shadow) is counted and logged, and the engine is never held longer.

Item 6: batches the sender could not deliver while the shadow was down travel on the wire (each sink's own
count) and the shadow exports them, summed over the sender's restarts, as `vllm_shadow_sender_batches_lost_total`:
the shadow's own gap count cannot see them, since a restarted shadow joins the stream mid-way.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

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


# ---- item 12: what is queued when the hook closes is delivered within a bound, or counted and logged ----------


class _BlackHole:
    """A shadow that takes the connection and never answers: every call blocks until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = False

    def __call__(self, batch: EventBatch) -> None:
        self.entered.set()
        self.release.wait(60)
        raise ConnectionError("no answer")

    def close(self) -> None:
        self.closed = True
        self.release.set()  # as closing a gRPC channel cancels its calls


def test_close_with_a_black_holed_shadow_returns_within_its_bound_and_counts_what_it_drops(caplog) -> None:
    hole = _BlackHole()
    publisher = Publisher([hole], batch_size=10, flush_interval=0.001)
    for i in range(1000):
        publisher.publish(RequestArrival(f"r{i}", float(i), 8))
    assert hole.entered.wait(10), "the delivery thread never called the sink"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vllm_shadow.adapters.publisher"):
        publisher.close(timeout=0.2)
    # Not a timing test: the black hole would hold the engine for a minute per batch; the bound is 0.2 s.
    assert time.monotonic() - started < 10
    assert hole.closed
    # Before: every queued event vanished uncounted. Now: those never delivered are counted and logged.
    assert publisher.undelivered_at_close == 1000
    assert "1000 events undelivered" in caplog.text


def test_close_delivers_what_is_queued_when_the_sink_keeps_up() -> None:
    received: list[EventBatch] = []
    publisher = Publisher([received.append], batch_size=10, flush_interval=60.0)  # only close drains
    for i in range(1000):
        publisher.publish(RequestArrival(f"r{i}", float(i), 8))
    publisher.close(timeout=10)
    assert sum(len(b.events) for b in received) == 1000
    assert publisher.undelivered_at_close == 0


def test_a_sink_that_waits_on_close_is_given_only_what_is_left_of_the_bound() -> None:
    given: list[float] = []

    class Waiting:
        def __call__(self, batch: EventBatch) -> None:
            pass

        def close(self, timeout: float | None = None) -> None:
            given.append(timeout if timeout is not None else float("inf"))

    publisher = Publisher([Waiting()], flush_interval=0.001)
    publisher.publish(RequestArrival("r", 0.0, 8))
    publisher.close(timeout=0.5)
    assert len(given) == 1 and 0 <= given[0] <= 0.5
