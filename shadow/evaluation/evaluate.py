"""Evaluate one window: the self replay (fidelity), the candidate configurations, and the optimum.

Pure functions of a `TrafficWindow`, run as Ray tasks (or in any executor): no I/O, and no shared state but
the last self replay, which the fidelity check and the optimum of a window share within a process. Every
simulation starts from the engine state at the window start and serves the window's requests to completion;
latency is summarised over the window's own requests (those carried in have their first token in the past).

Fidelity is measured two ways. In step space the current configuration is replayed with each request fed
before the same engine step at which it really arrived, and the first steps are compared with the engine's
own, batch by batch (same requests, same token counts, same preemption victims). In time, the replay runs on
the cost model alone, and its per-request latencies are compared with what the engine delivered. Candidates
are compared with the time replay, on the same cost model, so that the model's error partly cancels.

The optimum is bounded twice (`solve_window_optimum`): with latency ignored, and at equal or better latency,
every request served no later than by the engine's configuration (or within the SLO). The second is the one an
operator can act on: the first counts savings made by delaying requests without limit.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.evaluation.candidates import current_policy
from vllm_shadow.evaluation.results import (
    ENGINE_LATENCY,
    NO_SLO,
    CandidateOutcome,
    Fidelity,
    LatencySummary,
    OptimalOutcome,
    Slo,
    WindowOptimum,
)
from vllm_shadow.evaluation.shared_runs import SharedRuns, one_priority
from vllm_shadow.evaluation.step_match import compare_steps
from vllm_shadow.solver.bounds import relaxation_bound
from vllm_shadow.solver.optimal import GPU_COST, slo_deadlines, solve_optimal
from vllm_shadow.solver.policies import Policy, parse_policy
from vllm_shadow.solver.problem import EngineLimits, Window, WindowRequest
from vllm_shadow.solver.records import SimResult
from vllm_shadow.solver.schedule import Deadlines, Schedule, schedule_from_steps
from vllm_shadow.solver.simulator import simulate
from vllm_shadow.tracking.windows import TrafficWindow

# ---- simulation -----------------------------------------------------------------------------------------------


def _fresh(window: TrafficWindow) -> list[RequestArrival]:
    return [*window.waiting, *window.arrivals]


def simulate_window(
    window: TrafficWindow,
    policy: Policy | str,
    *,
    step_space: bool = False,
    record_steps: bool = False,
    max_steps: int | None = None,
) -> SimResult:
    """Serve the window's requests from its start state under `policy`. In step space each request enters
    before the same engine step as it really did, and steps are recorded for comparison (in time too with
    `record_steps`); `max_steps` cuts the run short (`simulate`)."""
    arrival_steps = None
    if step_space:
        if window.arrival_steps is None:
            raise ValueError("a request-only window has no steps to replay against")
        arrival_steps = {r.request_id: 0 for r in window.waiting} | dict(window.arrival_steps)
    return simulate(
        _fresh(window),
        policy,
        window.cost,
        num_kv_blocks=window.info.num_kv_blocks,
        block_size=window.info.block_size,
        initial_running=window.running,
        start_time=0.0,
        record_steps=step_space or record_steps,
        arrival_steps=arrival_steps,
        initial_free_queue=window.free_queue,
        max_steps=max_steps,
    )


def candidate_outcome(
    window: TrafficWindow,
    label: str,
    result: SimResult,
    slo: Slo,
    *,
    keep_requests: bool = False,
    own: AbstractSet[str] | None = None,
) -> CandidateOutcome:
    """`result` summarised over the window's own requests (`own`: their ids, when the caller has them)."""
    if own is None:
        own = _own_ids(window)
    records = []
    preemptions = recomputed = queries = hits = 0
    for r in result.requests:  # one walk: every candidate of every window is summarised
        preemptions += r.preemptions
        recomputed += r.recomputed_tokens
        if r.request_id in own:
            records.append(r)
            if r.first_scheduled == r.first_scheduled:  # admitted: it looked its prompt up
                queries += r.prompt_tokens
            hits += r.num_cached_tokens
    return CandidateOutcome(
        label=label,
        gpu_seconds=result.gpu_seconds,
        latency=LatencySummary.of_records(records, slo),
        preemptions=preemptions,
        steps=result.num_steps,
        recomputed_tokens=recomputed,
        recompute_gpu_seconds=result.recompute_gpu_seconds,
        prefix_cache_queries=queries,
        prefix_cache_hits=hits,
        requests=tuple(records) if keep_requests else (),
    )


