"""Turn the calls a vLLM scheduler receives into the schema's event stream (no vLLM import: plain values in).

Stream order is the contract a replay relies on: every `RequestArrival` comes after the `EngineStep` of the
step before the one that could first schedule it, and before that step's own event. So a consumer recovers a
request's arrival step as (the `step` of the last `EngineStep` seen before the arrival) + 1, or 0 if none,
even if some events were dropped. With async scheduling the engine schedules step N+1 before it processes
step N's output, while the step event is only complete (finishes, duration) after the output; arrivals for
N+1 are then held back until step N's event is out.

Clock: `time` fields are wall-clock seconds (the clock vLLM stamps `arrival_time` with), taken as a wall-clock
anchor plus the monotonic clock's advance, so an NTP jump mid-run cannot bend durations or reorder steps.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vllm_shadow.adapters.events import EngineStep, Event, RequestArrival, RequestFinish


@dataclass(slots=True)
class _ScheduledStep:
    step: int
    scheduled_at: float  # monotonic, when schedule() was entered
    scheduled_tokens: dict[str, int]
    preempted: tuple[str, ...]
    resumed: tuple[str, ...]
    kv_blocks_used: int
    cached_tokens: dict[str, int]


class StepMirror:
    """Builds and publishes events from scheduler calls. Single-threaded: the engine loop's thread only."""

    def __init__(
        self,
        publish: Callable[[Event], None],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._publish = publish
        self._monotonic = monotonic
        self._wall_minus_mono = wall() - monotonic()
        self._next_step = 0
        self._published_through = -1  # the last step whose EngineStep is out
        self._held: deque[tuple[int, RequestArrival]] = deque()  # (arrival step, event), in arrival order
        self._in_flight: deque[_ScheduledStep] = deque()  # scheduled, output not yet processed; oldest first
        self._preempted: set[str] = set()  # preempted and not yet scheduled again
        self._finished: list[str] = []  # finished since the last step event
        self._last_output_at = float("-inf")  # monotonic, when the previous step's output was processed

    def wall_time(self, monotonic: float | None = None) -> float:
        return (self._monotonic() if monotonic is None else monotonic) + self._wall_minus_mono

    def schedule_started(self) -> float:
        """Call on entering schedule(); returns the timestamp to hand back to `step_scheduled`."""
        return self._monotonic()

    def arrival(self, event: RequestArrival) -> None:
        step = self._next_step
        if self._published_through == step - 1 and not self._held:
            self._publish(event)
        else:
            self._held.append((step, event))

    def step_scheduled(
        self,
        scheduled_at: float,
        scheduled_tokens: Mapping[str, int],
        preempted: tuple[str, ...],
        kv_blocks_used: int,
        cached_tokens: dict[str, int] | None = None,
    ) -> None:
        """`cached_tokens`: request id -> tokens found in the prefix cache, for the requests this step admitted
        (new or resumed) with a hit."""
        resumed: tuple[str, ...] = ()
        if self._preempted:
            resumed = tuple(r for r in scheduled_tokens if r in self._preempted)
            self._preempted.difference_update(resumed)
        self._preempted.update(preempted)
        self._in_flight.append(
            _ScheduledStep(
                self._next_step,
                scheduled_at,
                dict(scheduled_tokens),
                preempted,
                resumed,
                kv_blocks_used,
                cached_tokens or {},
            )
        )
        self._next_step += 1

    def finished(
        self, request_id: str, output_tokens: int, reason: str, block_hashes: tuple[int, ...] = ()
    ) -> None:
        """A request left the engine (completed or aborted); reported with the next step event. `block_hashes`:
        those of its full blocks past the prompt's (see `RequestFinish.block_hashes`)."""
        self._preempted.discard(request_id)
        self._finished.append(request_id)
        self._publish(RequestFinish(request_id, self.wall_time(), output_tokens, reason, block_hashes))

    def step_completed(self) -> None:
        """Call when update_from_output() has processed the oldest in-flight step."""
        if not self._in_flight:
            return
        now = self._monotonic()
        done = self._in_flight.popleft()
        # The batch starts running when it is scheduled or when the previous batch's output is back, whichever
        # is later: in sync mode that is schedule() -> update_from_output(); with async scheduling step N+1 is
        # scheduled while step N still runs, and measuring from schedule() would count step N twice.
        start = max(done.scheduled_at, self._last_output_at)
        self._last_output_at = now
        finished, self._finished = tuple(self._finished), []
        self._publish(
            EngineStep(
                step=done.step,
                start_time=self.wall_time(start),
                duration=now - start,
                scheduled_tokens=done.scheduled_tokens,
                preempted=done.preempted,
                resumed=done.resumed,
                finished=finished,
                kv_blocks_used=done.kv_blocks_used,
                cached_tokens=done.cached_tokens,
            )
        )
        self._published_through = done.step
        while self._held and self._held[0][0] <= done.step + 1:
            self._publish(self._held.popleft()[1])
