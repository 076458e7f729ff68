"""What every tracker is to the core: one engine's events in, its ready windows out.

Two sources feed a tracker: the mirror hook (every step: `EngineTracker`) and request-only reporters (OTLP spans,
the stat-logger plugin: `RequestOnlyTracker`). The core drives both through this one interface, and both keep
the same counters under the same limits.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vllm_shadow.adapters.events import EngineInfo, Event
from vllm_shadow.costmodel.linear import LinearCostModel, OnlineCalibrator
from vllm_shadow.tracking.reasons import SkipReason
from vllm_shadow.tracking.windows import EngineKey, TrafficWindow, WindowRules


@dataclass(frozen=True, slots=True)
class TrackerLimits:
    max_live_requests: int = 100_000  # requests held (live, or finished but still needed by a window)
    max_pending_windows: int = 32  # closed windows waiting for their requests to finish
    # Engine-clock time a RUNNING request may go unscheduled before it is given up. vLLM schedules its running
    # requests every step unless the budget runs out, so this only catches a stream that lost the request's
    # end. Waiting requests have no such limit: under overload they may wait for minutes, and a dead engine is
    # caught by engine_silence_seconds.
    request_stall_seconds: float = 300.0
    engine_silence_seconds: float = 120.0  # shadow clock without events before live state is dropped
    # Steps fed to the online calibrator per second of engine time: each update refits the model (~0.2 ms),
    # and an engine runs 10-100 steps a second; 20 a second is 1,200 measurements a minute.
    calibration_steps_per_second: float = 20.0


DEFAULT_LIMITS = TrackerLimits()


@dataclass(slots=True)
class TrackerStats:
    events: Counter[str] = field(default_factory=Counter)  # by kind: arrival, finish, step, info
    steps: int = 0  # non-empty steps
    empty_steps: int = 0
    actual_gpu_seconds: float = 0.0  # sum of measured non-empty step durations
    requests_arrived: int = 0
    requests_finished: int = 0
    requests_timed_out: int = 0  # running, unscheduled for request_stall_seconds
    requests_abandoned: int = 0  # live when the engine went silent or restarted
    requests_rejected: int = 0  # arrivals beyond max_live_requests
    unknown_requests: int = 0  # ids in steps or finishes that never arrived (their arrival was lost)
    late_requests: int = 0  # request-only sources: reported after their window was evaluated
    inconsistencies: int = 0  # a finish whose output count disagrees with the tokens the steps emitted
    approximations: int = 0  # requests modelled approximately in an evaluated window
    windows_closed: int = 0
    windows_ready: int = 0
    windows_skipped: Counter[str] = field(default_factory=Counter)
    last_step_end: float = math.nan  # engine clock


class WindowTracker(ABC):
    """One engine's tracker. Not thread-safe: the owner serialises calls."""

    def __init__(
        self,
        info: EngineInfo,
        *,
        rules: WindowRules,
        prior: LinearCostModel,
        limits: TrackerLimits = DEFAULT_LIMITS,
        first_index: int = 0,
        clock: Callable[[], float],
    ) -> None:
        self.info = info
        self.key = EngineKey.of(info)
        self.rules = rules
        self.limits = limits
        self.stats = TrackerStats()
        self.prior = prior  # the cost model before calibration
        self.calibrator = OnlineCalibrator(prior)
        self._clock = clock  # the shadow's clock: silence and idleness are measured on it
        self._ready: list[TrafficWindow] = []
        self._next_index = first_index
        self.last_event_at = clock()

    @property
    def next_index(self) -> int:
        """The index the next window will get (a successor tracker continues from it)."""
        return self._next_index

    def take_ready(self) -> list[TrafficWindow]:
        """The windows ready to evaluate since the last call."""
        ready, self._ready = self._ready, []
        return ready

    @property
    @abstractmethod
    def live_requests(self) -> int:
        """Requests the engine holds now, as far as the tracker knows."""

    @property
    @abstractmethod
    def pending_windows(self) -> int:
        """Windows cut but not yet ready."""

    @abstractmethod
    def apply(self, event: Event) -> None:
        """Apply one event, in stream order."""

    def apply_run(self, events: Sequence[Event], start: int) -> int:
        """Apply `events[start:]` in order up to the first `EngineInfo`, which is the caller's (an announcement
        may be a restart); returns its index, or len(events)."""
        for index in range(start, len(events)):
            event = events[index]
            if isinstance(event, EngineInfo):
                return index
            self.apply(event)
        return len(events)

    @abstractmethod
    def lost_events(self) -> None:
        """Events were lost just before the next one."""

    @abstractmethod
    def close_idle(self) -> None:
        """Close what waits on an engine that has gone quiet for the rules' idle time."""

    @abstractmethod
    def flush(self) -> None:
        """Close the open window now (the end of a run)."""

    @abstractmethod
    def expire(self) -> None:
        """Give up on requests and state that the stream will never complete."""

    @abstractmethod
    def abandon(self, reason: SkipReason = SkipReason.ENGINE_RESTART) -> None:
        """The engine is gone: count what it held and drop what waits on it."""
