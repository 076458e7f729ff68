"""Windows for sources that report each request only once it has finished: OTLP spans, the stat-logger plugin.

Such a source says when a request arrived, how long its prompt and output were and when it finished; nothing
about steps, batches, preemptions or what the engine held. Windows are cut on the arrival clock, and a window
is evaluated once the latest finish seen is `lateness_seconds` past its end, since a long request is reported
long after it arrived. A request reported later than that is counted as late and left out. The engine state
at a window start is unknown, so a window starts from an empty engine, and the cost model stays at its prior
(no step times to calibrate on): the self replay's latency error says how much that costs.
"""

from __future__ import annotations

import math
from typing import Any

from vllm_shadow.adapters.events import EngineInfo, Event, RequestArrival, RequestFinish
from vllm_shadow.solver.records import RequestRecord
from vllm_shadow.tracking.reasons import SkipReason
from vllm_shadow.tracking.tracker import WindowTracker
from vllm_shadow.tracking.windows import TrafficWindow

DEFAULT_SECONDS = 10.0  # when the rules only count requests: arrival order is unknown until finishes arrive


class RequestOnlyTracker(WindowTracker):
    """Not thread-safe: the owner serialises calls. Its calibrator is never updated: there are no step times."""

    def __init__(self, info: EngineInfo, **settings: Any) -> None:  # settings: WindowTracker's
        super().__init__(info, **settings)
        self._seconds = self.rules.seconds or DEFAULT_SECONDS
        self._arrivals: dict[str, RequestArrival] = {}  # reported, finish not yet seen
        self._done: list[tuple[RequestArrival, float]] = []  # (arrival, finish time), not yet in a window
        self._origin = math.nan  # start of window 0 on the arrival clock
        self._emitted_until = -math.inf  # arrivals before this were already evaluated
        self._watermark = -math.inf  # latest finish time seen

    @property
    def live_requests(self) -> int:
        return len(self._arrivals)

    @property
    def pending_windows(self) -> int:
        return 1 if self._done else 0

    def apply(self, event: Event) -> None:
        self.last_event_at = self._clock()
        if isinstance(event, RequestArrival):
            self.stats.events["arrival"] += 1
            if len(self._arrivals) + len(self._done) >= self.limits.max_live_requests:
                self.stats.requests_rejected += 1
                return
            self._arrivals.setdefault(event.request_id, event)
            self.stats.requests_arrived += 1
        elif isinstance(event, RequestFinish):
            self.stats.events["finish"] += 1
            arrival = self._arrivals.pop(event.request_id, None)
            if arrival is None:
                self.stats.unknown_requests += 1
                return
            self.stats.requests_finished += 1
            if arrival.time < self._emitted_until:
                self.stats.late_requests += 1
                return
            output = event.output_tokens or arrival.output_tokens or 0
            if output < 1:
                return  # aborted before its first token: it cost the engine nothing we can model
            self._done.append(
                (
                    RequestArrival(
                        arrival.request_id,
                        arrival.time,
                        arrival.prompt_tokens,
                        output,
                        arrival.max_tokens,
                        arrival.priority,
                    ),
                    event.time,
                )
            )
            self._watermark = max(self._watermark, event.time)
            if math.isnan(self._origin):
                self._origin = arrival.time
            self._release(self._watermark - self.rules.lateness_seconds)
        else:
            self.stats.events["step" if not isinstance(event, EngineInfo) else "info"] += 1

    def _release(self, until: float) -> None:
        """Evaluate every window that ends at or before `until` on the arrival clock."""
        while self._done:
            first = min(a.time for a, _ in self._done)
            start = self._origin + math.floor((first - self._origin) / self._seconds) * self._seconds
            end = start + self._seconds
            if end > until:
                return
            inside = sorted((d for d in self._done if d[0].time < end), key=lambda d: d[0].time)
            self._done = [d for d in self._done if d[0].time >= end]
            self._emitted_until = end
            self._ready.append(self._build(inside, start))
            self.stats.windows_closed += 1
            self.stats.windows_ready += 1

    def _build(self, done: list[tuple[RequestArrival, float]], t0: float) -> TrafficWindow:
        arrivals = tuple(
            RequestArrival(
                a.request_id, a.time - t0, a.prompt_tokens, a.output_tokens, a.max_tokens, a.priority
            )
            for a, _ in done
        )
        observed = {  # no first token: a request-only source does not say when it came
            a.request_id: RequestRecord(
                a.request_id,
                a.time - t0,
                a.prompt_tokens,
                a.output_tokens or 1,
                a.priority,
                finish=finish - t0,
            )
            for a, finish in done
        }
        window = TrafficWindow(
            engine=self.key,
            index=self._next_index,
            info=self.info,
            start_time=t0,
            running=(),
            waiting=(),
            arrivals=arrivals,
            arrival_steps=None,
            steps=(),
            observed=observed,
            cost=self.prior,
            cost_error=math.nan,
            cost_samples=0,
        )
        self._next_index += 1
        return window

    def lost_events(self) -> None:
        if self._done:  # the windows being filled now are missing requests we will never see
            self.stats.windows_skipped[SkipReason.LOST_EVENTS] += 1
            self._emitted_until = max(a.time for a, _ in self._done)
            self._done = []

    def close_idle(self) -> None:
        if self._done and self._clock() - self.last_event_at >= self.rules.idle_seconds:
            self.flush()

    def flush(self) -> None:
        self._release(math.inf)

    def expire(self) -> None:
        """Arrivals whose finish never came (request-only sources report both at once: this is loss)."""
        deadline = self._watermark - self.limits.request_stall_seconds
        stale = [r for r, a in self._arrivals.items() if a.time < deadline]
        for request_id in stale:
            del self._arrivals[request_id]
        self.stats.requests_timed_out += len(stale)

    def abandon(self, reason: SkipReason = SkipReason.ENGINE_RESTART) -> None:
        self.stats.requests_abandoned += len(self._arrivals)
        self._arrivals.clear()
        if self._done:
            self.stats.windows_skipped[reason] += 1
            self._done = []
