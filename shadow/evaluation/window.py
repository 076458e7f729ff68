"""Evaluating one window: the independent tasks it fans out to, and their results put together.

A window's evaluation is a few independent tasks (the self replay, chunks of candidates, the optimum), each a
pure function of the window. `evaluate_window` runs them in place and returns the `WindowEvaluation` (the
report does this); the live core submits the same tasks to its task runner (Ray, or threads) and puts what
comes back together with the same `assemble_evaluation`, so both read one evaluation, field by field.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_shadow.evaluation.candidates import Candidate
from vllm_shadow.evaluation.evaluate import (
    CandidateOutcome,
    Fidelity,
    Slo,
    WindowOptimum,
    check_fidelity,
    run_candidates,
    solve_window_optimum,
)
from vllm_shadow.evaluation.results import WindowEvaluation
from vllm_shadow.evaluation.shared_runs import one_priority, task_groups
from vllm_shadow.tracking.windows import TrafficWindow

IN_PROCESS = "in-process"  # where `evaluate_window`'s tasks ran


@dataclass(frozen=True, slots=True)
class EvaluationSettings:
    candidate_tasks: int = 2  # tasks the candidates of one window are split into
    optimal: bool = True
    optimal_time_limit: float = 5.0
    optimal_max_requests: int = 64  # larger windows get the relaxation bound only
    # CP-SAT on every k-th window of an engine, the relaxation bound on the others (the bound at equal latency
    # is a relaxation on every window): a solve costs up to its time limit of CPU, which at many engines is
    # more than all the simulations together.
    optimal_every: int = 1
    optimal_workers: int = 1
    # CP-SAT under the latency deadlines as well, on the same windows (the bound at equal latency is otherwise
    # the relaxation under them, on every window: see `evaluate.solve_window_optimum` for why).
    optimal_constrained_cp_sat: bool = False
    timeout_seconds: float = 60.0  # a window whose tasks take longer is cancelled and counted
    max_in_flight: int = 4  # windows evaluating at once
    max_queued: int = 64  # windows waiting to be evaluated; beyond this the oldest is dropped
    # Keep every simulated request's record in each outcome (the report draws their distributions); the live
    # shadow keeps summaries only, so that results stay small on the wire.
    keep_requests: bool = False

    def __post_init__(self) -> None:
        if min(self.candidate_tasks, self.max_in_flight, self.max_queued, self.optimal_every) < 1:
            raise ValueError(f"evaluation bounds must be >= 1: {self}")
        if self.timeout_seconds <= 0 or self.optimal_time_limit <= 0:
            raise ValueError("time limits must be positive")


@dataclass(frozen=True, slots=True)
class WindowTask:
    """One independent part of a window's evaluation: `fn(window, *args, **kwargs)`."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def run(self, window: TrafficWindow) -> Any:
        return self.fn(window, *self.args, **self.kwargs)


@dataclass(frozen=True, slots=True)
class WindowTasks:
    fidelity: WindowTask  # -> Fidelity
    candidates: tuple[WindowTask, ...]  # each -> list[CandidateOutcome]
    optimal: WindowTask | None  # -> WindowOptimum; None when the settings ask for no optimum


@dataclass(frozen=True, slots=True)
class TaskOutputs:
    """What a window's tasks returned, by task; None where a task failed."""

    fidelity: Fidelity | None
    candidates: tuple[list[CandidateOutcome] | None, ...]
    optimal: WindowOptimum | None
    locations: tuple[str, ...]  # where the tasks that returned ran


@dataclass(frozen=True, slots=True)
class AssembledEvaluation:
    evaluation: WindowEvaluation | None  # None when the self replay failed: nothing compares without it
    candidate_failures: int  # candidates that failed, and candidate tasks that returned nothing
    optimal_failed: bool  # an optimum was asked for and did not come back


def plan_tasks(
    window: TrafficWindow, candidates: Sequence[Candidate], settings: EvaluationSettings, slo: Slo
) -> WindowTasks:
    """The tasks that evaluate `window` against `candidates` (the first is the current configuration)."""
    # Policies that may share a run go to one task: runs are shared within a task (`SharedRuns`).
    chunks = task_groups([c.policy for c in candidates[1:]], settings.candidate_tasks, one_priority(window))
    keep = {"keep_requests": True} if settings.keep_requests else {}
    optimal = None
    if settings.optimal:
        on_this_window = window.index % settings.optimal_every == 0
        optimal = WindowTask(
            solve_window_optimum,
            kwargs={
                "time_limit": settings.optimal_time_limit,
                "max_requests": settings.optimal_max_requests if on_this_window else 0,
                "workers": settings.optimal_workers,
                "slo": slo,
                "constrained_cp_sat": settings.optimal_constrained_cp_sat,
            },
        )
    return WindowTasks(
        fidelity=WindowTask(check_fidelity, (slo,), keep),
        candidates=tuple(WindowTask(run_candidates, (chunk, slo), keep) for chunk in chunks or [[]]),
        optimal=optimal,
    )


def assemble_evaluation(
    window: TrafficWindow,
    candidates: Sequence[Candidate],
    settings: EvaluationSettings,
    outputs: TaskOutputs,
    evaluation_seconds: float,
) -> AssembledEvaluation:
    """The window's evaluation from what its tasks returned."""
    # In the candidates' order, however they were split into tasks.
    rank = {c.label: i for i, c in enumerate(candidates)}
    outcomes = sorted(
        (o for chunk in outputs.candidates if chunk is not None for o in chunk),
        key=lambda o: rank.get(o.label, len(rank)),
    )
    failures = sum(bool(o.error) for o in outcomes) + sum(chunk is None for chunk in outputs.candidates)
    optimal_failed = settings.optimal and outputs.optimal is None
    if outputs.fidelity is None:
        return AssembledEvaluation(None, 0, False)
    evaluation = WindowEvaluation(
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
        fidelity=outputs.fidelity,
        candidates=tuple(outcomes),
        optimal=outputs.optimal.unconstrained if outputs.optimal is not None else None,
        constrained=outputs.optimal.constrained if outputs.optimal is not None else None,
        recompute=window.recompute,
        evaluation_seconds=evaluation_seconds,
        task_locations=outputs.locations,
    )
    return AssembledEvaluation(evaluation, failures, optimal_failed)


def evaluate_window(
    window: TrafficWindow, candidates: Sequence[Candidate], settings: EvaluationSettings, slo: Slo
) -> WindowEvaluation:
    """Evaluate `window` in this process: the self replay, every candidate and the optimum. A failing
    candidate is reported in its outcome; a failing self replay raises."""
    started = time.perf_counter()
    tasks = plan_tasks(window, candidates, settings, slo)
    fidelity = tasks.fidelity.run(window)
    chunks = tuple(task.run(window) for task in tasks.candidates)
    optimal = tasks.optimal.run(window) if tasks.optimal is not None else None
    ran = 1 + len(chunks) + (tasks.optimal is not None)
    outputs = TaskOutputs(fidelity, chunks, optimal, (IN_PROCESS,) * ran)
    assembled = assemble_evaluation(window, candidates, settings, outputs, time.perf_counter() - started)
    assert assembled.evaluation is not None  # the self replay ran, or raised
    return assembled.evaluation
