"""What the shadow evaluates: a window of one engine's traffic, self-contained, and the rules that cut it.

A window starts at a step boundary of the engine. It holds the engine state at that boundary (the running
requests with the KV they hold and the tokens they have emitted, in running-queue order; the waiting queue in
order), the requests that arrived while it was open, the engine's real steps while it was open, and what the
engine really did for its own requests (latencies). It is evaluated once every request in it has finished, so
output lengths are known (the optimum is an oracle bound, as in INFERMAX). Times are seconds relative to the
window start, so the simulator works with small numbers whatever the engine's clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from vllm_shadow.adapters.events import EngineInfo, EngineStep, RequestArrival
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.records import RequestRecord
from vllm_shadow.solver.simulator import RunningRequest
from vllm_shadow.tracking.prefix_cache import FreeQueueEntry
from vllm_shadow.tracking.recompute import RecomputeTax


@dataclass(frozen=True, slots=True, order=True)
class EngineKey:
    """An engine as vLLM labels its own metrics: the served model and the engine index."""

    model_name: str
    engine: str

    def __str__(self) -> str:
        return f"{self.model_name}[{self.engine}]"

    @classmethod
    def of(cls, info: EngineInfo) -> EngineKey:
        return cls(info.model, info.engine)


@dataclass(frozen=True, slots=True)
class WindowRules:
    """When a window closes. Both limits may be set; whichever comes first closes it."""

    seconds: float | None = 10.0  # engine clock elapsed since the window's first step
    requests: int | None = None  # requests that arrived in the window
    max_requests: int = 2000  # hard bound on carried-in plus arriving requests, whatever the rules above
    idle_seconds: float = 2.0  # close a non-empty window once the engine has been silent this long
    lateness_seconds: float = 60.0  # request-only sources: how long after a window's end a request may arrive

    def __post_init__(self) -> None:
        if self.seconds is None and self.requests is None:
            raise ValueError("a window needs a time limit (seconds) or a request count (requests)")
        if (self.seconds is not None and self.seconds <= 0) or (
            self.requests is not None and self.requests < 1
        ):
            raise ValueError(f"window limits must be positive: {self}")
        if self.max_requests < 1 or self.idle_seconds <= 0 or self.lateness_seconds < 0:
            raise ValueError(f"window bounds must be positive: {self}")

    def full(self, elapsed: float, arrived: int, carried: int) -> bool:
        return (
            (self.seconds is not None and elapsed >= self.seconds)
            or (self.requests is not None and arrived >= self.requests)
            or arrived + carried >= self.max_requests
        )

    def arrivals_to_full(self, carried: int) -> int:
        """The arrivals at which a window that carried `carried` requests in is full whatever its time:
        `full(elapsed, arrived, carried)` is `(seconds is not None and elapsed >= seconds) or arrived >=
        arrivals_to_full(carried)`. The engine tracker tests that once per step instead of calling `full`."""
        limit = self.max_requests - carried
        return self.requests if self.requests is not None and self.requests < limit else limit


@dataclass(frozen=True, slots=True)
class TrafficWindow:
    engine: EngineKey
    index: int  # 0, 1, 2, ... per engine (restarts included)
    info: EngineInfo  # the engine's settings while the window was open
    start_time: float  # the engine's clock at the window start; every time below is relative to it
    running: tuple[RunningRequest, ...]  # carried in, in running-queue order
    # Carried in, waiting, in queue order. A preempted request comes back as the recomputation it will do: its
    # prompt plus what it had emitted, and what it has left to emit (vLLM recomputes exactly that).
    waiting: tuple[RequestArrival, ...]
    arrivals: tuple[RequestArrival, ...]  # the window's own requests, in arrival order
    # Own request -> non-empty engine steps run in the window before it arrived; None for sources without steps.
    arrival_steps: Mapping[str, int] | None
    steps: tuple[EngineStep, ...]  # the engine's real non-empty steps while the window was open
    # Own requests as the engine really served them, in the simulator's record: its first token and finish
    # (first_token is nan for request-only sources, which do not say; preemptions are not counted here).
    observed: Mapping[str, RequestRecord]
    cost: LinearCostModel  # the calibrated cost model when the window opened: never fitted on its own steps
    cost_error: float  # the calibrator's running relative error then (nan before any measurement)
    cost_samples: int  # engine steps the cost model had been calibrated on then
    approximations: int = 0  # requests whose modelling is approximate (aborted before their first token)
    # The recompute tax the engine paid in `steps` (mirror sources; zero for request-only ones).
    recompute: RecomputeTax = field(default_factory=RecomputeTax)
    # With prefix caching on, the engine's cached blocks nobody held at the start, in vLLM's eviction order
    # (`vllm_shadow.tracking.prefix_cache`); the blocks of `running` follow from their hashes.
    free_queue: tuple[FreeQueueEntry, ...] = ()

    @property
    def exact(self) -> bool:
        """True when the engine state and every step are known (a mirror source): a step-space replay applies."""
        return self.arrival_steps is not None

    @property
    def actual_gpu_seconds(self) -> float:
        """The engine's measured busy time while the window was open."""
        return math.fsum(s.duration for s in self.steps)

    @property
    def num_requests(self) -> int:
        return len(self.running) + len(self.waiting) + len(self.arrivals)
