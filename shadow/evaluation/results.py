"""The result of evaluating one window (`WindowEvaluation`): every configuration's outcome side by side, the
measures read from them (`metric_value`), and the relative gaps between them.

Gap of a candidate on a window, per metric: (current - candidate) / current, where "current" is the self
replay of the engine's configuration on the same cost model. Positive means the candidate would have done
better. The optimal gaps are the same with the optimum's lower bounds: the constrained gap (the headline) is the
most any scheduler could have saved while serving every request no later than the engine's configuration (or
within the SLO); the unconstrained gap ignores latency, so it counts savings made by delaying requests without
limit, which no operator would run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm_shadow.solver.records import RequestRecord, _percentile, quantiles
from vllm_shadow.tracking.recompute import RecomputeTax
from vllm_shadow.tracking.windows import EngineKey

METRICS = ("gpu", "ttft_p99", "tpot_p99")
# What the constrained bound holds latency to by default: the engine's own first-token and finish times.
ENGINE_LATENCY = "the engine's configuration (self replay)"


@dataclass(frozen=True, slots=True)
class Slo:
    """Latency targets per request; a request attains the SLO when it meets every target that is set."""

    ttft_seconds: float | None = None
    tpot_seconds: float | None = None

    @property
    def defined(self) -> bool:
        return self.ttft_seconds is not None or self.tpot_seconds is not None

    def met(self, ttft: float, tpot: float) -> bool:
        if self.ttft_seconds is not None and not ttft <= self.ttft_seconds:
            return False
        # A one-token output has no TPOT: nothing to miss.
        return self.tpot_seconds is None or math.isnan(tpot) or tpot <= self.tpot_seconds


NO_SLO = Slo()


@dataclass(frozen=True, slots=True)
class LatencySummary:
    requests: int
    ttft: tuple[float, float, float]  # p50, p90, p99 seconds
    tpot: tuple[float, float, float]
    e2e: tuple[float, float, float]
    slo_attainment: float  # share of requests meeting the SLO; nan without an SLO

    @classmethod
    def of(
        cls, ttft: Sequence[float], tpot: Sequence[float], e2e: Sequence[float], slo: Slo
    ) -> LatencySummary:
        attainment = (
            math.nan
        )  # without an SLO nothing is met or missed (and a window's candidates skip the walk)
        if slo.defined and ttft:
            attainment = sum(slo.met(a, b) for a, b in zip(ttft, tpot, strict=True)) / len(ttft)
        return cls(
            requests=len(e2e),
            ttft=quantiles(ttft),
            tpot=quantiles(tpot),
            e2e=quantiles(e2e),
            slo_attainment=attainment,
        )

    @classmethod
    def of_records(cls, records: Sequence[RequestRecord], slo: Slo) -> LatencySummary:
        """`of` the records' TTFT, TPOT and end-to-end latency (the records' own properties), in one walk: each
        of a window's 20 candidates summarises its requests, and the walks were a third of its outcome's time."""
        ttft, tpot, e2e = [], [], []
        for r in records:
            arrival, first, finish = r.arrival, r.first_token, r.finish
            ttft.append(first - arrival)
            tpot.append((finish - first) / (r.output_tokens - 1) if r.output_tokens > 1 else math.nan)
            e2e.append(finish - arrival)
        attainment = math.nan
        if slo.defined and ttft:
            attainment = _attained(ttft, tpot, slo) / len(ttft)
        return cls(
            requests=len(e2e),
            ttft=_float_quantiles(ttft),
            tpot=_float_quantiles(tpot),
            e2e=_float_quantiles(e2e),
            slo_attainment=attainment,
        )


def _attained(ttft: list[float], tpot: list[float], slo: Slo) -> int:
    """How many requests meet `slo` (`Slo.met` of each, its targets read once)."""
    ttft_target, tpot_target = slo.ttft_seconds, slo.tpot_seconds
    met = 0
    for a, b in zip(ttft, tpot, strict=True):
        if ttft_target is not None and not a <= ttft_target:
            continue
        met += tpot_target is None or b != b or b <= tpot_target  # b != b: a one-token output's nan TPOT
    return met


def _float_quantiles(values: list[float]) -> tuple[float, float, float]:
    """`quantiles` of a list of numbers: the same p50, p90 and p99, NaNs ignored. Whole numbers need no
    conversion: `_percentile` interpolates with a float, so it returns the same float from either."""
    total = sum(values)
    # A NaN makes the sum NaN: most lists have none, and are sorted without a walk to filter them.
    ordered = sorted(values) if total == total else sorted([v for v in values if v == v])
    if not ordered:
        return (math.nan, math.nan, math.nan)
    return _percentile(ordered, 50), _percentile(ordered, 90), _percentile(ordered, 99)


@dataclass(frozen=True, slots=True)
class CandidateOutcome:
    label: str
    gpu_seconds: float  # simulated busy time to serve the window; nan if the simulation failed
    latency: LatencySummary | None
    preemptions: int = 0
    steps: int = 0
    error: str = ""
    # Tokens computed again after recompute preemptions (the simulator's count; requests preempted before the
    # window enter it as the recomputation they owe and are not counted).
    recomputed_tokens: int = 0
    # What that recomputation cost, in simulated busy time: the recompute tax by the engine tracker's own
    # definition (solver.simulator.without_recompute), so that it reads beside the engine's
    # `WindowEvaluation.recompute`.
    recompute_gpu_seconds: float = 0.0
    # vLLM's prefix-cache counters over the window's own requests as simulated: prompt tokens looked up at
    # their first admission, and those found cached (vllm:prefix_cache_queries / vllm:prefix_cache_hits).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # The window's own requests as simulated, when the evaluation is asked to keep them (the report).
    requests: tuple[RequestRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class Fidelity:
    steps_compared: int  # the engine's non-empty steps in the window
    steps_matched: int  # of those, identical in the step-space replay
    first_mismatch: str  # "" when every step matched
    gpu_error_ratio: float  # |replayed - measured| / measured busy time over those steps
    ttft_error_ratio: float  # median per-request relative error of the time replay
    e2e_error_ratio: float
    actual: LatencySummary  # what the engine delivered
    self_replay: CandidateOutcome  # the current configuration replayed in time on the cost model

    @property
    def step_match_ratio(self) -> float:
        return self.steps_matched / self.steps_compared if self.steps_compared else math.nan


@dataclass(frozen=True, slots=True)
class OptimalOutcome:
    method: str  # "cp-sat", or "relaxation" for windows too large to model
    status: str
    bound_gpu_seconds: float  # no schedule (in `scope`) serves the window in less busy time
    best_gpu_seconds: float  # the best schedule found (verified); nan with only a bound
    scope: str
    solve_seconds: float
    # What the bound holds latency to: "none" (unconstrained: it may delay requests without limit), or the
    # source of the per-request deadlines every schedule in its scope meets (`WindowOptimum`).
    latency: str = "none"


@dataclass(frozen=True, slots=True)
class WindowOptimum:
    """What a window's optimal task returns: the bound with latency ignored, and the bound at equal or better
    latency ("the same service, cheaper"), which is the one an operator can act on. `constrained` is None when
    the engine's configuration could not be replayed as a verified schedule to take its deadlines from."""

    unconstrained: OptimalOutcome
    constrained: OptimalOutcome | None


