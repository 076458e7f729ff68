"""The KV a started request holds while it waits: an integer bound over the time-capacity LP's key times.

The time-capacity LP (`vllm_shadow.solver.bounds.time_capacity_batches`) charges the KV of the tokens emitted
between two key times, not the KV a request holds in the batches it sits out. On a memory-bound window that is
where it is loose: it starts long requests early and spreads their tokens thinly between the others. No LP row
can charge that KV: a request holds it over (k, k+1] only if it has emitted a token by k, has not emitted its
last by k+1, and has not been evicted (a recompute frees its blocks, at a price): an AND of integer conditions,
and an either/or. This module writes them as a MIP over the same keys and rows:
  * per request i and key k, binaries s[i,k] (it has emitted a token by k: x >= s, x <= rem * s) and f[i,k] (it
    has emitted all: x >= rem * f, x <= rem - 1 + f), and v[i] (it is evicted at least once after its first
    emission in the window);
  * per key interval j = (k_j, k_j+1], idle[i,j] >= D_j - (x[i,j+1] - x[i,j]) - M_j * (1 - s[i,j] + f[i,j+1] +
    v[i]): the batches ending in it that i sits out while alive (D_j = E[j+1] - E[j]; M_j the most batches
    that fit in the interval, each at least a + b long). In each of them it holds at least blocks(target)
    (the KV of its prompt and its first emission), on top of the emission area the KV rows already charge;
  * every KV row the LP added (k, k'), and the first-block rows of each key interval and of the window's
    prefixes and suffixes, gain sum_i blocks_i * sum_j idle[i,j] over the intervals between k and k' (a
    cumulative P[k] keeps the rows sparse);
  * an eviction after the first emission recomputes at least the request's target tokens: b * target of GPU
    time no other term counts (their attention is left out: it is only tested with d = 0).
The objective is E at the last key + the recompute seconds over a, in batch equivalents: a * (its proven
lower bound) + every request's own work bounds the GPU time of every schedule meeting the deadlines (pausing,
chunking and any number of evictions included). The bound is the MIP solver's proven one (its dual bound, not
its incumbent), so a solve stopped by the time limit still proves what it reached (HiGHS through MathOpt
reports it then; SCIP through pywraplp only once it holds a solution).

Not used by `solve_optimal`: on the A10G windows of RESULTS-optimal.md it proves at most one batch over the LP
in 60 s (the full-key MIP is too large, and over coarse keys the LP loses more than the MIP gains).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
from ortools.linear_solver import linear_solver_pb2, pywraplp
from ortools.math_opt.python import mathopt

from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.bounds import KvRows, TimeCapacityBound, build_capacity_model
from vllm_shadow.solver.problem import EngineLimits, Window, WindowRequest
from vllm_shadow.solver.schedule import Deadlines

# The MIP is solved in floating point: its bound is lowered by this relative tolerance.
_MIP_TOLERANCE = 1e-6


@dataclass(frozen=True, slots=True)
class PausedKvBound:
    # Proven for every schedule meeting the deadlines: batches + recompute seconds / a (0: nothing proven).
    batch_equivalents: float
    status: str  # the MIP solver's status
    variables: int
    constraints: int
    seconds: float

    def schedule_seconds(self, cost: LinearCostModel) -> float:
        """The least a * batches + recompute seconds of any schedule meeting the deadlines."""
        return cost.a * self.batch_equivalents


def paused_blocks(request: WindowRequest, limits: EngineLimits) -> int:
    """The least a request holds in a batch it sits out after its first emission in the window, unevicted: the
    KV of its target tokens (its prompt and every token emitted before the window)."""
    return limits.blocks(request.target_tokens)


def recompute_batch_equivalents(target_tokens: int, cost: LinearCostModel) -> float:
    """The least an eviction after a request's first emission adds, over a: its KV holds at least its target
    tokens, and all of them are computed again before its next emission."""
    return cost.b * target_tokens / cost.a


def paused_kv_bound(
    window: Window,
    cost: LinearCostModel,
    deadlines: Deadlines,
    capacity: TimeCapacityBound,
    time_limit: float = 30.0,
    max_keys_apart: int | None = None,
    max_keys: int | None = None,
    solver_name: str = "HIGHS",
) -> PausedKvBound:
    """The MIP of the module docstring over the key times of `time_capacity_batches` (called with the same
    `max_keys_apart` and `max_keys`), with the KV rows `capacity` found, solved by HiGHS (through MathOpt) or
    SCIP. Nothing is proven (0) when the solver proves nothing in `time_limit` seconds or the cost model has
    no positive a."""
    started = time.perf_counter()
    if cost.a <= 0 or min(cost.b, cost.c, cost.d, cost.e) < 0 or not deadlines.finish:
        return PausedKvBound(0.0, "NOT_SOLVED", 0, 0, 0.0)
    # Built on a pywraplp SCIP model either way: for HiGHS it is only the container exported as MPS.
    mip = build_paused_kv_mip(window, cost, deadlines, capacity, max_keys_apart, max_keys, "SCIP")
    remaining = max(time_limit - (time.perf_counter() - started), 0.001)
    if solver_name == "HIGHS":
        name, best = _solve_with_highs(mip.solver, remaining)
    else:
        name, best = _solve_with_scip(mip.solver, remaining)
    value = 0.0
    if name in ("OPTIMAL", "FEASIBLE", "NOT_SOLVED") and math.isfinite(best):
        value = max(best - _MIP_TOLERANCE * max(1.0, abs(best)), 0.0)
    solver = mip.solver
    return PausedKvBound(
        value, name, solver.NumVariables(), solver.NumConstraints(), time.perf_counter() - started
    )


def _solve_with_scip(solver: pywraplp.Solver, time_limit: float) -> tuple[str, float]:
    """SCIP through pywraplp: its best bound is readable only once it holds a solution."""
    solver.SetTimeLimit(max(int(time_limit * 1000), 1))
    status = solver.Solve()
    if status == pywraplp.Solver.INFEASIBLE:
        return "INFEASIBLE", math.nan
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return "NOT_SOLVED", math.nan
    return ("OPTIMAL" if status == pywraplp.Solver.OPTIMAL else "FEASIBLE"), solver.Objective().BestBound()


def _solve_with_highs(solver: pywraplp.Solver, time_limit: float) -> tuple[str, float]:
    """HiGHS through MathOpt: pywraplp's HiGHS reports nothing once the time limit stops it, MathOpt reports
    HiGHS's dual bound whether or not a solution was found."""
    result = mathopt.solve(
        _mathopt_model(solver),
        mathopt.SolverType.HIGHS,
        params=mathopt.SolveParameters(time_limit=timedelta(seconds=time_limit)),
    )
    reason = result.termination.reason
    if reason == mathopt.TerminationReason.INFEASIBLE:
        return "INFEASIBLE", math.nan
    names = {mathopt.TerminationReason.OPTIMAL: "OPTIMAL", mathopt.TerminationReason.FEASIBLE: "FEASIBLE"}
    return names.get(reason, "NOT_SOLVED"), result.termination.objective_bounds.dual_bound


