"""Evaluate a whole mirror stream offline, window by window, as the live shadow would, keeping what a report
needs and the live shadow does not: every window's evaluation and every simulated request's latency."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm_shadow.adapters.events import EngineInfo, EngineStep, Event
from vllm_shadow.evaluation.candidates import Candidate, build_candidates
from vllm_shadow.evaluation.costs import engine_prior
from vllm_shadow.evaluation.evaluate import (
    CandidateOutcome,
    Slo,
    candidate_outcome,
    check_fidelity,
    simulate_window,
    solve_window_optimum,
)
from vllm_shadow.evaluation.recommend import Goal, Verdict, recommend
from vllm_shadow.evaluation.results import WindowEvaluation
from vllm_shadow.tracking.engine_state import EngineTracker
from vllm_shadow.tracking.windows import TrafficWindow, WindowRules


@dataclass(slots=True)
class Latencies:
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StreamAnalysis:
    info: EngineInfo
    candidates: list[Candidate]
    windows: list[TrafficWindow]
    evaluations: list[WindowEvaluation]
    latencies: dict[str, Latencies]  # per candidate label, over every window's own requests
    steps: list[EngineStep]  # the engine's own steps, as mirrored
    verdict: Verdict


def analyse(
    events: Sequence[Event],
    *,
    window_seconds: float = 1.0,
    hardware: str = "cpu",
    goal: Goal | None = None,
    optimal_time_limit: float = 2.0,
    optimal_max_requests: int = 40,
) -> StreamAnalysis:
    info = events[0]
    if not isinstance(info, EngineInfo):
        raise ValueError("a mirror stream starts with its engine's announcement (EngineInfo)")
    goal = goal or Goal()
    tracker = EngineTracker(
        info,
        rules=WindowRules(seconds=window_seconds),
        prior=engine_prior(info, hardware)[0],
        clock=time.monotonic,
    )
    for event in events[1:]:
        tracker.apply(event)
    tracker.flush()
    windows = tracker.take_ready()
    candidates = build_candidates(info.scheduler)
    latencies = {c.label: Latencies() for c in candidates}
    evaluations = [
        _evaluate(w, candidates, goal.slo, latencies, optimal_time_limit, optimal_max_requests)
        for w in windows
    ]
    # The live shadow's verdict at the end of the stream: the same recent history, the same rules.
    verdict = recommend(evaluations[-goal.history :], candidates, goal)
    steps = [e for e in events if isinstance(e, EngineStep) and e.scheduled_tokens]
    return StreamAnalysis(info, candidates, windows, evaluations, latencies, steps, verdict)


def _evaluate(
    window: TrafficWindow,
    candidates: list[Candidate],
    slo: Slo,
    latencies: dict[str, Latencies],
    optimal_time_limit: float,
    optimal_max_requests: int,
) -> WindowEvaluation:
    started = time.perf_counter()
    fidelity = check_fidelity(window, slo)
    own = {r.request_id for r in window.arrivals}
    outcomes: list[CandidateOutcome] = []
    for candidate in candidates:
        try:
            result = simulate_window(window, candidate.policy)
        except (
            ValueError,
            RuntimeError,
            AssertionError,
        ) as exc:  # a failing candidate costs no other
            outcomes.append(CandidateOutcome(candidate.label, math.nan, None, error=str(exc)))
            continue
        outcomes.append(candidate_outcome(window, candidate.label, result, slo))
        for record in result.requests:
            if record.request_id in own:
                latencies[candidate.label].ttft.append(record.ttft)
                latencies[candidate.label].tpot.append(record.tpot)
    optimal = solve_window_optimum(window, time_limit=optimal_time_limit, max_requests=optimal_max_requests)
    return WindowEvaluation(
        engine=window.engine,
        index=window.index,
        start_time=window.start_time,
        requests=len(window.arrivals),
        carried=len(window.running) + len(window.waiting),
        engine_steps=len(window.steps),
        actual_gpu_seconds=window.actual_gpu_seconds,
        cost_error=window.cost_error,
        cost_samples=window.cost_samples,
        current=candidates[0].label,
        fidelity=fidelity,
        candidates=tuple(outcomes[1:]),  # outcomes[0] is the current configuration: the self replay's
        optimal=optimal,
        evaluation_seconds=time.perf_counter() - started,
        task_locations=("report",),
    )