def metric_value(outcome: CandidateOutcome, metric: str) -> float:
    if metric == "gpu":
        return outcome.gpu_seconds
    if outcome.latency is None:
        return math.nan
    if metric == "ttft_p99":
        return outcome.latency.ttft[2]
    if metric == "tpot_p99":
        return outcome.latency.tpot[2]
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def relative_gap(current: float, other: float) -> float:
    return (current - other) / current if current > 0 and not math.isnan(other) else math.nan


@dataclass(frozen=True, slots=True)
class WindowEvaluation:
    engine: EngineKey
    index: int
    start_time: float  # engine clock
    requests: int  # the window's own requests
    carried: int  # requests carried in from before the window
    engine_steps: int
    actual_gpu_seconds: float  # measured busy time while the window was open
    cost_error: float  # the calibrator's relative error when the window opened
    cost_samples: int  # steps the cost model had been calibrated on when the window opened
    current: str  # label of the engine's configuration
    fidelity: Fidelity
    candidates: tuple[CandidateOutcome, ...]  # every other configuration tried
    optimal: OptimalOutcome | None  # the unconstrained bound: latency ignored
    evaluation_seconds: float  # from submission to the last task's result
    task_locations: tuple[str, ...]  # where its tasks ran (Ray node ids)
    # The bound at equal or better latency (see `evaluate.solve_window_optimum`); None without an optimum, or
    # when the engine's configuration gave no verified schedule to take deadlines from.
    constrained: OptimalOutcome | None = None
    # What the engine's recompute preemptions cost in the window's real steps.
    recompute: RecomputeTax = field(default_factory=RecomputeTax)

    def outcomes(self) -> list[CandidateOutcome]:
        return [self.fidelity.self_replay, *self.candidates]

    def outcome(self, label: str) -> CandidateOutcome | None:
        return next((o for o in self.outcomes() if o.label == label), None)

    def gap(self, label: str, metric: str) -> float:
        other = self.outcome(label)
        if other is None:
            return math.nan
        return relative_gap(metric_value(self.fidelity.self_replay, metric), metric_value(other, metric))

    @property
    def optimal_gap(self) -> float:
        """Unconstrained: the share of the self replay's GPU time that no scheduler could have saved beyond,
        however late it served the requests (an upper bound on any configuration's saving on this window)."""
        if self.optimal is None:
            return math.nan
        return relative_gap(self.fidelity.self_replay.gpu_seconds, self.optimal.bound_gpu_seconds)

    @property
    def constrained_gap(self) -> float:
        """The headline: the share of the self replay's GPU time that no scheduler could have saved beyond
        while serving every request at equal or better latency (GPU time saved, the same service)."""
        if self.constrained is None:
            return math.nan
        return relative_gap(self.fidelity.self_replay.gpu_seconds, self.constrained.bound_gpu_seconds)

    def replay_error(self, metric: str) -> float:
        """How far the self replay is from what the engine really did, for `metric` (relative)."""
        f = self.fidelity
        if metric == "gpu":
            return f.gpu_error_ratio
        real = measured_value(f, metric)
        return abs(metric_value(f.self_replay, metric) - real) / real if real > 0 else math.nan


def measured_value(fidelity: Fidelity, metric: str) -> float:
    """What the engine really delivered for a latency `metric` (GPU time is measured per window instead)."""
    latency = fidelity.actual
    if metric == "ttft_p99":
        return latency.ttft[2]
    if metric == "tpot_p99":
        return latency.tpot[2]
    raise ValueError(f"no measured value for {metric!r}")