def _mathopt_model(solver: pywraplp.Solver) -> mathopt.Model:
    """The pywraplp model, copied through its proto at full precision (its MPS export prints 6 significant
    digits: rounded time rows cut off the very schedules they were written for, and made a tested window
    infeasible)."""
    proto = linear_solver_pb2.MPModelProto()
    solver.ExportModelToProto(proto)
    model = mathopt.Model()
    variables = [
        model.add_variable(lb=v.lower_bound, ub=v.upper_bound, is_integer=v.is_integer)
        for v in proto.variable
    ]
    for row in proto.constraint:
        constraint = model.add_linear_constraint(lb=row.lower_bound, ub=row.upper_bound)
        for i, coefficient in zip(row.var_index, row.coefficient, strict=True):
            constraint.set_coefficient(variables[i], coefficient)
    model.objective.is_maximize = False
    model.objective.offset = proto.objective_offset
    for variable, source in zip(variables, proto.variable, strict=True):
        if source.objective_coefficient:
            model.objective.set_linear_coefficient(variable, source.objective_coefficient)
    return model


@dataclass(slots=True)
class PausedKvMip:
    solver: pywraplp.Solver
    ended: list  # E per key time
    evicted: dict  # request id -> its eviction binary
    idle: dict  # (request id, interval) -> the batches it sits out there while alive