def _own_ids(window: TrafficWindow) -> frozenset[str]:
    return frozenset(r.request_id for r in window.arrivals)


def run_candidates(
    window: TrafficWindow, policies: Sequence[Policy | str], slo: Slo, *, keep_requests: bool = False
) -> list[CandidateOutcome]:
    """Simulate each policy on the window. A failing policy is reported, not raised: one bad candidate must
    not cost the window its other results. Policies that provably run the same steps as one simulated already
    (`SharedRuns`: a sequence cap, a token budget, chunked prefill or a long-prefill threshold whose tests the
    run passed at both settings; without preemptions, the other victim rule, and priority order where all
    priorities are equal), the self replay included when this process just ran it, take its outcome under their
    own label."""
    out = []
    own = _own_ids(window)
    shared = SharedRuns(same_priority=one_priority(window))
    parsed = [parse_policy(spec) for spec in policies]
    replay = _replay_in_process(window)
    if replay is not None:
        current = current_policy(window.info.scheduler)
        outcome = candidate_outcome(window, "", replay, slo, keep_requests=keep_requests, own=own)
        shared.add(current, outcome, replay.demands)
    for policy in parsed:
        label = str(policy)
        try:
            outcome = shared.get(policy, label)
            if outcome is None:
                result = simulate_window(window, policy)
                outcome = candidate_outcome(window, label, result, slo, keep_requests=keep_requests, own=own)
                shared.add(policy, outcome, result.demands)
            out.append(outcome)
        except (ValueError, RuntimeError, AssertionError) as exc:
            out.append(CandidateOutcome(label, math.nan, None, error=f"{type(exc).__name__}: {exc}"))
    return out


def _median_relative_error(pairs: Iterable[tuple[float, float]]) -> float:
    errors = [abs(sim - real) / real for sim, real in pairs if real > 0 and not math.isnan(sim + real)]
    return statistics.median(errors) if errors else math.nan


def check_fidelity(window: TrafficWindow, slo: Slo, *, keep_requests: bool = False) -> Fidelity:
    """Self replay of the engine's current configuration, in step space and in time."""
    current = current_policy(window.info.scheduler)
    timed = engine_replay(window)
    self_replay = candidate_outcome(window, str(current), timed, slo, keep_requests=keep_requests)
    observed = window.observed
    actual = LatencySummary.of_records(list(observed.values()), slo)
    replayed = {r.request_id: r for r in timed.requests if r.request_id in observed}
    ttft_error = _median_relative_error(
        (replayed[i].ttft, o.ttft) for i, o in observed.items() if i in replayed
    )
    e2e_error = _median_relative_error((replayed[i].e2e, o.e2e) for i, o in observed.items() if i in replayed)

    compared = matched = 0
    first_mismatch = ""
    gpu_error = math.nan
    if window.exact and window.steps:
        compared = len(window.steps)
        # Only the window's own steps are compared: the replay stops there instead of serving every request.
        simulated = simulate_window(window, current, step_space=True, max_steps=compared).steps or []
        comparison = compare_steps(window.steps, simulated)
        matched = comparison.matched
        first = comparison.first_mismatch
        first_mismatch = first.describe() if first is not None else ""
        measured = window.actual_gpu_seconds
        replayed_busy = math.fsum(s.duration for s in simulated)
        gpu_error = abs(replayed_busy - measured) / measured if measured > 0 else math.nan
    return Fidelity(compared, matched, first_mismatch, gpu_error, ttft_error, e2e_error, actual, self_replay)


# ---- the optimum ----------------------------------------------------------------------------------------------


def optimal_problem(window: TrafficWindow) -> Window:
    """The window as the optimal scheduler's problem: unlimited budget and sequence cap (they are settings,
    so the bound holds for every configuration the shadow could recommend), the engine's real KV capacity."""
    requests = [
        WindowRequest(
            r.request.request_id,
            r.request.time,
            r.request.prompt_tokens,
            r.request.output_tokens or 1,
            r.computed_tokens,
            r.generated_tokens,
        )
        for r in window.running
        if not r.finishing  # its last token in flight at the start: no work left
    ]
    requests += [
        WindowRequest(a.request_id, a.time, a.prompt_tokens, a.output_tokens or 1) for a in _fresh(window)
    ]
    limits = EngineLimits(kv_blocks=window.info.num_kv_blocks - 1, block_size=window.info.block_size)
    return Window(tuple(requests), limits, start=0.0)


