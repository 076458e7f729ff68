"""Which configuration to recommend, and how sure to be: only a gain that holds across recent windows and
exceeds what the self replay gets wrong.

Per window, a candidate's score is its weighted gain over the self replay: the weights are the user's (GPU
time, p99 TTFT, p99 TPOT). Over the last windows with the engine's current configuration, the recommender
takes each actionable candidate's mean score and its standard error, and recommends the best one (by its
one-sided lower confidence bound) whose mean gain exceeds the self replay's own error on the same weighted
metrics and whose lower bound exceeds a minimum gain, provided the simulator reproduced the engine's steps and
the candidate does not lose SLO attainment. Confidence is high when even the lower bound exceeds the self
replay's error. Otherwise it recommends nothing, and says why.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm_shadow.evaluation.candidates import Candidate, flag_changes
from vllm_shadow.evaluation.results import METRICS, Slo, WindowEvaluation

MIN_CALIBRATION_STEPS = 200  # Goal's default (the CLI's --min-calibration-steps)


@dataclass(frozen=True, slots=True)
class Goal:
    """The user's objective: weights on relative gains, SLOs that must not get worse, and how much evidence a
    recommendation needs."""

    gpu: float = 1.0
    ttft_p99: float = 0.0
    tpot_p99: float = 0.0
    slo: Slo = field(default_factory=Slo)
    slo_tolerance: float = 0.01  # a candidate may lose at most this share of SLO attainment
    min_gain: float = 0.02
    min_windows: int = 3
    history: int = 12  # windows of evidence kept per engine
    z: float = 1.645  # one-sided 95% for the lower confidence bound
    min_step_match: float = 0.95  # the self replay must reproduce at least this share of the engine's steps
    # A mirrored window counts as evidence only if its cost model had been calibrated on this many of the
    # engine's steps: until then it is the roofline prior, whose error says nothing about the configurations.
    min_calibration_steps: int = MIN_CALIBRATION_STEPS

    def __post_init__(self) -> None:
        weights = self.weights()
        if any(w < 0 or math.isnan(w) for w in weights.values()) or not any(weights.values()):
            raise ValueError(f"objective weights must be non-negative and not all zero: {weights}")
        if self.min_windows < 1 or self.history < self.min_windows:
            raise ValueError("need 1 <= min_windows <= history")
        if self.min_calibration_steps < 0:
            raise ValueError(f"min_calibration_steps must be at least 0, not {self.min_calibration_steps}")

    def weights(self) -> dict[str, float]:
        return {"gpu": self.gpu, "ttft_p99": self.ttft_p99, "tpot_p99": self.tpot_p99}

    def describe(self) -> str:
        terms = [f"{w:g}x {m}" if w != 1 else m for m, w in self.weights().items() if w]
        slo = []
        if self.slo.ttft_seconds is not None:
            slo.append(f"TTFT <= {self.slo.ttft_seconds:g}s")
        if self.slo.tpot_seconds is not None:
            slo.append(f"TPOT <= {self.slo.tpot_seconds:g}s")
        return " + ".join(terms) + (f" (SLO {', '.join(slo)})" if slo else "")


def weighted(values: dict[str, float], goal: Goal) -> float:
    weights = goal.weights()
    total = sum(weights.values())
    return sum(w * values[m] for m, w in weights.items() if w) / total


def window_score(evaluation: WindowEvaluation, label: str, goal: Goal) -> float:
    return weighted({m: evaluation.gap(label, m) for m in METRICS}, goal)


def window_error(evaluation: WindowEvaluation, goal: Goal) -> float:
    return weighted({m: evaluation.replay_error(m) for m in METRICS}, goal)


@dataclass(frozen=True, slots=True)
class Evidence:
    """One candidate over the recent windows."""

    label: str
    actionable: bool
    windows: int
    mean_gain: float  # weighted relative gain over the self replay
    stderr: float
    lower_bound: float  # mean_gain - z * stderr
    wins: int  # windows in which it beat the self replay
    slo_attainment: float  # mean over the windows (nan without an SLO)


@dataclass(frozen=True, slots=True)
class Recommendation:
    candidate: str
    flags: tuple[str, ...]  # the vLLM flags to change
    objective: str
    expected_gain: float  # mean weighted relative gain
    gain_stderr: float
    lower_bound: float
    windows: int
    wins: int
    replay_error: float  # the self replay's mean weighted error over the same windows
    step_match: float  # the self replay's mean step match ratio over the same windows
    confidence: str  # "high" or "medium"

    def describe(self) -> str:
        return (
            f"{' '.join(self.flags) or '(no flag change)'}: {self.objective} better by "
            f"{self.expected_gain:.1%} ± {self.gain_stderr:.1%} over {self.windows} windows "
            f"(won {self.wins}; self-replay error {self.replay_error:.1%}; {self.confidence} confidence)"
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    recommendation: Recommendation | None
    reason: str  # why there is (or is not) a recommendation
    evidence: tuple[Evidence, ...]  # candidates ranked by lower bound, best first


def _evidence(candidate: Candidate, history: Sequence[WindowEvaluation], goal: Goal) -> Evidence | None:
    scores, attainment = [], []
    for evaluation in history:
        score = window_score(evaluation, candidate.label, goal)
        if math.isnan(score):
            continue
        scores.append(score)
        outcome = evaluation.outcome(candidate.label)
        if outcome is not None and outcome.latency is not None:
            attainment.append(outcome.latency.slo_attainment)
    if not scores:
        return None
    mean = statistics.fmean(scores)
    stderr = statistics.stdev(scores) / math.sqrt(len(scores)) if len(scores) > 1 else math.inf
    return Evidence(
        candidate.label,
        candidate.actionable,
        len(scores),
        mean,
        stderr,
        mean - goal.z * stderr,
        sum(s > 0 for s in scores),
        _finite_mean(attainment),  # a window with no requests of its own has no attainment: skip it
    )


def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


def recommend(history: Sequence[WindowEvaluation], candidates: Sequence[Candidate], goal: Goal) -> Verdict:
    """`history`: the engine's recent evaluations under its current configuration, oldest first;
    `candidates[0]` is the current configuration."""
    current = candidates[0]
    history = [
        e for e in history if e.cost_samples >= goal.min_calibration_steps or not e.fidelity.steps_compared
    ]
    evidence = [e for c in candidates[1:] if (e := _evidence(c, history, goal)) is not None]
    evidence.sort(key=lambda e: (-e.lower_bound if not math.isnan(e.lower_bound) else math.inf, e.label))
    if len(history) < goal.min_windows:
        return Verdict(
            None,
            f"{len(history)} of {goal.min_windows} windows evaluated with a calibrated cost model so far",
            tuple(evidence),
        )
    error = _finite_mean([window_error(e, goal) for e in history])
    exact = [e.fidelity.step_match_ratio for e in history if e.fidelity.steps_compared]
    step_match = statistics.fmean(exact) if exact else math.nan
    if math.isnan(error):
        return Verdict(
            None, "the self replay's error is unknown (no measured steps or latencies)", tuple(evidence)
        )
    if not step_match >= goal.min_step_match and exact:
        return Verdict(
            None,
            f"the simulator reproduced only {step_match:.1%} of the engine's steps (needs "
            f"{goal.min_step_match:.0%}): its what-ifs are not trusted",
            tuple(evidence),
        )
    baseline_slo = _finite_mean(
        [e.fidelity.self_replay.latency.slo_attainment for e in history if e.fidelity.self_replay.latency]
    )
    for e in evidence:
        if not e.actionable or e.windows < goal.min_windows:
            continue
        if goal.slo.defined and not e.slo_attainment >= baseline_slo - goal.slo_tolerance:
            continue
        if e.lower_bound <= goal.min_gain or e.mean_gain <= error:
            continue
        candidate = next(c for c in candidates if c.label == e.label)
        # The replay's error is a bias that comparisons on one cost model partly cancel; a gain that clears it
        # even at its lower confidence bound is trusted highly.
        confidence = "high" if e.lower_bound > error else "medium"
        return Verdict(
            Recommendation(
                candidate=e.label,
                flags=tuple(flag_changes(current.policy, candidate.policy)),
                objective=goal.describe(),
                expected_gain=e.mean_gain,
                gain_stderr=e.stderr,
                lower_bound=e.lower_bound,
                windows=e.windows,
                wins=e.wins,
                replay_error=error,
                step_match=step_match,
                confidence=confidence,
            ),
            f"gain {e.mean_gain:.1%} (lower bound {e.lower_bound:.1%}) exceeds the self-replay error {error:.1%}",
            tuple(evidence),
        )
    best = next((e for e in evidence if e.actionable), None)
    if best is None:
        return Verdict(None, "no actionable candidate was evaluated", tuple(evidence))
    return Verdict(
        None,
        f"best actionable candidate {best.label}: gain {best.mean_gain:.1%} (lower bound {best.lower_bound:.1%}) "
        f"does not clear the self-replay error {error:.1%} (mean) and the minimum gain {goal.min_gain:.0%} "
        "(lower bound)",
        tuple(evidence),
    )
