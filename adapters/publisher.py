"""Hand events from a producer that must never wait (the vLLM engine loop) to sinks that may be slow or dead.

The producer only appends to a bounded deque: no lock, no wake-up, no I/O on its path. A daemon thread drains
the deque every `flush_interval` seconds into `EventBatch`es and hands each batch to every sink. A sink that
raises is put in exponential back-off and misses the batches sent meanwhile; every event that does not reach a
sink is counted, on the producer side (queue full) or per sink (failed or skipped): loss is never silent.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vllm_shadow.adapters.events import Event

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EventBatch:
    """The unit every transport carries: events in the order the engine produced them, plus who sent them."""

    events: list[Event]
    source: str = ""  # which engine sent it (host:pid by default); a shadow may watch several engines
    sequence: int = 0  # 0, 1, 2, ... per source: a gap means batches were lost in transit
    dropped: int = 0  # events the sender has dropped so far (cumulative), so the receiver can export the loss
    # A random number the publisher draws when it starts (0: not given): a restarted engine under the same source
    # name (same host and pid) is told from a late batch of the old one, since both number their batches from 0.
    incarnation: int = 0
    part: int = 0  # a batch too large for one message travels as parts 0 .. parts-1 under its sequence number
    parts: int = 1
    # Batches this sink could not deliver so far (cumulative: failed, or skipped while backing off), so that
    # a shadow that was down can export what it missed, which its own gap count cannot see.
    lost_batches: int = 0


BatchSink = Callable[[EventBatch], None]


@dataclass(slots=True)
class SinkStats:
    sent_batches: int = 0
    sent_events: int = 0
    failures: int = 0
    lost_batches: int = 0  # that failed, or that were skipped while the sink was backing off
    lost_events: int = 0  # in those batches


@dataclass(slots=True)
class _SinkState:
    sink: BatchSink
    stats: SinkStats = field(default_factory=SinkStats)
    backoff: float = 0.0
    retry_at: float = 0.0


def default_source() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Publisher:
    """Bounded, non-blocking event publisher with a background delivery thread."""

    def __init__(
        self,
        sinks: Sequence[BatchSink],
        *,
        capacity: int = 100_000,
        batch_size: int = 1024,
        flush_interval: float = 0.02,
        max_backoff: float = 5.0,
        source: str | None = None,
    ) -> None:
        if capacity <= 0 or batch_size <= 0 or flush_interval <= 0:
            raise ValueError("capacity, batch_size and flush_interval must be positive")
        self._queue: deque[Event] = deque()
        self._capacity = capacity
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_backoff = max_backoff
        self._sinks = [_SinkState(s) for s in sinks]
        self.source = source or default_source()
        self.incarnation = secrets.randbits(64) or 1  # 0 means "not given" on the wire
        self._sequence = itertools.count()
        self.accepted = 0
        self.dropped = 0
        self.undelivered_at_close = 0  # events still queued or in a sink's hands when close() gave up
        self._in_flight = 0  # events of the batch being handed to the sinks now
        self._close_deadline: float | None = None  # monotonic; set by close(): drain no longer than this
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadow-publisher", daemon=True)
        self._thread.start()

    def publish(self, event: Event) -> None:
        """Never blocks, never raises. Called from a single producer thread (the engine loop)."""
        # len() and append() are each atomic under the GIL and there is one producer, so the bound holds; the
        # consumer's concurrent pops only make room.
        if len(self._queue) >= self._capacity:
            self.dropped += 1
            return
        self._queue.append(event)
        self.accepted += 1

    @property
    def pending(self) -> int:
        return len(self._queue)

    def sink_stats(self) -> list[SinkStats]:
        return [s.stats for s in self._sinks]

    def close(self, timeout: float = 2.0) -> None:
        """Deliver what is queued within `timeout`, then close the sinks; count and log what was not delivered.

        The engine calls this on shutdown: it waits `timeout` at most, for the delivery thread and then for
        sinks whose `close` takes a `timeout` (given what is left of it; closing a gRPC channel cancels its
        calls at once). A sink that never answers
        (a black-holed shadow) holds the delivery thread in one call; the events queued behind it and the
        batch in its hands are then `undelivered_at_close`, logged once.
        """
        started = time.monotonic()
        self._close_deadline = started + timeout
        self._stop.set()
        self._thread.join(timeout)
        in_flight = self._in_flight if self._thread.is_alive() else 0
        queued = 0
        try:
            while True:  # the thread stops draining at the deadline; what is left is lost
                self._queue.popleft()
                queued += 1
        except IndexError:
            pass
        self.undelivered_at_close = queued + in_flight
        if self.undelivered_at_close:
            logger.warning(
                "shadow publisher closed with %d events undelivered (%d queued, %d in a sink's hands) after "
                "%.2fs: the shadow did not take them in time",
                self.undelivered_at_close,
                queued,
                in_flight,
                time.monotonic() - started,
            )
        for state in self._sinks:
            close = getattr(state.sink, "close", None)
            if close is not None:
                try:
                    if (
                        "timeout" in inspect.signature(close).parameters
                    ):  # a sink that waits: within the bound
                        close(timeout=max(0.0, self._close_deadline - time.monotonic()))
                    else:
                        close()
                except Exception:  # closing is best effort; the engine is shutting down
                    logger.warning("closing shadow sink %r failed", state.sink, exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self._flush_interval):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        while self._queue:
            if self._close_deadline is not None and time.monotonic() >= self._close_deadline:
                return  # close() counts what is left
            events = []
            popleft = self._queue.popleft
            try:
                for _ in range(self._batch_size):
                    events.append(popleft())
            except IndexError:
                pass
            batch = EventBatch(
                events, self.source, next(self._sequence), self.dropped, incarnation=self.incarnation
            )
            self._in_flight = len(events)
            for state in self._sinks:
                self._deliver(state, batch)
            self._in_flight = 0

    def _deliver(self, state: _SinkState, batch: EventBatch) -> None:
        now = time.monotonic()
        if now < state.retry_at:
            state.stats.lost_batches += 1
            state.stats.lost_events += len(batch.events)
            return
        try:
            # Each sink has its own losses: the shadow behind it learns of those it was down for.
            state.sink(dataclasses.replace(batch, lost_batches=state.stats.lost_batches))
        except Exception as exc:  # a sink is outside code: any failure must stay here, in this thread
            state.stats.failures += 1
            state.stats.lost_batches += 1
            state.stats.lost_events += len(batch.events)
            doubled = state.backoff * 2 if state.backoff else self._flush_interval
            state.backoff = min(self._max_backoff, doubled)
            state.retry_at = now + state.backoff
            if state.stats.failures == 1 or state.backoff == self._max_backoff:
                first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                logger.warning(
                    "shadow sink %r failed (%s: %s); back-off %.2fs",
                    state.sink,
                    type(exc).__name__,
                    first_line,
                    state.backoff,
                )
            return
        state.backoff = 0.0
        state.stats.sent_batches += 1
        state.stats.sent_events += len(batch.events)