# The deadlines of the constrained bound when no SLO is configured: every request served no later than by the
# engine's configuration. They come from the self replay on the calibrated cost model, not from the engine's
# measured times: the gap compares the bound with the self replay's busy time on that same model, and the
# self replay is then a schedule that meets them (measured times the model cannot reproduce would make the
# problem infeasible, or the bound a statement about the model's error).
# The simulator keeps time in whole picoseconds and the verifier in floats: the verifier's replay of the same
# schedule may end a request a few microseconds later. Deadlines this much later keep the engine's schedule in
# scope (looser deadlines only weaken the bound: it stays valid) without the verifier's replay of it, which
# costs several times the simulation on every window.
ENGINE_TIME_SLACK = 1e-4  # seconds


def engine_replay(window: TrafficWindow, *, record_steps: bool = False) -> SimResult:
    """The engine's configuration on the window: the self replay (with its steps, to hand CP-SAT as a hint).
    The fidelity check and the optimum's deadlines both need it: where both run in one process (the report,
    a thread pool, the benchmark), the second call of a window takes the first's result (`_LastReplay`)."""
    global _last_replay
    last = _last_replay
    if last is not None and last.window is window and last.record_steps == record_steps:
        _last_replay = None  # both uses are served: hold the window no longer
        return last.result
    result = simulate_window(window, current_policy(window.info.scheduler), record_steps=record_steps)
    _last_replay = _LastReplay(window, record_steps, result)
    return result


def _replay_in_process(window: TrafficWindow) -> SimResult | None:
    """The self replay of `window` (in time, without steps) if this process has it at hand, else None."""
    last = _last_replay
    if last is not None and last.window is window and not last.record_steps:
        return last.result
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class _LastReplay:
    """The last self replay this process ran. A simulation is a pure function of the window and the policy,
    so the same window object (compared by identity) replays the same; threads that interleave windows only
    miss, and simulate again."""

    window: TrafficWindow
    record_steps: bool
    result: SimResult


_last_replay: _LastReplay | None = None


def engine_deadlines_of(problem: Window, engine: SimResult) -> Deadlines:
    """Each request's first token (if it is still to come) and finish under the engine's configuration, plus
    `ENGINE_TIME_SLACK`. ValueError if the replay left a request of the problem unfinished."""
    records = {r.request_id: r for r in engine.requests}
    first, finish = {}, {}
    for request in problem.requests:
        record = records.get(request.request_id)
        if record is None or math.isnan(record.finish):
            raise ValueError(f"request {request.request_id} does not finish in the engine's replay")
        finish[request.request_id] = record.finish + ENGINE_TIME_SLACK
        if request.generated_tokens == 0:
            first[request.request_id] = record.first_token + ENGINE_TIME_SLACK
    return Deadlines(first, finish, ENGINE_LATENCY)


def window_deadlines(problem: Window, engine: Deadlines, slo: Slo) -> Deadlines:
    """Equal or better latency than the engine's configuration (`engine`, from `engine_deadlines_of`). With an
    SLO, no later than the SLO allows, or than the configuration served the request where that was later: the
    configuration's own schedule stays in scope, so the bound never claims a saving by a schedule that serves
    some request worse than today."""
    if not slo.defined:
        return engine
    target = slo_deadlines(problem, slo.ttft_seconds, slo.tpot_seconds)
    engine_first, engine_finish = engine.first_token, engine.finish
    # max(t, e) as a comparison (t unless e is later: the same value), without a call per request.
    first = {rid: e if (e := engine_first.get(rid, t)) > t else t for rid, t in target.first_token.items()}
    finish = {rid: e if (e := engine_finish.get(rid, t)) > t else t for rid, t in target.finish.items()}
    return Deadlines(first, finish, f"{target.source}, or the engine's configuration where it was later")


