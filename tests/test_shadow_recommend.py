"""Recommendations: only a gain that holds across windows, beats the self replay's error, and is actionable."""

from __future__ import annotations

import math

import pytest

from vllm_shadow.adapters.events import SchedulerSettings
from vllm_shadow.evaluation.candidates import build_candidates
from vllm_shadow.evaluation.evaluate import CandidateOutcome, Fidelity, LatencySummary, Slo
from vllm_shadow.evaluation.recommend import Goal, recommend
from vllm_shadow.evaluation.results import WindowEvaluation
from vllm_shadow.tracking.windows import EngineKey

SETTINGS = SchedulerSettings(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=2048)
CANDIDATES = build_candidates(SETTINGS)
CURRENT = CANDIDATES[0].label
BIGGER = "vllm(max_num_seqs=16,max_num_batched_tokens=1024)"
SARATHI = "sarathi(max_num_seqs=8)"
NAN3 = (math.nan, math.nan, math.nan)


def latency(ttft_p99: float = 1.0, slo: float = math.nan) -> LatencySummary:
    return LatencySummary(10, (0.1, 0.5, ttft_p99), (0.01, 0.02, 0.03), NAN3, slo)


def evaluation(
    gpu: dict[str, float],
    *,
    gpu_error: float = 0.02,
    matched: int = 100,
    samples: int = 1000,
    slo: dict[str, float] | None = None,
) -> WindowEvaluation:
    slo = slo or {}
    outcomes = {
        label: CandidateOutcome(label, seconds, latency(slo=slo.get(label, math.nan)))
        for label, seconds in gpu.items()
    }
    fidelity = Fidelity(100, matched, "", gpu_error, 0.05, 0.05, latency(), outcomes.pop(CURRENT))
    return WindowEvaluation(
        EngineKey("m", "0"), 0, 0.0, 10, 2, 100, 1.0, 0.03, samples, CURRENT, fidelity,
        tuple(outcomes.values()), None, 0.1, ("here",),
    )  # fmt: skip


def windows(gains: list[float], label: str = BIGGER, **kwargs) -> list[WindowEvaluation]:
    return [evaluation({CURRENT: 10.0, label: 10.0 * (1 - g)}, **kwargs) for g in gains]


def test_a_consistent_gain_above_the_replay_error_is_recommended_with_its_flags() -> None:
    verdict = recommend(windows([0.30, 0.28, 0.33, 0.31]), CANDIDATES, Goal())
    r = verdict.recommendation
    assert r is not None and r.candidate == BIGGER
    assert r.flags == ("--max-num-seqs 16", "--max-num-batched-tokens 1024")
    assert r.expected_gain == pytest.approx(0.305) and r.windows == 4 and r.wins == 4
    assert r.confidence == "high" and r.replay_error == pytest.approx(0.02)


def test_too_few_windows_recommend_nothing() -> None:
    verdict = recommend(windows([0.3, 0.3]), CANDIDATES, Goal(min_windows=3))
    assert verdict.recommendation is None and "2 of 3 windows" in verdict.reason


def test_a_gain_within_the_replay_error_is_not_recommended() -> None:
    verdict = recommend(windows([0.10, 0.11, 0.09, 0.10], gpu_error=0.15), CANDIDATES, Goal())
    assert verdict.recommendation is None and "self-replay error 15.0%" in verdict.reason


def test_a_gain_that_does_not_hold_across_windows_is_not_recommended() -> None:
    verdict = recommend(windows([0.5, -0.4, 0.45, -0.35]), CANDIDATES, Goal())
    assert verdict.recommendation is None
    assert verdict.evidence[0].label == BIGGER and verdict.evidence[0].lower_bound < 0


def test_a_gain_above_the_error_only_on_average_is_medium_confidence() -> None:
    verdict = recommend(windows([0.20, 0.10, 0.18, 0.12], gpu_error=0.12), CANDIDATES, Goal())
    assert verdict.recommendation is not None and verdict.recommendation.confidence == "medium"


def test_other_schedulers_are_evidence_but_never_recommended() -> None:
    verdict = recommend(windows([0.4, 0.4, 0.4], label=SARATHI), CANDIDATES, Goal())
    assert verdict.recommendation is None and verdict.evidence[0].label == SARATHI
    assert not verdict.evidence[0].actionable


def test_an_unfaithful_self_replay_blocks_every_recommendation() -> None:
    verdict = recommend(windows([0.3, 0.3, 0.3], matched=80), CANDIDATES, Goal())
    assert verdict.recommendation is None and "reproduced only 80.0%" in verdict.reason


def test_windows_evaluated_on_the_uncalibrated_prior_are_not_evidence() -> None:
    history = windows([0.9, 0.9], samples=10) + windows([0.3, 0.3, 0.3])
    r = recommend(history, CANDIDATES, Goal()).recommendation
    assert r is not None and r.windows == 3 and r.expected_gain == pytest.approx(0.3)


def test_a_candidate_that_loses_slo_attainment_is_passed_over() -> None:
    goal = Goal(slo=Slo(ttft_seconds=1.0))
    losing = [evaluation({CURRENT: 10.0, BIGGER: 6.0}, slo={CURRENT: 0.99, BIGGER: 0.80}) for _ in range(3)]
    assert recommend(losing, CANDIDATES, goal).recommendation is None
    keeping = [evaluation({CURRENT: 10.0, BIGGER: 6.0}, slo={CURRENT: 0.99, BIGGER: 0.99}) for _ in range(3)]
    assert recommend(keeping, CANDIDATES, goal).recommendation is not None


def test_weights_mix_objectives() -> None:
    goal = Goal(gpu=1.0, ttft_p99=1.0)
    assert goal.describe() == "gpu + ttft_p99"
    # GPU 30% better, p99 TTFT the same: the weighted gain is 15%.
    r = recommend(windows([0.3, 0.3, 0.3]), CANDIDATES, goal).recommendation
    assert r is not None and r.expected_gain == pytest.approx(0.15)
    with pytest.raises(ValueError):
        Goal(gpu=0.0)
