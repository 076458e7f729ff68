"""Evaluate a whole mirror stream offline, window by window, as the live shadow would, keeping what a report
needs and the live shadow does not: every window's evaluation and every simulated request's latency."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_shadow.adapters.events import EngineInfo, EngineStep, Event
from vllm_shadow.evaluation.candidates import Candidate, build_candidates
from vllm_shadow.evaluation.costs import engine_prior
from vllm_shadow.evaluation.recommend import Goal, Verdict, recommend
from vllm_shadow.evaluation.results import WindowEvaluation
from vllm_shadow.evaluation.window import EvaluationSettings, evaluate_window
from vllm_shadow.solver.records import RequestRecord
from vllm_shadow.tracking.engine_state import EngineTracker
from vllm_shadow.tracking.windows import TrafficWindow, WindowRules


@dataclass(frozen=True, slots=True)
class StreamAnalysis:
    info: EngineInfo
    candidates: list[Candidate]
    windows: list[TrafficWindow]
    evaluations: list[WindowEvaluation]
    # Per candidate label, every window's own requests as that configuration served them in simulation.
    simulated_requests: dict[str, list[RequestRecord]]
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
    settings = EvaluationSettings(
        candidate_tasks=1,
        optimal_time_limit=optimal_time_limit,
        optimal_max_requests=optimal_max_requests,
        keep_requests=True,
    )
    evaluations = [evaluate_window(w, candidates, settings, goal.slo) for w in windows]
    simulated_requests: dict[str, list[RequestRecord]] = {c.label: [] for c in candidates}
    for evaluation in evaluations:
        for outcome in evaluation.outcomes():
            simulated_requests[outcome.label].extend(outcome.requests)
    # The live shadow's verdict at the end of the stream: the same recent history, the same rules.
    verdict = recommend(evaluations[-goal.history :], candidates, goal)
    steps = [e for e in events if isinstance(e, EngineStep) and e.scheduled_tokens]
    return StreamAnalysis(info, candidates, windows, evaluations, simulated_requests, steps, verdict)
