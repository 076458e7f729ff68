"""Lower bounds that scale to windows of any size: relaxations valid for every schedule the verifier accepts.

Every schedule, however it chunks, pauses, evicts or idles, must (per request) emit each remaining token in a
batch of its own, in which the request holds ceil((target + t) / block_size) blocks and attends target + t
KV tokens, and must process its prompt once. Summing what that alone costs gives the bound:
  * batches: at least the longest request's remaining tokens, and at least the block-batches all requests
    need over the KV capacity (and the token and sequence totals over the budget and the cap);
  * b*T + c*K + d*P + e*R: each request's own tokens, attention over its own context, for a prefill split into
    chunks the cheapest the d term could be made by any chunking (see `prefill_extra_bound`), and one
    request-in-batch (e) per emission;
  * latency: a request alone on the engine, from the later of its arrival and the window start.
Under deadlines (`Deadlines`: latency SLOs, or the engine's own times) the batch count is raised further: the
requests that arrive at or after s and must finish by t hold every one of their batches inside [s, t], so
batches in disjoint intervals are distinct batches (a batch has a positive duration), and the bound is the best
sum over disjoint intervals (`deadline_min_batches`). O(total tokens), plus O(n log n) for the deadlines; no
solver. CP-SAT's bound is usually much tighter; this one is for windows too large for it.

Deadlines also bound the batches that *fit*: a busy window leaves no time to spare, so requests whose intervals
overlap must share batches only as far as time allows. `time_capacity_batches` is a linear programme over the
window's key times (the start, arrivals, finish deadlines): per key time, how many batches have ended by then
and how many have started, and per request how many tokens it has emitted by then; every interval from an
arrival to a deadline must hold the batches that lie wholly inside it, each at least `a` plus the work of the
tokens in it. It holds for every schedule that meets the deadlines (pausing, chunking and evictions included)
and usually proves what CP-SAT's per-batch time layer cannot on a busy window. Where memory binds, rows for the
KV capacity between key times join it as cutting planes (only those its solution violates: all of them at once
are too many for GLOP).
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field

import numpy as np
from ortools.linear_solver import pywraplp

from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.problem import Objective, Window, WindowRequest, cdiv
from vllm_shadow.solver.schedule import Deadlines


@dataclass(frozen=True, slots=True)
class RelaxationBound:
    batches: int  # fewest batches any schedule needs
    gpu_seconds: float
    mean_e2e: float
    mean_ttft: float  # nan when no request emits its first token in the window

    def objective(self, objective: Objective) -> float:
        return objective.value(self.gpu_seconds, self.mean_e2e, self.mean_ttft)


def _sum_range(lo: int, hi: int) -> int:
    """lo + (lo + 1) + ... + hi (0 when hi < lo)."""
    return (lo + hi) * (hi - lo + 1) // 2 if hi >= lo else 0


def prefill_extra_bound(request: WindowRequest, cost: LinearCostModel) -> float:
    """The least the prefill's chunks other than the emitting one (c*K) and its d*P can cost, over every
    chunking: a chunk token at position tau pays at least c*tau alone (1-token chunk) or d*tau (longer chunk),
    except in the emitting chunk, whose c*target is counted with the emissions. 0 when d = 0."""
    return min(cost.c, cost.d) * _sum_range(request.computed_tokens + 1, request.target_tokens - 1)


def single_batch_prefill_extra(request: WindowRequest, cost: LinearCostModel) -> float:
    """What the same terms cost when the prefill runs in one batch (the CP-SAT model's form)."""
    chunk = request.target_tokens - request.computed_tokens
    return cost.d * chunk * request.target_tokens if chunk > 1 else 0.0


def chunking_slack(window: Window, cost: LinearCostModel) -> float:
    """The most GPU time any chunking of the window's prefills could save over single-batch prefills."""
    return sum(single_batch_prefill_extra(r, cost) - prefill_extra_bound(r, cost) for r in window.requests)


def request_work_seconds(request: WindowRequest, cost: LinearCostModel) -> float:
    """b*T + c*K + d*P + e*R the request adds to the batches it runs in, at the least: own tokens, own context
    at each emission, the cheapest prefill chunking, and one batch per emission."""
    target, remaining = request.target_tokens, request.remaining_outputs
    tokens = target - request.computed_tokens + remaining - 1
    attended = _sum_range(target, target + remaining - 1)
    return cost.b * tokens + cost.c * attended + prefill_extra_bound(request, cost) + cost.e * remaining


def _block_area(request: WindowRequest, block_size: int) -> int:
    """The KV block-batches of a request's emissions: blocks(target + t) summed over its remaining outputs."""
    first = request.target_tokens
    return _sum_cdiv(first + request.remaining_outputs - 1, block_size) - _sum_cdiv(first - 1, block_size)


def _sum_cdiv(m: int, block_size: int) -> int:
    """cdiv(1, b) + ... + cdiv(m, b) in closed form (0 for m <= 0): the q full runs of b equal values 1..q,
    then the r values past them at q + 1. The live shadow bounds every window, and the sum token by token was
    most of its time."""
    if m <= 0:
        return 0
    q, r = divmod(m, block_size)
    return block_size * q * (q + 1) // 2 + r * (q + 1)


@dataclass(frozen=True, slots=True)
class _Columns:
    """A window's requests as numpy columns (window order): what the bounds read of them, walked once per window
    (`_columns`) instead of once per request per bound in Python, which was a third of the live shadow's
    evaluation. Entry i is what the per-request definitions above give for request i."""

    ids: tuple[str, ...]
    arrival: np.ndarray  # float64
    computed: np.ndarray  # int64, as the rest
    target: np.ndarray
    remaining: np.ndarray
    tokens: np.ndarray  # peak_tokens - computed_tokens: what it still processes
    area: np.ndarray  # `_block_area`
    fresh: np.ndarray  # bool: nothing generated yet (its first token is in the window)
    # Their sums, which every bound of the window reads (ints).
    longest: int  # the most remaining outputs
    area_total: int
    remaining_total: int
    tokens_total: int


def _columns(window: Window) -> _Columns:
    """The window's `_Columns`, from its memo once computed (the live shadow bounds a window twice)."""
    columns = window.memo.get(_Columns)
    if columns is not None:
        return columns
    requests = window.requests
    # A list per field: numpy reads flat lists of ints much faster than a list of tuples.
    prompt = np.array([r.prompt_tokens for r in requests], dtype=np.int64)
    output = np.array([r.output_tokens for r in requests], dtype=np.int64)
    computed = np.array([r.computed_tokens for r in requests], dtype=np.int64)
    generated = np.array([r.generated_tokens for r in requests], dtype=np.int64)
    target = prompt + generated
    remaining = output - generated
    tokens = prompt + output - 1 - computed
    block_size = window.limits.block_size
    # Both ends of each request's sum in one array: half the numpy calls of two.
    ends = _sum_cdiv_array(np.concatenate((target + remaining - 1, target - 1)), block_size)
    area = ends[: len(requests)] - ends[len(requests) :]
    columns = _Columns(
        ids=tuple([r.request_id for r in requests]),
        arrival=np.array([r.arrival for r in requests], dtype=np.float64),
        computed=computed,
        target=target,
        remaining=remaining,
        tokens=tokens,
        area=area,
        fresh=generated == 0,
        longest=int(remaining.max(initial=0)),
        area_total=int(area.sum()),
        remaining_total=int(remaining.sum()),
        tokens_total=int(tokens.sum()),
    )
    window.memo[_Columns] = columns
    return columns


# The array forms are called only where a window's requests guarantee their ranges (computed < target, at
# least one output to go), which spares them the cases that need a np.where.


def _sum_range_array(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """`_sum_range` of each pair, hi >= lo - 1 (the empty range's product is 0)."""
    return (lo + hi) * (hi - lo + 1) // 2


def _sum_cdiv_array(m: np.ndarray, block_size: int) -> np.ndarray:
    """`_sum_cdiv` of each entry, m >= 0 (0 gives q = r = 0)."""
    q, r = np.divmod(m, block_size)
    q1 = q + 1
    return block_size * q * q1 // 2 + r * q1


def _prefill_extra_array(columns: _Columns, cost: LinearCostModel) -> np.ndarray:
    """`prefill_extra_bound` of each request."""
    return min(cost.c, cost.d) * _sum_range_array(columns.computed + 1, columns.target - 1)


def _work_seconds_array(columns: _Columns, cost: LinearCostModel, prefill_extra: np.ndarray) -> np.ndarray:
    """`request_work_seconds` of each request (`prefill_extra`: `_prefill_extra_array`): the same operations
    in the same order, so the same floats."""
    target, remaining = columns.target, columns.remaining
    tokens = target - columns.computed + remaining - 1
    attended = _sum_range_array(target, target + remaining - 1)
    return cost.b * tokens + cost.c * attended + prefill_extra + cost.e * remaining


def min_batches(window: Window, deadlines: Deadlines | None = None) -> int:
    limits = window.limits
    columns = _columns(window)
    unconstrained = max(
        columns.longest,
        cdiv(columns.area_total, limits.kv_blocks),
        cdiv(columns.remaining_total, limits.max_num_seqs),
        cdiv(columns.tokens_total, limits.max_num_batched_tokens),
    )
    if deadlines is None or not deadlines.finish:
        return unconstrained
    return max(unconstrained, _deadline_min_batches(window, deadlines, columns))


def deadline_min_batches(window: Window, deadlines: Deadlines) -> int:
    """The most batches that disjoint time intervals force: interval [s, t] holds every batch of the requests
    that arrive at or after s (or the window start) and must finish by t, at least as many as the longest of
    them emits and as their KV block-batches over the capacity (token and sequence totals likewise). Dynamic
    programming over t in deadline order: best(t) = max(best(earlier t), best(up to s) + forced(s, t))."""
    return _deadline_min_batches(window, deadlines, _columns(window))


def _deadline_min_batches(window: Window, deadlines: Deadlines, columns: _Columns) -> int:
    """`deadline_min_batches` from the window's `_Columns`, in O(n log n) (`_Staircase`) instead of the
    programme's O(n^2) pairs of start and end: the live shadow bounds every window under deadlines.

    A maximum distributes over the terms of forced(s, t): best(up to s) + the longest request is best at the
    latest start that holds it, its own arrival; for a total over its limit L, best + ceil(total / L) is
    ceil((total + L * best) / L), whose best start is that of the largest total + L * best, which a
    `_Staircase` per total keeps as the ends go by. Where a request is due by its own arrival its interval
    holds no start whose best count is known by its end: `_deadline_min_batches_by_end` counts those windows."""
    limits = window.limits
    area, longest, tokens = columns.area, columns.remaining, columns.tokens
    sums = (columns.area_total, columns.remaining_total, columns.tokens_total)
    try:
        due = list(map(deadlines.finish.__getitem__, columns.ids))
    except KeyError:  # a request without a finish deadline is in no interval
        due = list(map(deadlines.finish.get, columns.ids))
        chosen = np.array([t is not None for t in due])
        if not chosen.any():
            return 0
        due = [t for t in due if t is not None]
        area, longest, tokens = area[chosen], longest[chosen], tokens[chosen]
        sums = (int(area.sum()), int(longest.sum()), int(tokens.sum()))
        arrival = np.maximum(columns.arrival[chosen], window.start)
    else:
        arrival = np.maximum(columns.arrival, window.start)
    due_at = np.array(due)
    # A total within its limit forces at most one batch, which every request's own emissions force already.
    totals = [
        (values, limit)
        for values, total, limit in zip(
            (area, longest, tokens),
            sums,
            (limits.kv_blocks, limits.max_num_seqs, limits.max_num_batched_tokens),
            strict=True,
        )
        if total > limit
    ]
    if (due_at <= arrival).any():
        return _deadline_min_batches_by_end(arrival, due_at, longest, totals)
    # Starts are the arrivals in time order (a start's best count is known once the ends before it are done);
    # a request's is the last at its time, so that it counts in every start that ties with it.
    starts = np.sort(arrival)
    start_of = np.searchsorted(starts, arrival, side="right") - 1
    order = np.argsort(due_at, kind="stable")
    due_at = due_at[order]
    stairs = [(_Staircase(limit), values[order].tolist()) for values, limit in totals]
    best_before = [0] * len(starts)  # the best count over the ends before each start, once they are done
    value = opened = 0
    # Per request in due order, the starts before its end (all at once, not a search each): where that is
    # more than are open, the ends before it are done (its end is later than theirs) and the starts past the
    # open ones open at the best count so far. A staircase's forced count only grows (amounts add to its
    # values and a start that falls out leaves a higher one on top), so the best count takes it only there.
    opens = np.searchsorted(starts, due_at, side="left")
    rows = zip(opens.tolist(), start_of[order].tolist(), longest[order].tolist(), strict=True)
    for i, (now_open, k, remaining) in enumerate(rows):
        if now_open > opened:
            for stair, _ in stairs:
                forced = -(-stair.top // stair.limit)
                if forced > value:
                    value = forced
            best_before[opened:now_open] = [value] * (now_open - opened)
            for stair, _ in stairs:  # the first of them is as high as the rest, and earlier
                stair.open(opened, value)
            opened = now_open
        if best_before[k] + remaining > value:  # comparisons, not max(): a call per request was much of it
            value = best_before[k] + remaining
        for stair, amounts in stairs:
            stair.add(k, amounts[i])
    for stair, _ in stairs:
        value = max(value, cdiv(stair.top, stair.limit))
    return value


class _Staircase:
    """max over starts s of total(s) + L * best(s), as the ends go by: total(s) sums a per-request amount over
    the requests due so far that arrive at or after s (`add`: the starts up to its arrival gain its amount),
    best(s) is the best count over the ends before s (`open`: fixed once they are done; a start is opened
    only then, and until then no request due arrives at or after it, so it would count best(s) alone).

    A start s with an earlier one at least as high never leads again: every later amount raises the earlier
    one as much. The staircase keeps the others, left to right, as `gaps` between successive values (each
    positive) and the `top` value, the maximum: an amount lowers one gap, and where that reaches 0 the
    start past it falls out, its gap merging into the next."""

    __slots__ = ("at", "gaps", "limit", "top")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.at: list[int] = []  # the starts kept (their indices in time order)
        self.gaps: list[int] = []  # value of at[j + 1] - value of at[j]
        self.top = 0  # value of at[-1]

    def open(self, start: int, best: int) -> None:
        """Start `start`, later than every one opened, at best count `best` (no amount reaches it yet)."""
        value = self.limit * best
        if not self.at or value > self.top:
            if self.at:
                self.gaps.append(value - self.top)
            self.at.append(start)
            self.top = value

    def add(self, start: int, amount: int) -> None:
        """`amount` more for every start up to `start` (opened: at or after the first start opened)."""
        at, gaps = self.at, self.gaps
        if start >= at[-1]:  # most requests: arrived after the last start kept
            self.top += amount
            return
        j = bisect.bisect_right(at, start) - 1  # the first start opened is never dropped: j >= 0
        gaps[j] -= amount
        while gaps[j] <= 0:  # at[j + 1] is no higher than at[j] now, nor ever again
            if j + 1 == len(at) - 1:
                self.top -= gaps[j]
                del gaps[j], at[j + 1]
                return
            gaps[j] += gaps[j + 1]
            del gaps[j + 1], at[j + 1]


def _deadline_min_batches_by_end(
    arrival: np.ndarray, due: np.ndarray, longest: np.ndarray, totals: list[tuple[np.ndarray, int]]
) -> int:
    """The programme one end at a time, for windows where a request is due by its own arrival (no schedule
    meets them; the count is the programme's all the same): at each end, the requests due by it, latest arrival
    first, every prefix's forced batches plus the best count over the ends before its start (0 for an end
    not done yet: the request's own and later ones)."""
    ends = np.unique(due)
    best = np.zeros(len(ends), dtype=np.int64)
    for k, end in enumerate(ends):
        inside = np.flatnonzero(due <= end)
        order = inside[np.argsort(-arrival[inside], kind="stable")]
        forced = np.maximum.accumulate(longest[order])
        for values, limit in totals:
            forced = np.maximum(forced, -(-np.cumsum(values[order]) // limit))
        before = np.searchsorted(ends, arrival[order], side="right") - 1
        earlier = np.where(before >= 0, best[before], 0)
        best[k] = max(best[k - 1] if k else 0, int((earlier + forced).max()))
    return int(best[-1])


def relaxation_bound(
    window: Window,
    cost: LinearCostModel,
    deadlines: Deadlines | None = None,
    least_batches: int = 0,
    least_schedule_seconds: float = 0.0,
) -> RelaxationBound:
    """Holds for every schedule (that meets `deadlines`, when given: they raise the batch count), and for every
    schedule that needs at least `least_batches` batches (a count proven elsewhere: `time_capacity_batches`)
    and at least `least_schedule_seconds` of a * batches plus recompute (`vllm_shadow.solver.paused_kv`)."""
    batches = max(min_batches(window, deadlines), least_batches)
    work, mean_e2e, mean_ttft = _work_and_latency(window, cost)
    return RelaxationBound(
        batches=batches,
        gpu_seconds=max(cost.a * batches, least_schedule_seconds) + work,
        mean_e2e=mean_e2e,
        mean_ttft=mean_ttft,
    )


def _work_and_latency(window: Window, cost: LinearCostModel) -> tuple[float, float, float]:
    """`relaxation_bound`'s terms that do not depend on the batch count: the requests' summed work, mean e2e
    and mean TTFT; from the window's memo once computed for `cost` (the live shadow bounds a window twice)."""
    key = (_work_and_latency, cost)
    terms = window.memo.get(key)
    if terms is not None:
        return terms
    columns = _columns(window)
    prefill_extra = _prefill_extra_array(columns, cost)
    work = _work_seconds_array(columns, cost, prefill_extra)
    wait = np.maximum(window.start - columns.arrival, 0.0)
    e2e = (wait + (cost.a * columns.remaining + work)).tolist()
    # Every request's, then the fresh ones' taken: each element the same operations as on the fresh alone.
    chunk = columns.target - columns.computed
    ttft = (wait + cost.a + cost.b * chunk + cost.c * columns.target + prefill_extra + cost.e)[
        columns.fresh
    ].tolist()
    # Sums as Python's sum() adds, one term after another in window order (numpy's pairwise sums may differ
    # in the last bits, and the shadow's exported bounds must not change).
    terms = (
        sum(work.tolist()),
        sum(e2e) / len(e2e) if e2e else math.nan,
        sum(ttft) / len(ttft) if ttft else math.nan,
    )
    window.memo[key] = terms
    return terms


# The LP is solved in floating point: its value is rounded up only past this relative tolerance.
_LP_TOLERANCE = 1e-6
# Batches a round of KV rows must add to the LP's value for another round to run: on a degenerate optimum
# rows violated by a hair kept coming for the whole time limit without moving it.
_KV_ROUND_PROGRESS = 0.01


@dataclass(frozen=True, slots=True)
class TimeCapacityBound:
    batches: int  # fewest batches any schedule meeting the deadlines needs (0: nothing proven)
    variables: int
    constraints: int
    seconds: float
    kv_rounds: int = 0  # rounds of KV rows added (cutting planes)
    # The KV rows added, (k, k', q per request): a MIP over the same keys (`vllm_shadow.solver.paused_kv`)
    # starts from them.
    kv_rows: tuple = field(default=(), compare=False, repr=False)


def time_capacity_batches(
    window: Window,
    cost: LinearCostModel,
    deadlines: Deadlines,
    time_limit: float = 60.0,
    max_keys_apart: int | None = None,
    max_keys: int | None = None,
    kv_cut_rounds: int = 50,
) -> TimeCapacityBound:
    """Fewest batches of any schedule meeting `deadlines`, from the linear programme over key times (see the
    module docstring). At key time k (sorted: the window start, arrivals, finish deadlines):
      * E[k] batches have ended by it, S[k] have started before it: E[k] <= S[k] <= E[k] + 1 (batches take
        positive time and do not overlap), both non-decreasing;
      * request i has emitted x[i,k] tokens in batches ended by it: 0 before its arrival, all of its remaining
        ones by its finish deadline, at least one by (the key at or after) its first-token deadline, at most one
        per batch (x[i,k] - x[i,k-1] <= E[k] - E[k-1]); in batches started before k, at most x[i,k] plus the
        one batch then running;
      * the batches wholly inside [k, k'] (at least E[k'] - S[k]) hold at least x[i,k'] - x[i,k] - (S[k] - E[k])
        tokens of a request that arrived before k (all of them, from 0, if it arrived at k or later), each
        costing at least b + c * (its target) + e (b + e + c * (target + (remaining - 1) / 2) when it finishes by
        k': the chord of its growing context), and, if it also arrives at or after k, its whole prefill when it
        must emit its first token by k', else that prefill times x[i,k'] / remaining (a token emitted means the
        prefill ran inside); a request wholly inside costs at least `request_work_seconds`. Their
        time, a per batch plus that work, is at most k' - k. Intervals run from the start or an arrival to a
        deadline (first token or finish).
      * KV capacity (`KvRows`): the batches ending in (k, k'] hold the blocks of the tokens emitted in them,
        at most `kv_blocks` each; these rows are added lazily, the most violated first, for up to
        `kv_cut_rounds` rounds (0: none) or until a round raises the value by less than 0.01 batches, each
        round re-solving the LP (every round's value is a valid bound).
    The batch count is E at the last key (a request without a finish deadline is bounded only by the others).
    Nothing is proven (0) when the LP is not solved within `time_limit` seconds. `max_keys_apart` keeps only
    the intervals whose ends are at most that many key times apart (fewer constraints, a weaker but still
    valid bound: for windows of a thousand requests). `max_keys` keeps that many key times, evenly spread, with
    each arrival moved back and each deadline forward to a kept one (a request's interval only widens).
    """
    started = time.perf_counter()
    none = TimeCapacityBound(0, 0, 0, 0.0)
    if min(cost.a, cost.b, cost.c, cost.d, cost.e) < 0 or max(cost.a, cost.b) <= 0 or not deadlines.finish:
        return none  # batches must take positive time, and work must only add to it
    solver = pywraplp.Solver.CreateSolver("GLOP")
    model = build_capacity_model(solver, window, cost, deadlines, max_keys_apart, max_keys)
    ended, constraint = model.ended, model.constraint
    last = len(ended) - 1
    solver.Minimize(ended[last])
    kv = (
        KvRows(window, model.emitted, ended, model.arrival_key, model.finish_key)
        if kv_cut_rounds > 0
        else None
    )
    value, rounds = None, 0
    while True:
        remaining = time_limit - (time.perf_counter() - started)
        solver.SetTimeLimit(max(int(remaining * 1000), 1))
        if remaining <= 0 or solver.Solve() != pywraplp.Solver.OPTIMAL:
            break  # the last LP solved (fewer rows) still bounds every schedule
        # Rounds after the first solve with the dual simplex: with the KV rows added GLOP's primal took 2 s,
        # 11 s, 40 s on the conversation window at 1,200 s; the dual takes 7-8 s a round.
        solver.SetSolverSpecificParametersAsString("use_dual_simplex: true")
        stalled = value is not None and solver.Objective().Value() < value + _KV_ROUND_PROGRESS
        value = solver.Objective().Value()
        if (
            kv is None
            or stalled
            or rounds >= kv_cut_rounds
            or not kv.add_violated(solver, constraint, started + time_limit)
        ):
            break
        rounds += 1
    seconds = time.perf_counter() - started
    if value is None:
        return TimeCapacityBound(0, solver.NumVariables(), solver.NumConstraints(), seconds)
    batches = math.ceil(value - _LP_TOLERANCE * max(1.0, value))
    return TimeCapacityBound(
        max(batches, 0),
        solver.NumVariables(),
        solver.NumConstraints(),
        seconds,
        rounds,
        tuple(kv.rows) if kv is not None else (),
    )


@dataclass(slots=True)
class CapacityModel:
    """The time-capacity LP's variables on a solver (`build_capacity_model`): E (`ended`), S (`begun`) and x
    (`emitted`: per request and key time, an int where fixed, else a variable), over the sorted key times."""

    solver: pywraplp.Solver
    keys: list[float]
    ended: list
    begun: list
    emitted: dict[str, list]
    arrival_key: dict[str, int]
    finish_key: dict[str, int]

    def constraint(self, lower: float, upper: float, terms: dict):
        row = self.solver.Constraint(lower, upper)
        for var, coefficient in terms.items():
            row.SetCoefficient(var, coefficient)
        return row


def build_capacity_model(
    solver: pywraplp.Solver,
    window: Window,
    cost: LinearCostModel,
    deadlines: Deadlines,
    max_keys_apart: int | None = None,
    max_keys: int | None = None,
) -> CapacityModel:
    """The rows of `time_capacity_batches` but the KV ones, on `solver` (an LP, or a MIP that adds its own
    integer rows): the same keys and variables for the same arguments."""
    requests = window.requests
    start = window.start
    arrival = {r.request_id: max(r.arrival, start) for r in requests}
    finish = {
        r.request_id: deadlines.finish[r.request_id] for r in requests if r.request_id in deadlines.finish
    }
    first = {
        r.request_id: deadlines.first_token[r.request_id]
        for r in requests
        if r.generated_tokens == 0 and r.request_id in deadlines.first_token
    }
    keys = sorted({start, *arrival.values(), *finish.values()})
    if max_keys is not None and len(keys) > max(max_keys, 2):
        step = (len(keys) - 1) / (max(max_keys, 2) - 1)
        keys = sorted({keys[round(i * step)] for i in range(max(max_keys, 2))})
        arrival = {rid: keys[bisect.bisect_right(keys, t) - 1] for rid, t in arrival.items()}
        finish = {rid: keys[bisect.bisect_left(keys, t)] for rid, t in finish.items()}
    last = len(keys) - 1

    def at_or_after(t: float) -> int | None:
        k = bisect.bisect_left(keys, t)
        return k if k <= last else None

    model = CapacityModel(solver, keys, [], [], {}, {}, {})
    constraint = model.constraint
    infinity = solver.infinity()
    ended = [solver.NumVar(0, 0 if k == 0 else infinity, f"E{k}") for k in range(len(keys))]
    begun = [solver.NumVar(0, 0 if k == 0 else infinity, f"S{k}") for k in range(len(keys))]
    for k in range(len(keys)):
        constraint(0, 1, {begun[k]: 1, ended[k]: -1})
        if k:
            constraint(0, infinity, {ended[k]: 1, ended[k - 1]: -1})
            constraint(0, infinity, {begun[k]: 1, begun[k - 1]: -1})
    constraint(0, 0, {begun[last]: 1, ended[last]: -1})

    # emitted[rid][k]: an int where it is fixed (before the arrival, from the finish deadline on), else a var.
    emitted: dict[str, list] = {}
    arrival_key, finish_key = {}, {}
    for r in requests:
        rid, remaining = r.request_id, r.remaining_outputs
        arrival_key[rid] = bisect.bisect_left(keys, arrival[rid])
        finish_key[rid] = bisect.bisect_left(keys, finish[rid]) if rid in finish else last + 1
        first_key = at_or_after(first[rid]) if rid in first else None
        row: list = []
        for k in range(len(keys)):
            if k <= arrival_key[rid]:
                row.append(0)
            elif k >= finish_key[rid]:
                row.append(remaining)
            else:
                row.append(solver.NumVar(1 if first_key is not None and k >= first_key else 0, remaining, ""))
            if arrival_key[rid] < k <= finish_key[rid]:
                # One token per batch: x[k] - x[k-1] <= E[k] - E[k-1]; and x non-decreasing.
                terms: dict = {ended[k]: 1.0, ended[k - 1]: -1.0}
                fixed = 0.0
                for var, sign in ((row[k], -1.0), (row[k - 1], 1.0)):
                    if isinstance(var, int):
                        fixed += sign * var
                    else:
                        terms[var] = terms.get(var, 0.0) + sign
                constraint(-fixed, infinity, terms)
                if not isinstance(row[k], int) and not isinstance(row[k - 1], int):
                    constraint(0, infinity, {row[k]: 1, row[k - 1]: -1})
        emitted[rid] = row

    token_work = {r.request_id: cost.b + cost.c * r.target_tokens + cost.e for r in requests}
    # Tokens up to a request's last, their context growing: at least the mean context's (the work of tokens u..rem-1
    # is concave in u, so above its chord from u = 0 to u = rem).
    finishing_work = {
        r.request_id: cost.b + cost.e + cost.c * (r.target_tokens + (r.remaining_outputs - 1) / 2)
        for r in requests
    }
    whole_work = {r.request_id: request_work_seconds(r, cost) for r in requests}
    prefill_work = {
        r.request_id: cost.b * (r.target_tokens - r.computed_tokens - 1) + prefill_extra_bound(r, cost)
        for r in requests
    }
    first_key_of = {rid: at_or_after(t) for rid, t in first.items()}
    froms = sorted({0, *arrival_key.values()})
    tos = sorted(
        {k for k in finish_key.values() if k <= last} | {k for k in first_key_of.values() if k is not None}
    )
    for k in froms:
        for k2 in tos:
            if k2 <= k or (max_keys_apart is not None and k2 - k > max_keys_apart):
                continue
            terms = {ended[k2]: cost.a, begun[k]: -cost.a}
            fixed = 0.0
            running_share = 0.0  # work of one token of each request possibly in the batch running at k
            for r in requests:
                rid = r.request_id
                if arrival_key[rid] >= k2 or finish_key[rid] <= k:
                    continue  # not alive in (k, k']
                if arrival_key[rid] >= k and finish_key[rid] <= k2:
                    fixed += whole_work[rid]
                    continue
                w = token_work[rid]
                if finish_key[rid] <= k2:
                    w = finishing_work[rid]
                pairs = [(emitted[rid][k2], w)]
                if arrival_key[rid] >= k:
                    if first_key_of.get(rid) is not None and first_key_of[rid] <= k2:
                        fixed += prefill_work[rid]
                    else:  # a token emitted by k' means the prefill ran inside: min(1, x) >= x / remaining
                        pairs.append((emitted[rid][k2], prefill_work[rid] / r.remaining_outputs))
                else:
                    pairs.append((emitted[rid][k], -w))
                    running_share += w
                for var, coefficient in pairs:
                    if isinstance(var, int):
                        fixed += coefficient * var
                    else:
                        terms[var] = terms.get(var, 0.0) + coefficient
            if running_share:
                terms[begun[k]] -= running_share
                terms[ended[k]] = terms.get(ended[k], 0.0) + running_share
            # Slack of 1e-6 of the span (at least 1 us): a deadline computed as the sum of the very work charged
            # here leaves the engine's own schedule within GLOP's tolerances of the row, and GLOP then called
            # the LP infeasible (a hypothesis draw with e = 6e-8). A looser row only weakens the bound.
            span = keys[k2] - keys[k]
            constraint(-infinity, span - fixed + 1e-6 * max(span, 1.0), terms)
    model.ended, model.begun, model.emitted = ended, begun, emitted
    model.arrival_key, model.finish_key = arrival_key, finish_key
    return model


class KvRows:
    """KV capacity between key times, added to the LP lazily (cutting planes; all of them at once made GLOP run
    past its time limit on a 64-request window). The batches that end in (k, k'] number E[k'] - E[k] and each
    holds at most `kv_blocks` blocks, while request i emits x[i,k'] - x[i,k] tokens in them, its t-th remaining
    one in a batch where it holds blocks(target + t) (`_block_area` summed). That area, a function F of the
    emitted counts, is bounded below linearly for every integer schedule: F(v) - F(u) >= blocks(target) * (v -
    u) (each token's blocks at least the first one's), and when the request finishes inside the interval
    (v = remaining), F(rem) - F(u) >= F(rem) / rem * (rem - u) (concave in u: above its chord).
    Blocks grow with the context (a long output ends with many more blocks than its first token), so an
    interval it does not finish in gets the tightest of a family instead of the first one: F is convex, so
    F(v) - F(u) is convex in v and concave in u; its convex envelope over 0 <= u <= v <= rem is spanned by F's
    tangents on the edge u = 0 and zero on the diagonal u = v, giving for every token q
    F(v) - F(u) >= f(q) * (v - u) + (F(q) - q * f(q)) * (1 - u / rem), f(q) = F(q + 1) - F(q) its blocks
    (q = 0 is the first-block row; the row takes, per request, the q tightest at the LP's solution)."""

    def __init__(self, window: Window, emitted: dict, ended: list, arrival_key: dict, finish_key: dict):
        limits = window.limits
        self.kv_blocks = limits.kv_blocks
        self.emitted = emitted
        self.ended = ended
        keys = len(ended)
        self.rids = [r.request_id for r in window.requests]
        self.rem = np.array([r.remaining_outputs for r in window.requests], dtype=float)
        self.area = np.array([_block_area(r, limits.block_size) for r in window.requests], dtype=float)
        # cumulative[i, t]: F(t), the blocks of request i's first t remaining tokens (padded past rem with F(rem)).
        width = int(self.rem.max(initial=0)) + 1
        self.cumulative = np.zeros((len(self.rids), width + 1))
        for i, r in enumerate(window.requests):
            blocks = [limits.blocks(r.target_tokens + t) for t in range(r.remaining_outputs)]
            row = np.concatenate(([0.0], np.cumsum(blocks, dtype=float)))
            self.cumulative[i, : len(row)] = row
            self.cumulative[i, len(row) :] = row[-1]
        self.arrival_key = np.array([arrival_key[rid] for rid in self.rids])
        self.finish_key = np.array([finish_key[rid] for rid in self.rids])
        self.index = np.arange(keys)
        self.added: set[tuple[int, int, bytes]] = set()
        self.rows: list[tuple[int, int, np.ndarray]] = []

    def _values(self) -> tuple[np.ndarray, np.ndarray]:
        x = np.array(
            [
                [v if isinstance(v, int) else v.solution_value() for v in self.emitted[rid]]
                for rid in self.rids
            ],
            dtype=float,
        )
        return x, np.array([e.solution_value() for e in self.ended])

    def _area(self, k: int, x: np.ndarray) -> np.ndarray:
        """Per request (rows) and later key k' (columns): the area's lower bound for (k, k'] at `x`."""
        keys = self.index[None, :]
        alive = (self.arrival_key[:, None] < keys) & (self.finish_key[:, None] > k) & (keys > k)
        fresh = (k <= self.arrival_key)[:, None]  # emitted nothing by k
        done = keys >= self.finish_key[:, None]  # emitted everything by k'
        u, v = x[:, k : k + 1], x
        chord = np.divide(self.area, self.rem)[:, None] * (self.rem[:, None] - u)
        slope, offset, _ = self._envelope(np.broadcast_to(u, v.shape), v)
        lower = np.where(done, np.where(fresh, self.area[:, None], chord), slope * v + offset)
        return np.where(alive, lower, 0.0)

    def _tangent(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per request (rows) at token q (same shape): f(q) and F(q) - q * f(q) (<= 0: F is convex, F(0) = 0)."""
        rows = np.arange(len(self.rids))[:, None]
        at = self.cumulative[rows, q]
        blocks = self.cumulative[rows, q + 1] - at
        return blocks, at - q * blocks

    def _envelope(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tightest of a few envelope rows (see the class docstring) at emitted counts u <= v (requests x
        columns): its value is slope * v + offset at this u, and `q` the token it is taken at. Candidates: the
        first token, and the tokens at u, at the middle and just before v."""
        top = np.maximum(self.rem[:, None] - 1, 0).astype(int)
        candidates = [np.zeros_like(u, dtype=int)] + [
            np.clip(np.floor(t), 0, top).astype(int) for t in (u, (u + v) / 2, v - 1)
        ]
        best_value = best_q = None
        for q in candidates:
            blocks, offset = self._tangent(q)
            value = blocks * (v - u) + offset * (1 - u / np.maximum(self.rem[:, None], 1))
            if best_value is None:
                best_value, best_q = value, q
            else:
                better = value > best_value
                best_value, best_q = np.where(better, value, best_value), np.where(better, q, best_q)
        blocks, offset = self._tangent(best_q)
        rem = np.maximum(self.rem[:, None], 1)
        return blocks, offset * (1 - u / rem) - blocks * u, best_q

    def add_violated(self, solver, constraint, stop_at: float, most: int = 400) -> bool:
        """Add the `most` KV rows the LP's solution violates most (False: none is violated). The scan over key
        pairs is quadratic in the keys: past `stop_at` (perf_counter seconds) it keeps what it has found."""
        x, ended = self._values()
        found = []
        for k in range(len(self.ended) - 1):
            if time.perf_counter() > stop_at:
                break
            excess = self._area(k, x).sum(axis=0) - self.kv_blocks * (ended - ended[k])
            for k2 in np.flatnonzero(excess > 1e-3 * self.kv_blocks):
                if k2 > k:
                    found.append((excess[k2], k, int(k2)))
        found.sort(reverse=True)
        added = 0
        for _, k, k2 in found:
            if added >= most:
                break
            # A pair's row may be violated again at another token q: a row is its pair and its q's.
            q = self._envelope(x[:, k : k + 1], x[:, k2 : k2 + 1])[2][:, 0]
            if (k, k2, q.tobytes()) in self.added:
                continue
            self.added.add((k, k2, q.tobytes()))
            self.rows.append((k, k2, q))
            self._add_row(solver, constraint, k, k2, q)
            added += 1
        return added > 0

    def _add_row(self, solver, constraint, k: int, k2: int, q: np.ndarray):
        """The row for the batches ending in (k, k'] at tokens `q`; returns what `constraint` returns."""
        terms: dict = {self.ended[k2]: -float(self.kv_blocks), self.ended[k]: float(self.kv_blocks)}
        fixed = 0.0
        blocks, offset = (column[:, 0] for column in self._tangent(q[:, None]))
        for i, rid in enumerate(self.rids):
            if not (self.arrival_key[i] < k2 and self.finish_key[i] > k):
                continue
            row = self.emitted[rid]
            fresh, done = k <= self.arrival_key[i], k2 >= self.finish_key[i]
            if fresh and done:
                fixed += self.area[i]
                continue
            if done:
                slope = self.area[i] / self.rem[i]
                pairs = [(row[k2], slope), (row[k], -slope)]
            else:  # f(q) * (v - u) + (F(q) - q * f(q)) * (1 - u / rem)
                fixed += offset[i]
                pairs = [(row[k2], blocks[i]), (row[k], -blocks[i] - offset[i] / self.rem[i])]
            for var, coefficient in pairs:
                if isinstance(var, int):
                    fixed += coefficient * var
                else:
                    terms[var] = terms.get(var, 0.0) + coefficient
        return constraint(-solver.infinity(), -fixed, terms)
