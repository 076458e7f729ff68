"""Put each sender's event batches back in order, and account for every batch that never arrives.

A publisher numbers its batches 0, 1, 2, ... (`EventBatch.sequence`). Transports may reorder them (a threaded
Ray actor runs calls concurrently; gRPC serves them on a thread pool), and may lose them (a sender backing off,
a shadow restart). A `Sequencer` holds early batches until the gap before them fills, up to a bound in batches
and in time; then it gives the missing numbers up as lost and delivers what it holds. A batch that turns up
after its number was given up on is late: dropped and counted, because the stream after it has already been
applied. Every delivery says whether events were lost just before it, so the consumer can stop trusting the
engine state it tracks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from vllm_shadow.adapters.publisher import EventBatch


@dataclass(slots=True)
class SequenceStats:
    batches: int = 0  # delivered in order
    lost_batches: int = 0  # sequence numbers given up on
    late_batches: int = 0  # arrived after their number was given up on, or twice
    late_events: int = 0
    sender_dropped: int = 0  # the sender's own cumulative count of events it could not queue


@dataclass(frozen=True, slots=True)
class Delivery:
    batch: EventBatch
    gap_before: bool  # events were lost between the previous delivery and this one


class Sequencer:
    """Per-source reorder buffer. Not thread-safe: the caller serialises `push` and `expire`."""

    def __init__(
        self, *, max_held: int = 64, max_wait: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        # Until the sender's batch 0 is seen, or the wait for it is given up, the stream has no start:
        # batches are held, since under reordering the first to arrive need not be the first sent.
        if max_held < 1 or max_wait <= 0:
            raise ValueError("max_held must be >= 1 and max_wait > 0")
        self._max_held = max_held
        self._max_wait = max_wait
        self._clock = clock
        self._expected: int | None = None  # next sequence number to deliver; None until the start is known
        self._held: dict[int, tuple[EventBatch, float]] = {}  # sequence -> (batch, when it arrived)
        self._gap = False  # a loss is pending report with the next delivery
        self.stats = SequenceStats()

    @property
    def held(self) -> int:
        return len(self._held)

    def push(self, batch: EventBatch) -> list[Delivery]:
        if self._expected is None and batch.sequence == 0:
            self._expected = 0  # the sender's first batch: the stream starts here, nothing missed
        if (self._expected is not None and batch.sequence < self._expected) or batch.sequence in self._held:
            self.stats.late_batches += 1
            self.stats.late_events += len(batch.events)
            return []
        self._held[batch.sequence] = (batch, self._clock())
        out = self._release()
        if len(self._held) > self._max_held:
            out += self._give_up()
        return out

    def expire(self) -> list[Delivery]:
        """Give up on a gap whose oldest held batch has waited longer than `max_wait`."""
        if self._held and self._clock() - min(t for _, t in self._held.values()) > self._max_wait:
            return self._give_up()
        return []

    def _release(self) -> list[Delivery]:
        out = []
        while self._expected is not None and self._expected in self._held:
            batch, _ = self._held.pop(self._expected)
            self._expected += 1
            out.append(self._deliver(batch))
        return out

    def _give_up(self) -> list[Delivery]:
        first_held = min(self._held)
        if self._expected is not None:
            self.stats.lost_batches += first_held - self._expected
        # Joining a stream mid-way (a shadow started after the engine, or restarted) is a loss too: what came
        # before is unknown, but not counted, since nobody knows how many batches that was.
        self._expected = first_held
        self._gap = True
        return self._release()

    def _deliver(self, batch: EventBatch) -> Delivery:
        if batch.dropped > self.stats.sender_dropped:
            self._gap = True  # the sender dropped events since its last batch: they are gone
            self.stats.sender_dropped = batch.dropped
        gap, self._gap = self._gap, False
        self.stats.batches += 1
        return Delivery(batch, gap)
