"""Put each sender's event batches back in order, and account for every batch that never arrives.

A publisher numbers its batches 0, 1, 2, ... (`EventBatch.sequence`) within its incarnation (a random number it
draws when it starts, `EventBatch.incarnation`); a batch the gRPC sink had to split travels as parts that share
its number (`part` of `parts`). Transports may reorder batches (a threaded Ray actor runs calls concurrently;
gRPC serves them on a thread pool), and may lose them (a sender backing off, a shadow restart). A `Sequencer`
holds early batches until the gap before them fills, up to a bound in batches and in time; then it gives the
missing numbers up as lost and delivers what it holds. A batch that turns up after its number was given up on
is late: dropped and counted, because the stream after it has already been applied.

Three things no honest sender does, and what each costs here (never more than one gap):
- a new incarnation under the same source name is the engine restarted (same host and pid, a new publisher)
  once it is corroborated: by a second batch of its own, or by the old incarnation's silence for `max_wait`
  after it appeared (an engine that announced itself and stayed idle). Then what the old one left held is
  delivered, its stragglers are late, and the new stream starts fresh. Until then its batches are held aside,
  so that one batch with a made-up incarnation cannot end the real stream: when the old incarnation goes on
  instead, it is dropped as a stray;
- a sequence number more than `max_jump` away from the expected one (a forged or corrupted number) is dropped
  and counted as a stray, never as lost batches, so one bad number can neither make the lost count absurd nor
  the rest of the stream late; only a second one that continues it (the sender really moved on, after an outage
  longer than the window) restarts the numbering there, counted as a jump;
- the sender's own cumulative counters start again with each incarnation; they are summed across them.

Every delivery says whether events were lost just before it, and whether the sender restarted, so the consumer
can stop trusting the engine state it tracks. `push` says whether the batch was taken (held or delivered), so
that an acknowledgement never claims events that were dropped.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vllm_shadow.adapters.publisher import EventBatch

# A position in a sender's stream: (sequence, part). After the last part of a batch comes (sequence + 1, 0).
_Position = tuple[int, int]


@dataclass(slots=True)
class SequenceStats:
    batches: int = 0  # delivered in order (each part of a split batch counts)
    lost_batches: int = 0  # sequence numbers given up on (wholly or in part)
    late_batches: int = 0  # arrived after their number was given up on, twice, or from a replaced incarnation
    late_events: int = 0
    stray_batches: int = 0  # sequence numbers beyond `max_jump` of the stream's, dropped
    stray_events: int = 0
    restarts: int = 0  # new incarnations of the sender after the first
    jumps: int = 0  # two strays in a row: the numbering restarted there
    sender_dropped: int = 0  # the sender's own count of events it could not queue, summed over incarnations
    sender_lost_batches: int = 0  # the sender's own count of batches it could not deliver here, likewise


@dataclass(frozen=True, slots=True)
class Delivery:
    batch: EventBatch
    gap_before: bool  # events were lost between the previous delivery and this one
    restart: bool = False  # the first delivery of a new incarnation: the sender restarted


@dataclass(slots=True)
class _Candidate:
    incarnation: int
    batches: list[EventBatch]
    since: float  # when its first batch came
    last: float  # when its last batch came


@dataclass(frozen=True, slots=True)
class Pushed:
    accepted: bool  # held or delivered; False: dropped (late, a duplicate, a replaced incarnation, a stray)
    deliveries: list[Delivery] = field(default_factory=list)


class Sequencer:
    """Per-source reorder buffer. Not thread-safe: the caller serialises `push` and `expire`."""

    def __init__(
        self,
        *,
        max_held: int = 64,
        max_wait: float = 1.0,
        max_jump: int = 1 << 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Until the sender's batch 0 is seen, or the wait for it is given up, the stream has no start:
        # batches are held, since under reordering the first to arrive need not be the first sent.
        if max_held < 1 or max_wait <= 0 or max_jump < max_held:
            raise ValueError("max_held must be >= 1, max_wait > 0 and max_jump >= max_held")
        self._max_held = max_held
        self._max_wait = max_wait
        # A publisher numbers every batch, also those its sink skips while backing off, so a legitimate jump
        # is as long as an outage of the link while the shadow stays up: 65,536 batches is at least ten
        # minutes of a busy engine. A longer one costs one batch (a stray) and a jump instead of a count of
        # lost batches; the sender's own count (`sender_lost_batches`) still tells how many it lost.
        self._max_jump = max_jump
        self._stray: int | None = None  # the sequence number of the last stray, which a jump must continue
        self._clock = clock
        self._incarnation: int | None = None
        self._replaced: deque[int] = deque(maxlen=16)  # recent incarnations: their stragglers are late
        self._candidate: _Candidate | None = None  # a new incarnation not yet corroborated
        self._current_heard = -math.inf  # when the current incarnation last sent a batch
        self._expected: _Position | None = None  # next position to deliver; None until the start is known
        self._held: dict[_Position, tuple[EventBatch, float]] = {}  # position -> (batch, when it arrived)
        self._gap = False  # a loss is pending report with the next delivery
        self._restart = False  # a restart is pending report with the next delivery
        self._sender_dropped_before = 0  # the senders' counters of replaced incarnations, summed
        self._sender_lost_before = 0
        self._sender_dropped = 0  # the current incarnation's latest counters
        self._sender_lost = 0
        self.stats = SequenceStats()

    @property
    def held(self) -> int:
        """Batches taken but not delivered yet: in the reorder buffer, or of a new incarnation held aside."""
        return len(self._held) + (len(self._candidate.batches) if self._candidate is not None else 0)

    def push(self, batch: EventBatch) -> Pushed:
        if batch.incarnation == self._incarnation:
            self._current_heard = self._clock()
            return self._push_current(batch)
        if batch.incarnation in self._replaced:
            return self._late(batch)
        if self._incarnation is None:  # the sender's first batch here: whatever came before is unknown
            out = self._new_incarnation(batch.incarnation)
            pushed = self._push_current(batch)
            return Pushed(pushed.accepted, out + pushed.deliveries)
        return Pushed(True, self._push_candidate(batch))

    def _push_candidate(self, batch: EventBatch) -> list[Delivery]:
        out = []
        candidate = self._candidate
        if candidate is not None and candidate.incarnation != batch.incarnation:
            # Another new incarnation: the pending one is the successor if the current one fell silent when it
            # came (an engine restarting over and over), else it was a stray.
            out += self._adopt() if self._current_heard < candidate.since else self._drop_candidate()
        if self._candidate is None:
            now = self._clock()
            self._candidate = _Candidate(batch.incarnation, [batch], now, now)
            return out
        self._candidate.batches.append(batch)  # corroborated: a second batch of its own
        self._candidate.last = self._clock()
        return out + self._adopt()

    def _adopt(self) -> list[Delivery]:
        candidate = self._candidate
        assert candidate is not None
        self._candidate = None
        out = self._new_incarnation(candidate.incarnation)
        self._current_heard = candidate.last
        # Held from when each batch came, not from now: adopting after `max_wait` must not hold them twice as long.
        arrivals = (candidate.since, candidate.last)[: len(candidate.batches)]  # it holds one batch or two
        for batch, arrived in zip(candidate.batches, arrivals, strict=True):
            out += self._push_current(batch, arrived).deliveries
        return out

    def _drop_candidate(self) -> list[Delivery]:
        assert self._candidate is not None
        for batch in self._candidate.batches:
            self._count_stray(batch)
        self._candidate = None
        return []

    def _push_current(self, batch: EventBatch, arrived: float | None = None) -> Pushed:
        out: list[Delivery] = []
        position = (batch.sequence, batch.part)
        if self._expected is None and position == (0, 0):
            self._expected = position  # the sender's first batch: the stream starts here, nothing missed
        if self._expected is not None and abs(batch.sequence - self._expected[0]) > self._max_jump:
            if self._stray is None or not 0 < batch.sequence - self._stray <= self._max_held:
                self._stray = batch.sequence
                self._count_stray(batch)
                return Pushed(False, out)
            out += self._jump(batch.sequence)
        elif (self._expected is not None and position < self._expected) or position in self._held:
            return self._late(batch)
        self._held[position] = (batch, self._clock() if arrived is None else arrived)
        out += self._release()
        if len(self._held) > self._max_held:
            out += self._give_up()
        return Pushed(True, out)

    def expire(self) -> list[Delivery]:
        """Give up on a gap whose oldest held batch has waited longer than `max_wait`; decide on a new
        incarnation that has waited as long for a second batch."""
        now = self._clock()
        out = []
        candidate = self._candidate
        if candidate is not None and now - candidate.since > self._max_wait:
            out += self._adopt() if self._current_heard < candidate.since else self._drop_candidate()
        if self._held and now - min(t for _, t in self._held.values()) > self._max_wait:
            out += self._give_up()
        return out

    def _late(self, batch: EventBatch) -> Pushed:
        self.stats.late_batches += 1
        self.stats.late_events += len(batch.events)
        return Pushed(False)

    def _count_stray(self, batch: EventBatch) -> None:
        self.stats.stray_batches += 1
        self.stats.stray_events += len(batch.events)

    def _new_incarnation(self, incarnation: int) -> list[Delivery]:
        """The sender restarted (or this is its first batch): finish the old stream, start a fresh one."""
        out = []
        while self._held:
            out += self._give_up()
        if self._incarnation is not None:
            self._replaced.append(self._incarnation)
            self.stats.restarts += 1
            self._restart = True
        self._incarnation = incarnation
        self._expected = None
        self._stray = None
        self._sender_dropped_before += self._sender_dropped
        self._sender_lost_before += self._sender_lost
        self._sender_dropped = self._sender_lost = 0
        return out

    def _jump(self, sequence: int) -> list[Delivery]:
        """The stream moved beyond the window: deliver what is held, restart the numbering there."""
        out = []
        while self._held:
            out += self._give_up()
        self.stats.jumps += 1
        self._expected = (sequence, 0)
        self._stray = None
        self._gap = True
        return out

    def _release(self) -> list[Delivery]:
        out = []
        while self._expected is not None and self._expected in self._held:
            batch, _ = self._held.pop(self._expected)
            last_part = batch.part + 1 >= batch.parts
            self._expected = (batch.sequence + 1, 0) if last_part else (batch.sequence, batch.part + 1)
            out.append(self._deliver(batch))
        return out

    def _give_up(self) -> list[Delivery]:
        first_held = min(self._held)
        if self._expected is not None:
            sequence, part = first_held
            if sequence - self._expected[0] > self._max_jump:
                # Held while the stream had no start yet, and too far from it: a stray after all.
                batch, _ = self._held.pop(first_held)
                self._count_stray(batch)
                return []
            # Every number from the expected one up to the held one lost something; the held one too when the
            # parts before its own are missing.
            self.stats.lost_batches += sequence - self._expected[0] + (part > 0)
        # Joining a stream mid-way (a shadow started after the engine, or restarted) is a loss too: what came
        # before is unknown, but not counted, since nobody knows how many batches that was.
        self._expected = first_held
        self._gap = True
        return self._release()

    def _deliver(self, batch: EventBatch) -> Delivery:
        if batch.dropped > self._sender_dropped:
            self._gap = True  # the sender dropped events since its last batch: they are gone
            self._sender_dropped = batch.dropped
        self._sender_lost = max(self._sender_lost, batch.lost_batches)
        self.stats.sender_dropped = self._sender_dropped_before + self._sender_dropped
        self.stats.sender_lost_batches = self._sender_lost_before + self._sender_lost
        gap, self._gap = self._gap, False
        restart, self._restart = self._restart, False
        self.stats.batches += 1
        return Delivery(batch, gap and not restart, restart)
