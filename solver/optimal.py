"""The optimal scheduler: heuristics for a warm start, the CP-SAT run model, the verifier, and honest bounds.

`solve_optimal` returns a schedule that the verifier has replayed (never one merely believed feasible),
its objective as the verifier computed it, and a lower bound with the schedules it holds for (`bound_scope`):
  * GPU cost, d = 0, token budget and sequence cap unlimited: every schedule with at most `max_evictions`
    recompute preemptions per request (the run form loses nothing: see `vllm_shadow.solver.cpsat`);
  * GPU cost with d > 0: the same, after subtracting the most any prefill chunking could save
    (`vllm_shadow.solver.bounds.chunking_slack`), because the run form prefills in one batch;
  * otherwise (latency terms, or a binding budget or cap): schedules that never pause a running request and
    prefill in one batch, with at most `max_evictions` preemptions per request.
`relaxation_bound` holds for every schedule whatsoever and costs nothing to compute; it backs the bound up
when CP-SAT proves little, and is the only bound for windows too large to model.

With evictions allowed CP-SAT rarely proves much beyond the relaxation: a recompute preemption cuts a request's
KV staircase into two pieces placed independently (the second starts where the first stopped, so it needs no
more memory), at the price of the recompute. That is preemptive packing with a set-up cost, and the model's
variable cut points leave CP-SAT without a strong relaxation. The no-eviction optimum, solved first, seeds it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.bounds import chunking_slack, relaxation_bound
from vllm_shadow.solver.cpsat import (
    RunModel,
    add_hint,
    baseline_seconds,
    build_run_model,
    runs_from_schedule,
    schedule_from_runs,
    solve_run_model,
)
from vllm_shadow.solver.packing import best_packing
from vllm_shadow.solver.policies import parse_policy
from vllm_shadow.solver.problem import Objective, Window
from vllm_shadow.solver.schedule import Replay, Schedule, replay, schedule_from_steps, verify
from vllm_shadow.solver.simulator import RunningRequest, simulate

DEFAULT_HEURISTICS = (
    "vllm",
    "vllm-v0",
    "sarathi",
    "orca",
    "fastertransformer",
    "lightllm",
    "no-eviction",
    "sjf",
    "sof",
)

GPU_COST = Objective()

SCOPE_ALL = "every schedule with at most {e} recompute preemptions per request"
SCOPE_RUNS = (
    "schedules that never pause a running request, prefill in one batch, and preempt each request at most "
    "{e} times"
)


@dataclass(frozen=True, slots=True)
class HeuristicRun:
    policy: str
    schedule: Schedule
    replay: Replay  # the verifier's replay: its violations are empty unless the simulator broke a rule
    objective: float

    @property
    def preemptions(self) -> int:
        return sum(self.replay.evictions.values())


@dataclass(frozen=True, slots=True)
class OptimalResult:
    status: str  # CP-SAT's status: OPTIMAL, FEASIBLE, UNKNOWN (best hint returned), INFEASIBLE
    objective_name: str
    objective: float  # the verifier's value of `schedule`
    bound: float  # lower bound over `bound_scope`
    bound_scope: str
    relaxation_bound: float  # lower bound over every schedule
    gap: float  # (objective - bound) / objective
    schedule: Schedule
    replay: Replay
    source: str  # "cp-sat", or the heuristic whose schedule CP-SAT did not improve on
    horizon: int
    variables: int
    constraints: int
    solve_seconds: float  # CP-SAT's wall time, the no-eviction first pass included
    max_evictions: int

    def summary(self) -> dict[str, object]:
        return {
            "status": self.status,
            "objective_name": self.objective_name,
            "objective": self.objective,
            "bound": self.bound,
            "bound_scope": self.bound_scope,
            "relaxation_bound": self.relaxation_bound,
            "gap": self.gap,
            "source": self.source,
            "batches": len(self.schedule),
            "gpu_seconds": self.replay.gpu_seconds,
            "mean_e2e_s": self.replay.mean_e2e,
            "mean_ttft_s": self.replay.mean_ttft,
            "preemptions": sum(self.replay.evictions.values()),
            "recomputed_tokens": self.replay.recomputed_tokens,
            "horizon": self.horizon,
            "variables": self.variables,
            "constraints": self.constraints,
            "solve_seconds": self.solve_seconds,
            "max_evictions": self.max_evictions,
        }


def run_heuristics(
    window: Window,
    cost: LinearCostModel,
    objective: Objective,
    policies: Sequence[str] = DEFAULT_HEURISTICS,
    *,
    settings: Mapping[str, int] | None = None,
) -> list[HeuristicRun]:
    """Each policy simulated on the window (with `settings` such as max_num_seqs applied to all), its step log
    replayed by the verifier."""
    fresh = [r for r in window.requests if not r.running]
    running = [
        RunningRequest(arrival, r.computed_tokens, r.generated_tokens)
        for r, arrival in zip(window.requests, window.to_arrivals(), strict=True)
        if r.running
    ]
    arrivals = {a.request_id: a for a in window.to_arrivals()}
    runs = []
    for spec in policies:
        policy = dataclasses.replace(parse_policy(spec), **(settings or {}))
        result = simulate(
            [arrivals[r.request_id] for r in fresh],
            policy,
            cost,
            num_kv_blocks=window.limits.kv_blocks + 1,  # the simulator counts vLLM's null block
            block_size=window.limits.block_size,
            initial_running=running,
            start_time=window.start,
            record_steps=True,
        )
        schedule = schedule_from_steps(result.steps or [])
        replayed = replay(schedule, window, cost)
        runs.append(HeuristicRun(spec, schedule, replayed, replayed.objective(objective)))
    return runs


def solve_optimal(
    window: Window,
    cost: LinearCostModel,
    objective: Objective = GPU_COST,
    *,
    max_evictions: int = 1,
    time_limit: float = 10.0,
    workers: int = 2,
    seed: int = 0,
    hints: Mapping[str, Schedule] | None = None,
    horizon: int | None = None,
) -> OptimalResult:
    """The best schedule CP-SAT finds in `time_limit` seconds, seeded with the best feasible hint (the
    packing heuristic's schedule is added for GPU cost)."""
    hints = dict(hints or {})
    earlier_seconds = 0.0
    if not objective.needs_time:
        order, runs = best_packing(window)
        hints[f"packing({order})"] = schedule_from_runs(window, runs)
    if max_evictions > 0:
        # The model with evictions proves little (see the module docstring) but searches well from a good
        # start: the no-eviction optimum, found in a third of the time, is one of its solutions.
        try:
            first = solve_optimal(
                window,
                cost,
                objective,
                max_evictions=0,
                time_limit=time_limit / 3,
                workers=workers,
                seed=seed,
                hints=hints,
            )
        except ValueError:  # running requests that cannot all keep their KV: only evictions make room
            pass
        else:
            hints["no-eviction optimum"] = first.schedule
            time_limit -= first.solve_seconds
            earlier_seconds = first.solve_seconds
    candidates = _feasible_hints(window, cost, objective, hints, max_evictions)
    best_name, best_schedule, best_replay = min(
        candidates, key=lambda c: c[2].objective(objective), default=("none", None, None)
    )
    if horizon is None:
        horizon = _horizon(window, cost, objective, best_replay)
    model = build_run_model(window, cost, objective, horizon=horizon, max_evictions=max_evictions)
    if best_schedule is not None:
        add_hint(model, runs_from_schedule(window, best_schedule))
    solution = solve_run_model(model, time_limit=time_limit, workers=workers, seed=seed)

    source, schedule, replayed = best_name, best_schedule, best_replay
    if solution.runs:
        found = schedule_from_runs(window, solution.runs)
        found_replay = verify(found, window, cost)  # a model bug must surface, never a wrong answer
        if replayed is None or found_replay.objective(objective) <= replayed.objective(objective):
            source, schedule, replayed = "cp-sat", found, found_replay
    if schedule is None or replayed is None:
        raise ValueError(f"no schedule found for the window (CP-SAT status {solution.status})")

    value = replayed.objective(objective)
    relaxed = relaxation_bound(window, cost).objective(objective)
    exact_for_all = _run_form_is_exact(window, objective)
    bound = relaxed
    if solution.status != "INFEASIBLE":  # CP-SAT's bound is valid whether or not it found a solution
        class_bound = _bound_seconds(model, solution.bound_units)
        if exact_for_all:
            class_bound -= objective.gpu * chunking_slack(window, cost)
        bound = max(bound, class_bound)
    scope = (SCOPE_ALL if exact_for_all else SCOPE_RUNS).format(e=max_evictions)
    if horizon < _horizon(window, cost, objective, best_replay):
        scope += f", within {horizon} batches"
    return OptimalResult(
        status=solution.status,
        objective_name=str(objective),
        objective=value,
        bound=min(bound, value),
        bound_scope=scope,
        relaxation_bound=relaxed,
        gap=(value - min(bound, value)) / value if value > 0 else 0.0,
        schedule=schedule,
        replay=replayed,
        source=source,
        horizon=horizon,
        variables=model.num_variables,
        constraints=model.num_constraints,
        solve_seconds=earlier_seconds + solution.wall_seconds,
        max_evictions=max_evictions,
    )


def _feasible_hints(
    window: Window,
    cost: LinearCostModel,
    objective: Objective,
    hints: Mapping[str, Schedule],
    max_evictions: int,
) -> list[tuple[str, Schedule, Replay]]:
    """Hints the verifier accepts and that preempt no request more than the model allows."""
    kept = []
    for name, schedule in hints.items():
        replayed = replay(schedule, window, cost)
        if replayed.feasible and max(replayed.evictions.values(), default=0) <= max_evictions:
            kept.append((name, schedule, replayed))
    return kept


def _horizon(window: Window, cost: LinearCostModel, objective: Objective, known: Replay | None) -> int:
    """Batches the model may use, never too few for an optimal run-form schedule. Every batch of a run emits
    a token, and a batch index no run uses only costs time, so sum(remaining outputs) batches always suffice.
    For GPU cost alone a known schedule tightens that: one better than it has fewer than
    (known cost + chunking slack - constant part) / a batches."""
    serial = sum(r.remaining_outputs for r in window.requests)
    longest = max(r.remaining_outputs for r in window.requests)
    if known is None or objective.needs_time or cost.a <= 0:
        return serial
    constant = sum(baseline_seconds(r, cost) for r in window.requests)
    within = (known.gpu_seconds + chunking_slack(window, cost) - constant) / cost.a
    return max(longest, min(serial, math.floor(within + 1e-9)))


def _run_form_is_exact(window: Window, objective: Objective) -> bool:
    """True when no schedule outside the run form can do better (see `vllm_shadow.solver.cpsat`'s docstring)."""
    limits = window.limits
    unlimited = limits.max_num_seqs >= len(window.requests) and limits.max_num_batched_tokens >= sum(
        r.peak_tokens for r in window.requests
    )
    return unlimited and not objective.needs_time


def _bound_seconds(model: RunModel, units: float) -> float:
    """The model's objective units back to objective seconds, adding the constant parts left out of it."""
    window, cost, objective = model.window, model.cost, model.objective
    requests = window.requests
    constant = objective.gpu * sum(baseline_seconds(r, cost) for r in requests)
    constant += objective.e2e / len(requests) * sum(window.start - r.arrival for r in requests)
    fresh = [r for r in requests if r.generated_tokens == 0]
    if fresh:
        constant += objective.ttft / len(fresh) * sum(window.start - r.arrival for r in fresh)
    return units * model.scale.per_unit + constant
