"""Batches from one sender back in order; every loss and every late batch counted."""

from __future__ import annotations

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.tracking.sequencing import Sequencer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def batch(sequence: int, dropped: int = 0, events: int = 1) -> EventBatch:
    return EventBatch(
        [RequestArrival(f"r{sequence}.{i}", 0.0, 1) for i in range(events)], "e", sequence, dropped
    )


def sequences(deliveries) -> list[tuple[int, bool]]:
    return [(d.batch.sequence, d.gap_before) for d in deliveries]


def test_in_order_batches_pass_straight_through() -> None:
    s = Sequencer()
    out = [d for i in range(5) for d in s.push(batch(i))]
    assert sequences(out) == [(i, False) for i in range(5)]
    assert s.stats.batches == 5 and s.held == 0


def test_reordered_batches_are_released_in_order_once_the_gap_fills() -> None:
    s = Sequencer()
    assert sequences(s.push(batch(0))) == [(0, False)]
    assert s.push(batch(2)) == [] and s.push(batch(3)) == []
    assert sequences(s.push(batch(1))) == [(1, False), (2, False), (3, False)]
    assert s.stats.lost_batches == 0


def test_a_gap_is_given_up_after_max_held_batches_and_reported_once() -> None:
    s = Sequencer(max_held=2)
    s.push(batch(0))
    assert s.push(batch(2)) == [] and s.push(batch(3)) == []
    out = s.push(batch(4))  # a third held batch: batch 1 is lost
    assert sequences(out) == [(2, True), (3, False), (4, False)]
    assert s.stats.lost_batches == 1
    late = s.push(batch(1))
    assert late == [] and s.stats.late_batches == 1 and s.stats.late_events == 1


def test_a_gap_is_given_up_after_max_wait() -> None:
    clock = Clock()
    s = Sequencer(max_wait=1.0, clock=clock)
    s.push(batch(0))
    s.push(batch(3))
    clock.now = 0.5
    assert s.expire() == []
    clock.now = 1.6
    assert sequences(s.expire()) == [(3, True)]
    assert s.stats.lost_batches == 2


def test_a_duplicate_batch_is_dropped_and_counted() -> None:
    s = Sequencer()
    s.push(batch(0))
    s.push(batch(2))
    assert s.push(batch(2)) == [] and s.stats.late_batches == 1
    assert s.push(batch(0)) == [] and s.stats.late_batches == 2


def test_a_stream_joined_mid_way_starts_with_a_gap_once_the_wait_for_its_start_is_over() -> None:
    clock = Clock()
    s = Sequencer(max_wait=1.0, clock=clock)
    assert s.push(batch(7)) == [] and s.push(batch(8)) == []  # batch 0 may still be on its way
    clock.now = 1.5
    assert sequences(s.expire()) == [(7, True), (8, False)]
    assert s.stats.lost_batches == 0  # how much came before is unknown: not counted as lost
    assert sequences(s.push(batch(9))) == [(9, False)]


def test_the_first_batches_may_arrive_out_of_order() -> None:
    s = Sequencer()
    assert s.push(batch(2)) == [] and s.push(batch(1)) == []
    assert sequences(s.push(batch(0))) == [(0, False), (1, False), (2, False)]


def test_events_the_sender_dropped_mark_a_gap() -> None:
    s = Sequencer()
    s.push(batch(0))
    assert sequences(s.push(batch(1, dropped=5))) == [(1, True)]
    assert sequences(s.push(batch(2, dropped=5))) == [(2, False)]
    assert s.stats.sender_dropped == 5
