"""The optimal scheduler: heuristics for a warm start, the CP-SAT run model, the verifier, and honest bounds.

`solve_optimal` returns a schedule that the verifier has replayed (never one merely believed feasible),
its objective as the verifier computed it, and a lower bound with the schedules it holds for (`bound_scope`):
  * GPU cost, d = 0, token budget and sequence cap unlimited: every schedule with at most `max_evictions`
    recompute preemptions per request (the run form loses nothing: see `vllm_shadow.solver.cpsat`);
  * GPU cost with d > 0: the same, after subtracting the most any prefill chunking could save
    (`vllm_shadow.solver.bounds.chunking_slack`), because the run form prefills in one batch;
  * otherwise (latency terms, deadlines, or a binding budget or cap): schedules that never pause a running
    request and prefill in one batch, with at most `max_evictions` preemptions per request (and, with
    deadlines, meeting them).
`relaxation_bound` holds for every schedule whatsoever (that meets the deadlines) and costs nothing to compute;
it backs the bound up when CP-SAT proves little, and is the only bound for windows too large to model. Under
deadlines its batch count is raised by `time_capacity_batches` (a linear programme over the window's key times,
also valid for every schedule that meets them), which is what proves busy windows.

Deadlines ("the same service, cheaper"): by default every request must get its first token and finish no later
than in the engine's own schedule (`engine_deadlines`, from the vLLM heuristic's replay of the window), or
within the user's TTFT and TPOT limits (`slo_deadlines`). A window whose requests fall into busy periods (every
request arriving before a time must finish by it) is solved period by period: no batch can span two, so the
optimum and the bound are sums over them (`busy_periods`). Under deadlines the integer time layer is a
relaxation (its bound holds); a schedule it finds that misses a deadline by a rounding error is re-solved on
the conservative model, whose every schedule meets them (see `vllm_shadow.solver.cpsat`). That time layer has
variables per request and per batch: on a busy window (64 requests over 843 batches: 327k variables, 655k with
evictions) CP-SAT found nothing better than vLLM's own schedule in 60 s and proved nothing. Past
`MAX_TIME_LAYER_CELLS` it is not built: the schedule is the best verified heuristic and the bound the
relaxation's, which then holds for every schedule meeting the deadlines (`bound_method` says which bound won).

With evictions allowed CP-SAT rarely proves much beyond the relaxation: a recompute preemption cuts a request's
KV staircase into two pieces placed independently (the second starts where the first stopped, so it needs no
more memory), at the price of the recompute. That is preemptive packing with a set-up cost, and the model's
variable cut points leave CP-SAT without a strong relaxation. The no-eviction optimum, solved first, seeds it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.bounds import (
    TimeCapacityBound,
    chunking_slack,
    min_batches,
    relaxation_bound,
    time_capacity_batches,
)
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
from vllm_shadow.solver.problem import UNLIMITED, Objective, Window
from vllm_shadow.solver.schedule import (
    Batch,
    Deadlines,
    Replay,
    Schedule,
    replay,
    schedule_from_steps,
    verify,
)
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

# Requests x batches x runs past which the per-batch time layer is not built (see the module docstring): 16
# requests over 569 batches (18k cells) were still UNKNOWN after 20 s, while the tests' windows stay far below.
MAX_TIME_LAYER_CELLS = 10_000

SCOPE_ALL = "every schedule with at most {e} recompute preemptions per request"
SCOPE_RUNS = (
    "schedules that never pause a running request, prefill in one batch, and preempt each request at most "
    "{e} times"
)
SCOPE_EVERY = "every schedule"


@dataclass(frozen=True, slots=True)
class HeuristicRun:
    policy: str
    schedule: Schedule
    replay: Replay  # the verifier's replay: its violations are empty unless the simulator broke a rule
    objective: float
    missed_deadlines: int = 0  # requests' first tokens and finishes later than the deadlines given

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
    deadlines: Deadlines | None = None
    periods: int = 1  # busy periods solved separately (see `busy_periods`)
    # Which bound is reported: "cp-sat", "relaxation", or "time-capacity relaxation" (see the module docstring).
    bound_method: str = "cp-sat"

    def summary(self) -> dict[str, object]:
        return {
            "status": self.status,
            "objective_name": self.objective_name,
            "objective": self.objective,
            "bound": self.bound,
            "bound_scope": self.bound_scope,
            "bound_method": self.bound_method,
            "slo": self.deadlines.source if self.deadlines else "none",
            "busy_periods": self.periods,
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
    deadlines: Deadlines | None = None,
) -> list[HeuristicRun]:
    """Each policy simulated on the window (with `settings` such as max_num_seqs applied to all), its step log
    replayed by the verifier (and the deadlines it misses counted, when given)."""
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
        missed = 0
        if deadlines is not None:
            missed = len(replay(schedule, window, cost, deadlines).violations) - len(replayed.violations)
        runs.append(HeuristicRun(spec, schedule, replayed, replayed.objective(objective), missed))
    return runs


def engine_deadlines(engine: Replay, source: str = "vllm's own schedule") -> Deadlines:
    """Every request no later than in the engine's schedule: "the same service, cheaper"."""
    if not engine.feasible:
        raise ValueError(f"the engine's schedule is infeasible: {engine.violations[:3]}")
    return Deadlines(dict(engine.first_token), dict(engine.finish), source)