def build_paused_kv_mip(
    window: Window,
    cost: LinearCostModel,
    deadlines: Deadlines,
    capacity: TimeCapacityBound,
    max_keys_apart: int | None = None,
    max_keys: int | None = None,
    solver_name: str = "SCIP",
) -> PausedKvMip:
    """The MIP of the module docstring, objective set, not solved."""
    solver = pywraplp.Solver.CreateSolver(solver_name)
    model = build_capacity_model(solver, window, cost, deadlines, max_keys_apart, max_keys)
    keys, ended, emitted = model.keys, model.ended, model.emitted
    last = len(keys) - 1
    infinity = solver.infinity()
    constraint = model.constraint
    shortest_batch = cost.a + cost.b
    most = [math.floor((keys[j + 1] - keys[j]) / shortest_batch) + 2 for j in range(last)]
    for j in range(last):
        constraint(-infinity, most[j], {ended[j + 1]: 1, ended[j]: -1})
    for e in ended:
        e.SetInteger(True)

    # paused[j]: the blocks held by requests sitting out the batches ending in (k_j, k_j+1], summed.
    paused: list[dict] = [{} for _ in range(last)]
    recompute: dict = {}
    mip = PausedKvMip(solver, ended, {}, {})
    for r in window.requests:
        rem, row = r.remaining_outputs, emitted[r.request_id]
        if rem < 2 or all(isinstance(x, int) for x in row):
            continue
        started_by = [_indicator(solver, constraint, x, rem, first=True) for x in row]
        finished_by = [_indicator(solver, constraint, x, rem, first=False) for x in row]
        for flags in (started_by, finished_by):
            for k in range(1, len(flags)):
                if not isinstance(flags[k], int) and not isinstance(flags[k - 1], int):
                    constraint(0, infinity, {flags[k]: 1, flags[k - 1]: -1})
        evicted = solver.BoolVar("")
        recompute[evicted] = recompute_batch_equivalents(r.target_tokens, cost)
        mip.evicted[r.request_id] = evicted
        held = paused_blocks(r, window.limits)
        for j in range(last):
            if (isinstance(started_by[j], int) and started_by[j] == 0) or (
                isinstance(finished_by[j + 1], int) and finished_by[j + 1] == 1
            ):
                continue  # not alive over the whole interval in any schedule
            idle = solver.NumVar(0, infinity, "")
            # idle - D_j + dx + M * (s - f - v) >= -M, the fixed parts moved right.
            terms: dict = {idle: 1.0, ended[j + 1]: -1.0, ended[j]: 1.0, evicted: float(most[j])}
            fixed = 0.0
            for var, coefficient in (
                (row[j + 1], 1.0),
                (row[j], -1.0),
                (started_by[j], -float(most[j])),
                (finished_by[j + 1], float(most[j])),
            ):
                if isinstance(var, int):
                    fixed += coefficient * var
                else:
                    terms[var] = terms.get(var, 0.0) + coefficient
            constraint(-most[j] - fixed, infinity, terms)
            paused[j][idle] = float(held)
            mip.idle[r.request_id, j] = idle
    area = [solver.NumVar(0, 0 if k == 0 else infinity, f"P{k}") for k in range(last + 1)]
    for j in range(last):
        constraint(0, 0, {area[j + 1]: 1.0, area[j]: -1.0, **{v: -h for v, h in paused[j].items()}})

    kv = KvRows(window, emitted, ended, model.arrival_key, model.finish_key)
    pairs = {(k, k2): q for k, k2, q in capacity.kv_rows}
    first_block = np.zeros(len(kv.rids), dtype=int)
    for k in range(last):  # besides the LP's: each key interval, and the prefixes and suffixes of the window
        for pair in ((k, k + 1), (k, last), (0, k + 1)):
            pairs.setdefault(pair, first_block)
    for (k, k2), q in pairs.items():
        row = kv._add_row(solver, constraint, k, k2, q)
        row.SetCoefficient(area[k2], 1.0)
        row.SetCoefficient(area[k], -1.0)

    objective = solver.Objective()
    objective.SetCoefficient(ended[last], 1.0)
    for var, weight in recompute.items():
        objective.SetCoefficient(var, weight)
    objective.SetMinimization()
    return mip


def _indicator(solver, constraint, emitted, remaining: int, first: bool):
    """s (first: at least one token emitted) or f (all emitted) for an emitted count: an int where the count
    is fixed, else a binary tied to it."""
    if isinstance(emitted, int):
        return int(emitted >= 1) if first else int(emitted >= remaining)
    flag = solver.BoolVar("")
    if first:  # x >= s and x <= rem * s
        constraint(0, solver.infinity(), {emitted: 1, flag: -1})
        constraint(-solver.infinity(), 0, {emitted: 1, flag: -remaining})
    else:  # x >= rem * f and x <= rem - 1 + f
        constraint(0, solver.infinity(), {emitted: 1, flag: -remaining})
        constraint(-solver.infinity(), remaining - 1, {emitted: 1, flag: -1})
    return flag
