"""Window evaluation on windows cut from real engine streams: self replay, candidates, gaps, the optimum."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tests import shadow_support as support
from vllm_shadow.evaluation.candidates import build_candidates, current_policy
from vllm_shadow.evaluation.evaluate import (
    LatencySummary,
    Slo,
    check_fidelity,
    engine_replay,
    optimal_problem,
    run_candidates,
    solve_window_optimum,
)
from vllm_shadow.evaluation.results import relative_gap
from vllm_shadow.evaluation.window import (
    EvaluationSettings,
    TaskOutputs,
    assemble_evaluation,
    evaluate_window,
    plan_tasks,
)

OTHERS = ["vllm(max_num_seqs=2,max_num_batched_tokens=256)", "sarathi", "lightllm", "sjf", "vllm-v0"]


@pytest.fixture(scope="module")
def windows():
    return {name: support.windows(name, 0.5) for name in support.NAMES}


def test_the_current_configuration_as_a_candidate_is_exactly_the_self_replay(windows) -> None:
    for window in windows["fcfs-kv12"]:
        fidelity = check_fidelity(window, Slo(1.0, 0.05))
        (same,) = run_candidates(window, [current_policy(window.info.scheduler)], Slo(1.0, 0.05))
        assert same == fidelity.self_replay
        assert relative_gap(fidelity.self_replay.gpu_seconds, same.gpu_seconds) == 0.0


def test_latency_is_summarised_over_the_window_s_own_requests(windows) -> None:
    for window in windows["priority-kv16"]:
        fidelity = check_fidelity(window, Slo())
        assert fidelity.self_replay.latency.requests == len(window.arrivals)
        assert fidelity.actual.requests == len(window.observed) == len(window.arrivals)
        assert math.isnan(fidelity.actual.slo_attainment)  # no SLO, no attainment


def test_the_optimal_bound_is_below_every_schedule_tried(windows) -> None:
    """A lower bound that any simulated configuration beat would be a bug in one of them."""
    for name in support.NAMES:
        for window in windows[name][:4]:
            outcomes = [check_fidelity(window, Slo()).self_replay, *run_candidates(window, OTHERS, Slo())]
            optimum = solve_window_optimum(window, time_limit=1.0, max_requests=40).unconstrained
            relaxed = solve_window_optimum(window, time_limit=1.0, max_requests=0).unconstrained
            assert relaxed.method == "relaxation"
            assert relaxed.bound_gpu_seconds <= optimum.bound_gpu_seconds * (1 + 1e-9)
            # CP-SAT may find no schedule in its second on a loaded machine (best is nan); its bound holds.
            if not math.isnan(optimum.best_gpu_seconds):
                assert optimum.bound_gpu_seconds <= optimum.best_gpu_seconds * (1 + 1e-9)
            for outcome in outcomes:
                if not outcome.error:  # the simulator keeps time in whole picoseconds: 1e-6 relative slack
                    assert optimum.bound_gpu_seconds <= outcome.gpu_seconds * (1 + 1e-6), outcome.label


def test_the_optimal_problem_keeps_each_request_s_state_at_the_window_start(windows) -> None:
    window = next(w for w in windows["fcfs-kv12"] if w.running)
    problem = optimal_problem(window)
    by_id = problem.by_id()
    for running in window.running:
        r = by_id[running.request.request_id]
        assert (r.computed_tokens, r.generated_tokens) == (running.computed_tokens, running.generated_tokens)
    assert len(problem.requests) == window.num_requests
    assert problem.limits.kv_blocks == window.info.num_kv_blocks - 1


def test_a_candidate_that_cannot_take_over_is_reported_not_raised(windows) -> None:
    """No-eviction schedulers reserve every request's full KV: from a state an evicting engine reached, the
    reservations may not fit. That candidate fails on that window; the others still count."""
    failures = 0
    for window in windows["fcfs-kv6-crowded"]:
        outcomes = run_candidates(window, ["no-eviction", "vllm"], Slo())
        assert not math.isnan(outcomes[1].gpu_seconds) and not outcomes[1].error
        if outcomes[0].error:
            assert math.isnan(outcomes[0].gpu_seconds) and outcomes[0].latency is None
            failures += 1
    assert failures > 0


def test_slo_attainment_counts_requests_meeting_every_target() -> None:
    slo = Slo(ttft_seconds=1.0, tpot_seconds=0.1)
    summary = LatencySummary.of([0.5, 1.5, 0.5, 0.5], [0.05, 0.05, 0.2, math.nan], [2, 3, 4, 1], slo)
    assert (
        summary.slo_attainment == 0.5
    )  # the second misses TTFT, the third TPOT; a one-token output has none
    assert summary.requests == 4 and summary.ttft[0] == 0.5


def test_request_only_windows_have_no_steps_to_compare(windows) -> None:
    window = windows["fcfs-kv12"][1]
    blind = dataclasses.replace(window, arrival_steps=None, steps=(), running=(), waiting=())
    fidelity = check_fidelity(blind, Slo())
    assert fidelity.steps_compared == 0 and math.isnan(fidelity.step_match_ratio)
    assert math.isnan(fidelity.gpu_error_ratio) and not math.isnan(fidelity.e2e_error_ratio)


def test_a_window_evaluates_the_same_however_its_candidates_are_split_into_tasks(windows) -> None:
    """The live core splits candidates across tasks, the report runs them in one: the same evaluation."""
    window = windows["priority-kv16"][2]
    candidates = build_candidates(window.info.scheduler)
    one, three = (
        evaluate_window(window, candidates, EvaluationSettings(candidate_tasks=n, optimal=False), Slo())
        for n in (1, 3)
    )
    assert one.fidelity == three.fidelity and one.optimal is None
    assert one.candidates == three.candidates  # in the candidates' order either way
    assert [o.label for o in one.outcomes()] == [c.label for c in candidates]  # the current one first
    assert (one.current, one.requests, one.engine_steps) == (
        candidates[0].label,
        len(window.arrivals),
        len(window.steps),
    )
    assert all(not o.requests for o in one.outcomes())  # per-request records only when asked for
    kept = evaluate_window(
        window, candidates[:2], EvaluationSettings(optimal=False, keep_requests=True), Slo()
    )
    own = sorted(r.request_id for r in window.arrivals)
    assert all(sorted(r.request_id for r in o.requests) == own for o in kept.outcomes())


def test_the_assembly_counts_what_failed_and_needs_the_self_replay(windows) -> None:
    window = windows["fcfs-kv12"][1]
    candidates = build_candidates(window.info.scheduler)
    settings = EvaluationSettings(candidate_tasks=2)
    tasks = plan_tasks(window, candidates, settings, Slo())
    assert len(tasks.candidates) == 2 and tasks.optimal is not None
    fidelity = tasks.fidelity.run(window)
    chunk = tasks.candidates[0].run(window)
    outputs = TaskOutputs(fidelity, (chunk, None), None, ("here", "here"))
    assembled = assemble_evaluation(window, candidates, settings, outputs, 0.5)
    assert assembled.evaluation is not None and assembled.evaluation.candidates == tuple(chunk)
    assert assembled.candidate_failures == 1 + sum(bool(o.error) for o in chunk)
    assert assembled.optimal_failed and assembled.evaluation.task_locations == ("here", "here")
    lost = assemble_evaluation(window, candidates, settings, dataclasses.replace(outputs, fidelity=None), 0.5)
    assert lost.evaluation is None


def test_the_optimum_that_reuses_the_fidelity_check_s_replay_equals_one_solved_alone(windows) -> None:
    """Within a process the optimum's deadlines take the self replay the fidelity check just ran: the same
    bounds, gaps and scopes as a copy of the window (a different object, so nothing shared) bounded alone."""
    slo = Slo(1.0, 0.05)
    for window in windows["fcfs-kv6-crowded"][:6]:
        check_fidelity(window, slo)
        shared = solve_window_optimum(window, time_limit=1.0, max_requests=0, slo=slo)
        alone = solve_window_optimum(dataclasses.replace(window), time_limit=1.0, max_requests=0, slo=slo)
        for a, b in ((shared.unconstrained, alone.unconstrained), (shared.constrained, alone.constrained)):
            assert dataclasses.replace(a, solve_seconds=0.0) == dataclasses.replace(b, solve_seconds=0.0)
    # The replay is handed over once: a third call of the same window simulates again, equal still.
    window = windows["fcfs-kv12"][1]
    first = engine_replay(window)
    assert engine_replay(window) is first
    again = engine_replay(window)
    assert again is not first and repr(again) == repr(first)