def slo_deadlines(window: Window, ttft: float | None, tpot: float | None) -> Deadlines:
    """Per request: first token within `ttft` of arrival; finish by arrival + ttft + tpot x (output - 1) (a
    request that meets both targets on every token finishes by then), or by arrival + tpot x output when only
    the TPOT limit is set. Seconds."""
    if ttft is None and tpot is None:
        raise ValueError("an SLO needs a TTFT or a TPOT limit")
    first, finish = {}, {}
    for r in window.requests:
        if ttft is not None and r.generated_tokens == 0:
            first[r.request_id] = r.arrival + ttft
        if tpot is not None:
            lead = ttft if ttft is not None else tpot
            finish[r.request_id] = r.arrival + lead + tpot * (r.output_tokens - 1)
    parts = [f"{name}={value:g}s" for name, value in (("ttft", ttft), ("tpot", tpot)) if value is not None]
    return Deadlines(first, finish, "SLO " + ",".join(parts))


def scaled_deadlines(deadlines: Deadlines, window: Window, factor: float) -> Deadlines:
    """Each request's allowance from its arrival times `factor` (a latency level of the Pareto view)."""
    arrival = {r.request_id: r.arrival for r in window.requests}

    def scale(times: Mapping[str, float]) -> dict[str, float]:
        return {rid: arrival[rid] + factor * (t - arrival[rid]) for rid, t in times.items()}

    return Deadlines(
        scale(deadlines.first_token), scale(deadlines.finish), f"{factor:g} x ({deadlines.source})"
    )


def busy_periods(window: Window, deadlines: Deadlines) -> list[Window]:
    """The window cut wherever every request that arrived before must finish by the next arrival: no batch
    can hold requests of both sides (one side's batches end by the cut, the other's start after it)."""
    ordered = sorted(window.requests, key=lambda r: (r.arrival, r.request_id))
    periods: list[list] = []
    due = -math.inf
    for r in ordered:
        finish = deadlines.finish.get(r.request_id, math.inf)
        if periods and r.arrival >= due and not r.running:
            periods.append([r])
        else:
            if not periods:
                periods.append([])
            periods[-1].append(r)
        due = max(due, finish)
    return [
        Window(tuple(p), window.limits, window.start if k == 0 else p[0].arrival)
        for k, p in enumerate(periods)
    ]


def restrict(schedule: Schedule, request_ids: set[str]) -> Schedule:
    """The batches of `schedule` that hold the given requests, holding only them."""
    batches = []
    for b in schedule.batches:
        tokens = {rid: n for rid, n in b.tokens.items() if rid in request_ids}
        if tokens:
            batches.append(Batch(tokens, tuple(rid for rid in b.evicted if rid in request_ids)))
    return Schedule(tuple(batches))


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
    deadlines: Deadlines | None = None,
) -> OptimalResult:
    """The best schedule CP-SAT finds in `time_limit` seconds, seeded with the best feasible hint (the
    packing heuristic's schedule is added for GPU cost), every request meeting `deadlines` if given."""
    hints = dict(hints or {})
    capacity = TimeCapacityBound(0, 0, 0, 0.0)
    if deadlines is not None:
        if not objective.needs_time and horizon is None:
            periods = busy_periods(window, deadlines)
            if len(periods) > 1:
                return _solve_periods(
                    window,
                    periods,
                    cost,
                    objective,
                    deadlines,
                    hints,
                    max_evictions,
                    time_limit,
                    workers,
                    seed,
                )
        capacity = time_capacity_batches(window, cost, deadlines, time_limit=time_limit / 2)
        time_limit = max(time_limit - capacity.seconds, 1.0)
    return _solve_window(
        window, cost, objective, hints, capacity, max_evictions, time_limit, workers, seed, horizon, deadlines
    )


