"""The engine-side publisher: ordered delivery, bounded memory with counted drops, failing sinks isolated."""

from __future__ import annotations

import threading

from vllm_shadow.adapters.events import EngineStep
from vllm_shadow.adapters.publisher import EventBatch, Publisher


def _step(i: int) -> EngineStep:
    return EngineStep(i, float(i), 0.001, {"r": 1})


class _Collect:
    def __init__(self) -> None:
        self.batches: list[EventBatch] = []

    def __call__(self, batch: EventBatch) -> None:
        self.batches.append(batch)

    @property
    def events(self) -> list:
        return [e for b in self.batches for e in b.events]


def test_every_event_arrives_in_order_with_consecutive_sequence_numbers() -> None:
    sink = _Collect()
    publisher = Publisher([sink], batch_size=7, flush_interval=0.005, source="engine-a")
    for i in range(100):
        publisher.publish(_step(i))
    publisher.close()
    assert sink.events == [_step(i) for i in range(100)]
    assert [b.sequence for b in sink.batches] == list(range(len(sink.batches)))
    assert all(b.source == "engine-a" and len(b.events) <= 7 for b in sink.batches)
    assert publisher.dropped == 0 and publisher.accepted == 100


def test_a_blocked_sink_never_blocks_publish_and_every_drop_is_counted() -> None:
    entered = threading.Event()
    release = threading.Event()
    delivered = _Collect()

    def stuck(batch: EventBatch) -> None:
        entered.set()
        release.wait(10)
        delivered(batch)

    publisher = Publisher([stuck], capacity=50, batch_size=10, flush_interval=0.001)
    publisher.publish(_step(-1))
    assert entered.wait(10), "the delivery thread never called the sink"  # it is now stuck inside it
    for i in range(10_000):
        publisher.publish(_step(i))
    # Every publish returned while the sink still held the first batch: none of them waited for it.
    assert delivered.events == []
    release.set()
    publisher.close()
    assert publisher.accepted + publisher.dropped == 10_001
    assert publisher.dropped >= 10_000 - 50
    assert len(delivered.events) == publisher.accepted
    assert delivered.batches[-1].dropped == publisher.dropped  # the loss travels with the stream


def test_a_failing_sink_backs_off_and_does_not_starve_the_others() -> None:
    healthy = _Collect()
    calls = 0

    def broken(batch: EventBatch) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("shadow is gone")

    publisher = Publisher([broken, healthy], batch_size=1, flush_interval=0.001, max_backoff=0.05)
    for i in range(300):
        publisher.publish(_step(i))
    publisher.close()
    broken_stats, healthy_stats = publisher.sink_stats()
    assert healthy.events == [_step(i) for i in range(300)]
    assert healthy_stats.sent_events == 300 and healthy_stats.lost_events == 0
    assert broken_stats.failures == calls >= 1
    assert broken_stats.sent_events == 0 and broken_stats.lost_events == 300
    assert calls < 300  # back-off skipped batches instead of calling a dead sink for each one


def test_close_closes_sinks_that_can_be_closed() -> None:
    closed = []

    class Closable(_Collect):
        def close(self) -> None:
            closed.append(True)

    publisher = Publisher([Closable()])
    publisher.close()
    assert closed == [True]
