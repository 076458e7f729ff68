"""Batches from one sender back in order; every loss and every late batch counted."""

from __future__ import annotations

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.tracking.sequencing import Delivery, Pushed, Sequencer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def batch(
    sequence: int, dropped: int = 0, events: int = 1, incarnation: int = 1, part: int = 0, parts: int = 1
) -> EventBatch:
    return EventBatch(
        [RequestArrival(f"r{sequence}.{part}.{i}", 0.0, 1) for i in range(events)],
        "e",
        sequence,
        dropped,
        incarnation=incarnation,
        part=part,
        parts=parts,
    )


def sequences(pushed: Pushed | list[Delivery]) -> list[tuple[int, bool]]:
    deliveries = pushed.deliveries if isinstance(pushed, Pushed) else pushed
    return [(d.batch.sequence, d.gap_before) for d in deliveries]


def nothing(pushed: Pushed) -> bool:
    """Accepted and held: nothing delivered yet."""
    return pushed.accepted and pushed.deliveries == []


def dropped(pushed: Pushed) -> bool:
    return not pushed.accepted and pushed.deliveries == []


def test_in_order_batches_pass_straight_through() -> None:
    s = Sequencer()
    out = [d for i in range(5) for d in s.push(batch(i)).deliveries]
    assert sequences(out) == [(i, False) for i in range(5)]
    assert s.stats.batches == 5 and s.held == 0


def test_reordered_batches_are_released_in_order_once_the_gap_fills() -> None:
    s = Sequencer()
    assert sequences(s.push(batch(0))) == [(0, False)]
    assert nothing(s.push(batch(2))) and nothing(s.push(batch(3)))
    assert sequences(s.push(batch(1))) == [(1, False), (2, False), (3, False)]
    assert s.stats.lost_batches == 0


def test_a_gap_is_given_up_after_max_held_batches_and_reported_once() -> None:
    s = Sequencer(max_held=2)
    s.push(batch(0))
    assert nothing(s.push(batch(2))) and nothing(s.push(batch(3)))
    out = s.push(batch(4))  # a third held batch: batch 1 is lost
    assert sequences(out) == [(2, True), (3, False), (4, False)]
    assert s.stats.lost_batches == 1
    assert dropped(s.push(batch(1)))  # late: not accepted, so the sender's ack says so
    assert s.stats.late_batches == 1 and s.stats.late_events == 1


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
    assert dropped(s.push(batch(2))) and s.stats.late_batches == 1
    assert dropped(s.push(batch(0))) and s.stats.late_batches == 2


def test_a_stream_joined_mid_way_starts_with_a_gap_once_the_wait_for_its_start_is_over() -> None:
    clock = Clock()
    s = Sequencer(max_wait=1.0, clock=clock)
    assert nothing(s.push(batch(7))) and nothing(s.push(batch(8)))  # batch 0 may still be on its way
    clock.now = 1.5
    assert sequences(s.expire()) == [(7, True), (8, False)]
    assert s.stats.lost_batches == 0  # how much came before is unknown: not counted as lost
    assert sequences(s.push(batch(9))) == [(9, False)]


def test_the_first_batches_may_arrive_out_of_order() -> None:
    s = Sequencer()
    assert nothing(s.push(batch(2))) and nothing(s.push(batch(1)))
    assert sequences(s.push(batch(0))) == [(0, False), (1, False), (2, False)]


def test_events_the_sender_dropped_mark_a_gap() -> None:
    s = Sequencer()
    s.push(batch(0))
    assert sequences(s.push(batch(1, dropped=5))) == [(1, True)]
    assert sequences(s.push(batch(2, dropped=5))) == [(2, False)]
    assert s.stats.sender_dropped == 5


# ---- issue 13, item 1: restarts under the same name, and forged sequence numbers -----------------------------


def test_a_sender_restarted_under_the_same_name_starts_a_fresh_stream() -> None:
    s = Sequencer()
    for i in range(5):
        s.push(batch(i, incarnation=111))
    # Same host and pid, a new publisher: its numbering starts again at 0. Before incarnations every one of
    # these batches was dropped as late while the ack said accepted.
    assert nothing(s.push(batch(0, incarnation=222)))  # held aside until its second batch corroborates it
    second = s.push(batch(1, incarnation=222))
    assert second.accepted
    assert [(d.batch.sequence, d.restart) for d in second.deliveries] == [(0, True), (1, False)]
    assert sequences(s.push(batch(2, incarnation=222))) == [(2, False)]
    assert s.stats.restarts == 1 and s.stats.late_batches == 0 and s.stats.lost_batches == 0


def test_batches_of_a_replaced_incarnation_are_late_not_a_second_restart() -> None:
    s = Sequencer()
    s.push(batch(0, incarnation=111))
    s.push(batch(0, incarnation=222))
    s.push(batch(1, incarnation=222))
    assert dropped(s.push(batch(1, incarnation=111, events=3)))
    assert s.stats.restarts == 1 and s.stats.late_batches == 1 and s.stats.late_events == 3
    assert sequences(s.push(batch(2, incarnation=222))) == [(2, False)]


def test_a_restart_delivers_what_the_old_incarnation_left_held_first() -> None:
    s = Sequencer()
    s.push(batch(0, incarnation=111))
    assert nothing(s.push(batch(2, incarnation=111)))
    assert nothing(s.push(batch(0, incarnation=222)))
    out = s.push(batch(1, incarnation=222)).deliveries
    assert [(d.batch.incarnation, d.batch.sequence, d.gap_before, d.restart) for d in out] == [
        (111, 2, True, False),
        (222, 0, False, True),
        (222, 1, False, False),
    ]
    assert s.stats.lost_batches == 1 and s.held == 0