def _solve_window(
    window: Window,
    cost: LinearCostModel,
    objective: Objective,
    hints: dict[str, Schedule],
    capacity: TimeCapacityBound,
    max_evictions: int,
    time_limit: float,
    workers: int,
    seed: int,
    horizon: int | None,
    deadlines: Deadlines | None,
) -> OptimalResult:
    """`solve_optimal` on one window, the batches `capacity` proves (under deadlines) already known."""
    hints = dict(hints)
    earlier_seconds = 0.0
    if not objective.needs_time:
        order, runs = best_packing(window)
        hints[f"packing({order})"] = schedule_from_runs(window, runs)
    if deadlines is not None and horizon is None:
        # Any verified schedule will do here, however often it preempts: the relaxation covers every schedule.
        known = _feasible_hints(window, cost, objective, hints, UNLIMITED, deadlines)
        best = min(known, key=lambda c: c[2].objective(objective), default=None)
        batches = _horizon(window, cost, objective, best[2] if best else None)
        if len(window.requests) * batches * (max_evictions + 1) > MAX_TIME_LAYER_CELLS:
            if best is None:
                raise ValueError(
                    "no known schedule meets the deadlines, and the time layer is too large to build"
                )
            return _best_hint_result(window, cost, objective, best, capacity, max_evictions, deadlines)
    if max_evictions > 0:
        # The model with evictions proves little (see the module docstring) but searches well from a good
        # start: the no-eviction optimum, found in a third of the time, is one of its solutions.
        try:
            first = _solve_window(  # the LP's time is counted once, below
                window,
                cost,
                objective,
                hints,
                dataclasses.replace(capacity, seconds=0.0),
                0,
                time_limit / 3,
                workers,
                seed,
                None,
                deadlines,
            )
        except ValueError:  # running requests that cannot all keep their KV: only evictions make room
            pass
        else:
            hints["no-eviction optimum"] = first.schedule
            time_limit -= first.solve_seconds
            earlier_seconds = first.solve_seconds
    candidates = _feasible_hints(window, cost, objective, hints, max_evictions, deadlines)
    best_name, best_schedule, best_replay = min(
        candidates, key=lambda c: c[2].objective(objective), default=("none", None, None)
    )
    if horizon is None:
        horizon = _horizon(window, cost, objective, best_replay)
    started = time.perf_counter()
    model = build_run_model(
        window, cost, objective, horizon=horizon, max_evictions=max_evictions, deadlines=deadlines
    )
    proof_limit = time_limit if deadlines is None else time_limit * 2 / 3
    if best_schedule is not None:
        add_hint(model, runs_from_schedule(window, best_schedule))
    solution = solve_run_model(model, time_limit=proof_limit, workers=workers, seed=seed)
    wall = solution.wall_seconds

    source, schedule, replayed = best_name, best_schedule, best_replay
    found_runs = solution.runs
    if found_runs and deadlines is not None:
        found = schedule_from_runs(window, found_runs)
        verify(found, window, cost)  # every rule but the deadlines holds, whatever the rounding
        if not replay(found, window, cost, deadlines).feasible:
            # Missed by a rounding error of the relaxed time layer: re-solve where times round up.
            safe = build_run_model(
                window,
                cost,
                objective,
                horizon=horizon,
                max_evictions=max_evictions,
                deadlines=deadlines,
                conservative=True,
            )
            add_hint(safe, found_runs)
            remaining = max(time_limit - (time.perf_counter() - started), 1.0)
            retry = solve_run_model(safe, time_limit=remaining, workers=workers, seed=seed)
            wall += retry.wall_seconds
            found_runs = retry.runs
    if found_runs:
        found = schedule_from_runs(window, found_runs)
        found_replay = verify(
            found, window, cost, deadlines
        )  # a model bug must surface, never a wrong answer
        if replayed is None or found_replay.objective(objective) <= replayed.objective(objective):
            source, schedule, replayed = "cp-sat", found, found_replay
    if schedule is None or replayed is None:
        raise ValueError(f"no schedule found for the window (CP-SAT status {solution.status})")

    value = replayed.objective(objective)
    relaxed = relaxation_bound(window, cost, deadlines, capacity.batches).objective(objective)
    exact_for_all = _run_form_is_exact(window, objective) and deadlines is None
    bound, method = relaxed, _relaxation_method(window, deadlines, capacity)
    if solution.status != "INFEASIBLE":  # CP-SAT's bound is valid whether or not it found a solution
        class_bound = _bound_seconds(model, solution.bound_units)
        if exact_for_all:
            class_bound -= objective.gpu * chunking_slack(window, cost)
        if class_bound >= bound:
            bound, method = class_bound, "cp-sat"
    scope = (SCOPE_ALL if exact_for_all else SCOPE_RUNS).format(e=max_evictions)
    if horizon < _horizon(window, cost, objective, best_replay):
        scope += f", within {horizon} batches"
    if deadlines is not None:
        scope += f"; {deadlines.describe()}"
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
        solve_seconds=earlier_seconds + wall + capacity.seconds,
        max_evictions=max_evictions,
        deadlines=deadlines,
        bound_method=method,
    )