def _bound_outcome(
    problem: Window,
    cost: LinearCostModel,
    deadlines: Deadlines | None,
    *,
    solve: bool,
    time_limit: float,
    workers: int,
    hints: Mapping[str, Schedule] | None = None,
) -> OptimalOutcome:
    """CP-SAT's optimum and bound when `solve`, else (or when it finds no schedule) the relaxation bound."""
    started = time.perf_counter()
    latency = "none" if deadlines is None else deadlines.source
    if solve:
        try:
            result = solve_optimal(
                problem,
                cost,
                GPU_COST,
                time_limit=time_limit,
                workers=workers,
                hints=hints,
                deadlines=deadlines,
            )
        except ValueError:  # CP-SAT found no schedule in time and no hint was usable: the bound still holds
            pass
        else:
            return OptimalOutcome(
                "cp-sat",
                result.status,
                result.bound,
                result.objective,
                result.bound_scope,
                time.perf_counter() - started,
                latency,
            )
    bound = relaxation_bound(problem, cost, deadlines).gpu_seconds
    scope = "every schedule" + ("" if deadlines is None else f"; {deadlines.describe()}")
    return OptimalOutcome(
        "relaxation",
        "NO_SOLUTION" if solve else "BOUND",
        bound,
        math.nan,
        scope,
        time.perf_counter() - started,
        latency,
    )


def _at_least(
    constrained: OptimalOutcome, unconstrained: OptimalOutcome, deadlines: Deadlines
) -> OptimalOutcome:
    """A tighter problem never has a lower optimum: the unconstrained bound holds for the constrained schedules
    too (for those in both scopes), and is the better bound when the constrained solve proved less."""
    if unconstrained.bound_gpu_seconds <= constrained.bound_gpu_seconds:
        return constrained
    bound = unconstrained.bound_gpu_seconds
    if not math.isnan(constrained.best_gpu_seconds):
        bound = min(bound, constrained.best_gpu_seconds)
    return dataclasses.replace(
        constrained, bound_gpu_seconds=bound, scope=f"{unconstrained.scope}; {deadlines.describe()}"
    )


def solve_window_optimum(
    window: TrafficWindow,
    *,
    time_limit: float,
    max_requests: int,
    workers: int = 1,
    slo: Slo = NO_SLO,
    constrained_cp_sat: bool = False,
) -> WindowOptimum:
    """The GPU-time optimum of the window twice: with latency ignored, and at equal or better latency than the
    engine's configuration (or within `slo`; see `window_deadlines`).

    Unconstrained: CP-SAT's optimum and bound when the window is small enough to model in `time_limit`,
    otherwise the relaxation bound. Constrained, on every window: the relaxation bound under the deadlines
    (O(tokens), it holds for every schedule that meets them), raised to the unconstrained bound where that is
    higher; CP-SAT under the deadlines too only with `constrained_cp_sat` (each solve gets `time_limit`). At
    live time limits it seldom proves more than the relaxation (on the bundled vLLM streams at 0.5-1 s, never
    beyond 2-request windows) while building its model costs several times the limit; `shadow optimal --slo`
    is where the constrained optimum is proven."""
    problem = optimal_problem(window)
    if not problem.requests:
        empty = OptimalOutcome("relaxation", "EMPTY", 0.0, 0.0, "no requests", 0.0)
        return WindowOptimum(empty, dataclasses.replace(empty, latency=ENGINE_LATENCY))
    solve = len(problem.requests) <= max_requests
    unconstrained = _bound_outcome(
        problem, window.cost, None, solve=solve, time_limit=time_limit, workers=workers
    )
    solve_constrained = solve and constrained_cp_sat
    try:
        engine = engine_replay(window, record_steps=solve_constrained)
        deadlines = window_deadlines(problem, engine_deadlines_of(problem, engine), slo)
    except (ValueError, RuntimeError, AssertionError):
        return WindowOptimum(unconstrained, None)  # the replay failed: no deadlines to hold
    constrained = _bound_outcome(
        problem,
        window.cost,
        deadlines,
        solve=solve_constrained,
        time_limit=time_limit,
        workers=workers,
        # CP-SAT's hints are verified before use: the engine's schedule is one, if the verifier accepts it.
        hints={"engine's configuration": schedule_from_steps(engine.steps or [])},
    )
    return WindowOptimum(unconstrained, _at_least(constrained, unconstrained, deadlines))