def test_a_forged_sequence_number_cannot_poison_the_stream() -> None:
    s = Sequencer(max_jump=1000)
    s.push(batch(0))
    s.push(batch(1))
    assert dropped(s.push(batch(2**63, events=2)))  # a stray: dropped, counted, and the ack says so
    # Before the bound, lost_batches became 9.2e18 and every later batch was dropped as late.
    assert sequences(s.push(batch(2))) == [(2, False)]
    assert sequences(s.push(batch(3))) == [(3, False)]
    assert s.stats.lost_batches == 0 and s.stats.late_batches == 0 and s.stats.jumps == 0
    assert s.stats.stray_batches == 1 and s.stats.stray_events == 2


def test_a_forged_first_sequence_number_cannot_hide_the_real_stream() -> None:
    clock = Clock()
    s = Sequencer(max_jump=1000, max_wait=1.0, clock=clock)
    s.push(batch(2**64 - 1))  # held: before batch 0 the stream's start is unknown
    out = [d for i in range(3) for d in s.push(batch(i)).deliveries]
    assert [d.batch.sequence for d in out] == [0, 1, 2]
    clock.now = 5.0
    assert s.expire() == []  # given up on as a stray, not as 2**64 lost batches
    assert s.held == 0 and s.stats.stray_batches == 1
    assert sequences(s.push(batch(3))) == [(3, False)]
    assert s.stats.lost_batches == 0 and s.stats.late_batches == 0


def test_a_jump_beyond_the_window_that_the_sender_continues_restarts_the_numbering() -> None:
    # An outage longer than the window while the shadow stayed up: the sender's numbers moved on for real.
    s = Sequencer(max_jump=1000)
    s.push(batch(0))
    assert dropped(s.push(batch(5000)))  # alone, it could be forged
    assert sequences(s.push(batch(5001))) == [(5001, True)]  # continued: the stream is there now
    assert sequences(s.push(batch(5002))) == [(5002, False)]
    assert s.stats.jumps == 1 and s.stats.stray_batches == 1 and s.stats.lost_batches == 0


def test_a_long_legitimate_gap_within_the_bound_is_counted_as_lost() -> None:
    s = Sequencer(max_held=1, max_jump=1000)
    s.push(batch(0))
    s.push(batch(500))
    assert sequences(s.push(batch(501))) == [(500, True), (501, False)]
    assert s.stats.lost_batches == 499 and s.stats.jumps == 0


def test_the_parts_of_a_split_batch_are_all_delivered_in_order() -> None:
    # The gRPC sink splits a batch too large for one message; its parts share the batch's sequence number and
    # were dropped as duplicates, although the ack said accepted.
    s = Sequencer()
    assert sequences(s.push(batch(0))) == [(0, False)]
    assert nothing(s.push(batch(1, part=1, parts=2)))
    out = s.push(batch(1, part=0, parts=2)).deliveries
    assert [(d.batch.sequence, d.batch.part) for d in out] == [(1, 0), (1, 1)]
    assert sequences(s.push(batch(2))) == [(2, False)]
    assert s.stats.late_batches == 0 and s.stats.lost_batches == 0


def test_a_missing_part_is_a_lost_batch() -> None:
    s = Sequencer(max_held=1)
    s.push(batch(0))
    s.push(batch(1, part=0, parts=3))
    s.push(batch(1, part=2, parts=3))
    assert sequences(s.push(batch(2))) == [(1, True), (2, False)]
    assert s.stats.lost_batches == 1


def test_the_senders_counts_add_up_across_its_restarts() -> None:
    s = Sequencer()
    s.push(EventBatch([], "e", 0, dropped=4, incarnation=1, lost_batches=2))
    s.push(EventBatch([], "e", 0, dropped=1, incarnation=2, lost_batches=3))
    s.push(EventBatch([], "e", 1, dropped=1, incarnation=2, lost_batches=3))
    assert s.stats.sender_dropped == 5 and s.stats.sender_lost_batches == 5


def test_a_forged_incarnation_cannot_silence_the_real_stream() -> None:
    clock = Clock()
    s = Sequencer(max_wait=1.0, clock=clock)
    s.push(batch(0, incarnation=111))
    assert nothing(
        s.push(batch(0, incarnation=999))
    )  # a restart needs a second batch, or the old one's silence
    assert sequences(s.push(batch(1, incarnation=111))) == [(1, False)]  # the real sender goes on
    clock.now = 2.0
    assert s.expire() == []  # the "restarted" sender said no more, the old one did: a stray
    assert sequences(s.push(batch(2, incarnation=111))) == [(2, False)]
    assert s.stats.restarts == 0 and s.stats.stray_batches == 1 and s.stats.late_batches == 0


def test_a_restarted_sender_that_sends_once_is_taken_when_the_old_one_stays_silent() -> None:
    clock = Clock()
    s = Sequencer(max_wait=1.0, clock=clock)
    s.push(batch(0, incarnation=111))
    assert nothing(s.push(batch(0, incarnation=222)))  # the new engine announced itself, then stayed idle
    clock.now = 2.0
    out = s.expire()
    assert [(d.batch.incarnation, d.batch.sequence, d.restart) for d in out] == [(222, 0, True)]
    assert s.stats.restarts == 1 and s.stats.stray_batches == 0
