"""Property tests of ingest sequencing (issue 13): whatever interleaving, duplicates, gaps, restarts and forged
numbers arrive, every batch is accounted for exactly once and no counter goes negative or absurd."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.tracking.sequencing import Delivery, Sequencer

MAX_HELD = 4
MAX_JUMP = 64
MAX_WAIT = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Sent:
    """What an honest sender sent: its incarnations in order, each a list of batches split into parts."""

    pieces: list[list[EventBatch]]  # per incarnation, in the order sent


@st.composite
def honest_senders(draw: st.DrawFn) -> Sent:
    incarnations = draw(st.lists(st.integers(1, 2**64 - 1), min_size=1, max_size=3, unique=True))
    pieces = []
    for incarnation in incarnations:
        own = []
        dropped = 0
        for sequence in range(draw(st.integers(1, 25))):
            parts = draw(st.sampled_from([1, 1, 1, 2, 3]))
            dropped += draw(st.sampled_from([0, 0, 0, 1]))  # the sender's own queue drops, cumulative
            for part in range(parts):
                events = [RequestArrival(f"{incarnation}.{sequence}.{part}", 0.0, 1)]
                own.append(EventBatch(events, "e", sequence, dropped, incarnation, part, parts))
        pieces.append(own)
    return Sent(pieces)


def reordered(draw: st.DrawFn, pieces: list[EventBatch], window: int) -> list[EventBatch]:
    """`pieces` with each overtaken by at most `window` later ones (what a thread pool does)."""
    delays = draw(st.lists(st.integers(0, window), min_size=len(pieces), max_size=len(pieces)))
    order = sorted(range(len(pieces)), key=lambda i: i + delays[i])
    return [pieces[i] for i in order]


def push_all(s: Sequencer, arrivals: list[EventBatch]) -> tuple[list[Delivery], int]:
    delivered, accepted = [], 0
    for batch in arrivals:
        pushed = s.push(batch)
        accepted += pushed.accepted
        delivered += pushed.deliveries
    return delivered, accepted


@given(honest_senders(), st.data())
@settings(max_examples=200, deadline=None)
def test_a_bounded_reordering_of_an_honest_sender_is_delivered_whole_and_in_order(
    sent: Sent, data: st.DataObject
) -> None:
    clock = Clock()
    s = Sequencer(max_held=MAX_HELD, max_jump=MAX_JUMP, max_wait=MAX_WAIT, clock=clock)
    arrivals, delivered, accepted = [], [], 0
    for own in sent.pieces:
        # Reordered within each incarnation only: a restarted engine's batches come after its old self's, and
        # a restart takes a while (an engine starting), so the old incarnation has been silent for a bit.
        clock.now += 2 * MAX_WAIT
        pieces = reordered(data.draw, own, MAX_HELD)
        more, taken = push_all(s, pieces)
        arrivals += pieces
        delivered += more
        accepted += taken
    clock.now += 2 * MAX_WAIT  # a restarted sender that sent one batch is taken once the old one is silent
    delivered += s.expire()
    assert accepted == len(arrivals)
    assert [d.batch for d in delivered] == [b for own in sent.pieces for b in own]
    assert [d.restart for d in delivered] == [
        i > 0 and j == 0 for i, own in enumerate(sent.pieces) for j in range(len(own))
    ]
    assert s.stats.lost_batches == s.stats.late_batches == s.stats.jumps == s.held == 0
    assert s.stats.restarts == len(sent.pieces) - 1
    assert s.stats.sender_dropped == sum(own[-1].dropped for own in sent.pieces)


@st.composite
def hostile_arrivals(draw: st.DrawFn) -> list[EventBatch | float]:
    """An honest sender's pieces, then lost, duplicated, reordered across restarts, with forged numbers, made-up
    incarnations and clock ticks (floats: seconds to advance, then `expire`) mixed in."""
    sent = draw(honest_senders())
    pieces = [b for own in sent.pieces for b in own]
    kept = [b for b in pieces if draw(st.integers(0, 4))]  # about one in five lost
    kept += draw(st.lists(st.sampled_from(pieces), max_size=5))  # duplicates, late
    forged = st.builds(
        lambda b, sequence: EventBatch(b.events, "e", sequence, b.dropped, b.incarnation),
        st.sampled_from(pieces),
        st.integers(0, 2**64 - 1),
    )
    kept += draw(st.lists(forged, max_size=3))
    made_up = st.builds(  # an incarnation no sender drew
        lambda b, incarnation: EventBatch(b.events, "e", b.sequence, b.dropped, incarnation),
        st.sampled_from(pieces),
        st.integers(0, 2**64 - 1),
    )
    kept += draw(st.lists(made_up, max_size=2))
    arrivals: list[EventBatch | float] = draw(st.permutations(kept))
    for _ in range(draw(st.integers(0, 4))):
        arrivals.insert(draw(st.integers(0, len(arrivals))), draw(st.sampled_from([0.1, 0.5, 2.0])))
    return arrivals


@given(hostile_arrivals())
@settings(max_examples=300, deadline=None)
def test_every_batch_is_accounted_for_once_and_no_counter_is_absurd(
    arrivals: list[EventBatch | float],
) -> None:
    clock = Clock()
    s = Sequencer(max_held=MAX_HELD, max_jump=MAX_JUMP, max_wait=MAX_WAIT, clock=clock)
    delivered: list[Delivery] = []
    pushes = refused = 0
    sender_dropped = 0
    for item in arrivals:
        if isinstance(item, float):
            clock.now += item
            delivered += s.expire()
        else:
            pushes += 1
            pushed = s.push(item)
            refused += not pushed.accepted
            delivered += pushed.deliveries
        stats = s.stats
        # Every batch is delivered, held, or dropped and counted (late or stray): exactly one of them.
        assert pushes == len(delivered) + s.held + stats.late_batches + stats.stray_batches
        assert refused <= stats.late_batches + stats.stray_batches  # an ack never claims a dropped batch
        assert s.held <= MAX_HELD + 1  # the reorder buffer, and a new incarnation's first batch held aside
        assert stats.sender_dropped >= sender_dropped  # a counter: it never goes back
        sender_dropped = stats.sender_dropped
    # Once `max_wait` has passed with nothing new, nothing may stay held: every gap is given up (one per
    # call), and an uncorroborated incarnation adopted then counts its batches' wait from their arrival.
    clock.now += MAX_WAIT + 1e-3
    for _ in range(MAX_HELD + 2):
        if not s.held:
            break
        delivered += s.expire()
    assert s.held == 0, "batches held past max_wait"
    stats = s.stats
    assert len(delivered) == stats.batches == pushes - stats.late_batches - stats.stray_batches
    if stats.jumps == 0:  # only a forged pair of numbers, then a replayed pair, can move the stream back
        assert len({id(d.batch) for d in delivered}) == len(delivered)
    assert min(stats.lost_batches, stats.late_events, stats.stray_events, stats.restarts) >= 0
    # Not absurd: a batch can make the count of lost batches grow by one window's width at most.
    assert stats.lost_batches <= pushes * MAX_JUMP
    assert stats.jumps <= stats.stray_batches
