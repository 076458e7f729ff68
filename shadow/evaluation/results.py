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
from dataclasses import dataclass, field

from vllm_shadow.evaluation.evaluate import CandidateOutcome, Fidelity, OptimalOutcome
from vllm_shadow.tracking.recompute import RecomputeTax
from vllm_shadow.tracking.windows import EngineKey

METRICS = ("gpu", "ttft_p99", "tpot_p99")


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