def _relaxation_method(window: Window, deadlines: Deadlines | None, capacity: TimeCapacityBound) -> str:
    if deadlines is not None and capacity.batches > min_batches(window, deadlines):
        return "time-capacity relaxation"
    return "relaxation"


def _best_hint_result(
    window: Window,
    cost: LinearCostModel,
    objective: Objective,
    best: tuple[str, Schedule, Replay],
    capacity: TimeCapacityBound,
    max_evictions: int,
    deadlines: Deadlines,
) -> OptimalResult:
    """The best verified heuristic against the relaxation, for a window whose time layer is too large to
    build: OPTIMAL when the bound meets it, else FEASIBLE (a schedule and a bound, no CP-SAT search). The bound
    holds for every schedule meeting the deadlines, so the heuristic may preempt more than `max_evictions`."""
    name, schedule, replayed = best
    value = replayed.objective(objective)
    relaxed = relaxation_bound(window, cost, deadlines, capacity.batches).objective(objective)
    bound = min(relaxed, value)
    return OptimalResult(
        status="OPTIMAL" if bound >= value else "FEASIBLE",
        objective_name=str(objective),
        objective=value,
        bound=bound,
        bound_scope=f"{SCOPE_EVERY}; {deadlines.describe()}",
        relaxation_bound=relaxed,
        gap=(value - bound) / value if value > 0 else 0.0,
        schedule=schedule,
        replay=replayed,
        source=name,
        horizon=len(schedule),
        variables=capacity.variables,
        constraints=capacity.constraints,
        solve_seconds=capacity.seconds,
        max_evictions=max_evictions,
        deadlines=deadlines,
        bound_method=_relaxation_method(window, deadlines, capacity),
    )


def _solve_periods(
    window: Window,
    periods: Sequence[Window],
    cost: LinearCostModel,
    objective: Objective,
    deadlines: Deadlines,
    hints: Mapping[str, Schedule],
    max_evictions: int,
    time_limit: float,
    workers: int,
    seed: int,
) -> OptimalResult:
    """Each busy period solved on its own (time shared by size), the schedules joined and verified whole."""
    total = len(window.requests)
    parts = []
    for period in periods:
        ids = {r.request_id for r in period.requests}
        parts.append(
            solve_optimal(
                period,
                cost,
                objective,
                max_evictions=max_evictions,
                time_limit=max(time_limit * len(ids) / total, 1.0),
                workers=workers,
                seed=seed,
                hints={name: restrict(h, ids) for name, h in hints.items()},
                deadlines=Deadlines(
                    {k: v for k, v in deadlines.first_token.items() if k in ids},
                    {k: v for k, v in deadlines.finish.items() if k in ids},
                    deadlines.source,
                ),
            )
        )
    schedule = Schedule(tuple(b for part in parts for b in part.schedule.batches))
    replayed = verify(schedule, window, cost, deadlines)
    value = replayed.objective(objective)
    relaxed = relaxation_bound(window, cost, deadlines).objective(objective)
    bound = min(max(sum(p.bound for p in parts), relaxed), value)
    # The joined bound holds for the narrowest of the parts' scopes.
    scopes = [p.bound_scope.split(", within")[0].split(";")[0] for p in parts]
    scope = next((x for x in scopes if x != SCOPE_EVERY), SCOPE_EVERY)
    statuses = {p.status for p in parts}
    status = next(s for s in ("INFEASIBLE", "UNKNOWN", "FEASIBLE", "OPTIMAL") if s in statuses)
    sources = {p.source for p in parts}
    return OptimalResult(
        status=status,
        objective_name=str(objective),
        objective=value,
        bound=bound,
        bound_scope=f"{scope}; {deadlines.describe()}",
        relaxation_bound=relaxed,
        gap=(value - bound) / value if value > 0 else 0.0,
        schedule=schedule,
        replay=replayed,
        source="cp-sat" if "cp-sat" in sources else "+".join(sorted(sources)),
        horizon=sum(p.horizon for p in parts),
        variables=sum(p.variables for p in parts),
        constraints=sum(p.constraints for p in parts),
        solve_seconds=sum(p.solve_seconds for p in parts),
        max_evictions=max_evictions,
        deadlines=deadlines,
        periods=len(parts),
        bound_method="+".join(sorted({p.bound_method for p in parts})),
    )


def _feasible_hints(
    window: Window,
    cost: LinearCostModel,
    objective: Objective,
    hints: Mapping[str, Schedule],
    max_evictions: int,
    deadlines: Deadlines | None = None,
) -> list[tuple[str, Schedule, Replay]]:
    """Hints the verifier accepts (deadlines included) and that preempt no request more than the model
    allows."""
    kept = []
    for name, schedule in hints.items():
        replayed = replay(schedule, window, cost, deadlines)
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
