"""The optimal schedule as a CP-SAT model over runs of batches ("run model").

INFERMAX's CSP has variables per request and per batch. This model keeps the same rules with far fewer
variables by describing each request as at most `1 + max_evictions` *runs*: a run starts with one batch that
brings the request's KV to its target (the prompt, or the prompt plus its emitted tokens after a recompute
preemption) and emits a token, then decodes one token per batch, every batch, until the request finishes or is
evicted. A run is an interval on the axis of batch indices, and the KV it holds grows by one block every
`block_size` batches, so KV capacity is one cumulative constraint over fixed-offset block intervals; GPU
cost is `a * (number of batches) + (recompute cost)` plus a constant. The per-request term e*R of the cost
model is part of that constant: in the run form a request is in exactly one batch per token it emits (a
chunked prefill, outside the run form, only adds batches holding it). Batch times enter only when the
objective needs wall-clock time (latency terms) or requests have deadlines (`Deadlines`: latency SLOs, or the
engine's own times): then a per-batch time layer is added, and each request's first-token batch must end by
its first-token deadline and its last batch by its finish deadline.

What the run form leaves out, and why that loses nothing for GPU cost with d = 0 and no binding token budget
or sequence cap (the defaults: these are settings, not hardware; see `vllm_shadow.solver.optimal` for d > 0):
  * pausing a request that holds KV: moving its steps to the last batches before its finish, contiguously,
    keeps its finish and lowers its KV in every batch (its progress is behind the original's everywhere);
  * chunked prefill: merging a prefill's chunks into its last chunk's batch holds less KV earlier and lowers
    K (sum of context_after), never adding a batch.
  * idle time and arrivals: GPU cost does not depend on when batches run, and a schedule delayed past the
    last arrival is feasible.
For latency objectives, and under deadlines, the model is exact over schedules that never pause a running
request (vLLM's own discipline) and prefill in one batch; its bound is the bound over that class (with
deadlines, pausing can save KV by slowing a request down after its first token).

Integer costs: times are in ticks (`Scale.tick` seconds) and every coefficient is rounded down, so the model's
objective never exceeds the true cost of the schedule it describes: CP-SAT's bound stays a valid bound. The
time layer rounds the same way (batch times down, arrivals down, deadlines up: a relaxation, so the bound
holds), or with `conservative=True` the other way (times up, arrivals up, deadlines down), so that every
schedule the model admits meets its deadlines in floats too. The verifier recomputes the chosen schedule's
cost and times in floats.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ortools.sat.python import cp_model

from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.bounds import prefill_extra_bound, request_work_seconds, single_batch_prefill_extra
from vllm_shadow.solver.problem import Objective, Window, WindowRequest
from vllm_shadow.solver.schedule import Batch, Deadlines, Schedule

Runs = Mapping[str, Sequence[tuple[int, int]]]  # request id -> runs as (first batch index, batches)

STATUS_NAMES = {
    cp_model.OPTIMAL: "OPTIMAL",
    cp_model.FEASIBLE: "FEASIBLE",
    cp_model.INFEASIBLE: "INFEASIBLE",
    cp_model.UNKNOWN: "UNKNOWN",
    cp_model.MODEL_INVALID: "MODEL_INVALID",
}


@dataclass(frozen=True, slots=True)
class Scale:
    """Seconds per integer tick, and the integer weight of each objective term (rounded down)."""

    tick: float
    gpu: int
    e2e: int  # per request, on its finish time
    ttft: int  # per fresh request, on its first-token time
    per_unit: float  # objective seconds per unit of the integer objective
    conservative: bool = False  # the time layer rounds batch times up and deadlines down

    def ticks(self, seconds: float) -> int:
        return math.floor(seconds / self.tick + 1e-9)

    def duration_ticks(self, seconds: float) -> int:
        """A batch-time coefficient in the time layer: down (a relaxation), or up when conservative."""
        return math.ceil(seconds / self.tick - 1e-9) if self.conservative else self.ticks(seconds)

    def arrival_ticks(self, seconds: float) -> int:
        return max(self.duration_ticks(seconds), 0)

    def deadline_ticks(self, seconds: float) -> int:
        return self.ticks(seconds) if self.conservative else math.ceil(seconds / self.tick - 1e-9)


def choose_scale(window: Window, cost: LinearCostModel, objective: Objective) -> Scale:
    """A tick fine enough that the per-token coefficients survive rounding to integers (c, the smallest, to
    about 2%), and objective weights as integers with three significant digits of the smallest."""
    positive = [v for v in (cost.a / 1e4, cost.b / 100, cost.c / 50, cost.e / 100) if v > 0]
    tick = min(positive, default=1e-6)
    n = len(window.requests)
    fresh = max(sum(r.generated_tokens == 0 for r in window.requests), 1)
    per_unit_weights = [objective.gpu, objective.e2e / n, objective.ttft / fresh]
    smallest = min(w for w in per_unit_weights if w > 0)
    factor = 1000 / smallest
    gpu, e2e, ttft = (math.floor(w * factor + 1e-9) for w in per_unit_weights)
    return Scale(tick, gpu, e2e, ttft, tick / factor)


@dataclass(slots=True)
class _Run:
    present: cp_model.IntVar | int
    start: cp_model.IntVar
    length: cp_model.IntVar | int
    end: cp_model.IntVar
    emitted_before: cp_model.LinearExprT  # tokens the request emitted before this run (from the window start)
    target: cp_model.LinearExprT  # KV tokens after the run's first batch
    first_tokens: cp_model.LinearExprT  # tokens processed in the run's first batch


@dataclass(slots=True)
class RunModel:
    window: Window
    cost: LinearCostModel
    objective: Objective
    max_evictions: int
    horizon: int
    scale: Scale
    model: cp_model.CpModel
    runs: dict[str, list[_Run]]
    makespan: cp_model.IntVar
    timed: bool
    deadlines: Deadlines | None = None

    @property
    def num_variables(self) -> int:
        return len(self.model.proto.variables)

    @property
    def num_constraints(self) -> int:
        return len(self.model.proto.constraints)


@dataclass(frozen=True, slots=True)
class RunSolution:
    status: str
    runs: dict[str, list[tuple[int, int]]]  # empty unless a solution was found
    objective_units: float  # the model's objective (nan without a solution)
    bound_units: float
    wall_seconds: float


def recompute_extra(request: WindowRequest, emitted: int, cost: LinearCostModel) -> float:
    """Seconds a recompute run adds when it starts after the request emitted `emitted` tokens in the window:
    its first batch processes prompt + all emitted tokens instead of the one step it replaces."""
    target = request.target_tokens + emitted
    if emitted == 0 and request.computed_tokens < target - 1:  # replaces a prefill chunk, not a decode
        chunk = target - request.computed_tokens
        replaced_p = chunk * target if chunk > 1 else 0
        return cost.b * request.computed_tokens + cost.d * (target * target - replaced_p)
    return cost.b * (target - 1) + (cost.d * target * target if target > 1 else 0.0)


def baseline_seconds(request: WindowRequest, cost: LinearCostModel) -> float:
    """The request's share of b*T + c*K + d*P with a single-batch prefill and no preemption: a constant."""
    return (
        request_work_seconds(request, cost)
        - prefill_extra_bound(request, cost)
        + single_batch_prefill_extra(request, cost)
    )


def block_area(request: WindowRequest, block_size: int) -> int:
    """Block-batches the request needs at least: the batch emitting its t-th remaining token holds
    ceil((target + t) / block_size) blocks, whatever the schedule."""
    target = request.target_tokens
    return sum(-(-(target + t) // block_size) for t in range(request.remaining_outputs))


def build_run_model(
    window: Window,
    cost: LinearCostModel,
    objective: Objective,
    *,
    horizon: int,
    max_evictions: int = 1,
    scale: Scale | None = None,
    deadlines: Deadlines | None = None,
    conservative: bool = False,
) -> RunModel:
    """The run model of `window` over at most `horizon` batches, every request meeting `deadlines` if given
    (`conservative`: see the module docstring)."""
    if max_evictions < 0:
        raise ValueError("max_evictions must be >= 0")
    limits = window.limits
    longest = max(r.remaining_outputs for r in window.requests)
    if horizon < longest:
        raise ValueError(f"horizon {horizon} is shorter than the longest request ({longest} batches)")
    scale = scale or choose_scale(window, cost, objective)
    if conservative != scale.conservative:
        scale = dataclasses.replace(scale, conservative=conservative)
    model = cp_model.CpModel()
    makespan = model.new_int_var(longest, horizon, "batches")
    runs = {r.request_id: _request_runs(model, r, horizon, max_evictions, makespan) for r in window.requests}

    memory_intervals: list[cp_model.IntervalVar] = []
    memory_demands: list[cp_model.LinearExprT] = []
    for request in window.requests:
        for index, run in enumerate(runs[request.request_id]):
            _add_block_intervals(
                model, run, request, index, limits.block_size, horizon, memory_intervals, memory_demands
            )
    model.add_cumulative(memory_intervals, memory_demands, limits.kv_blocks)
    _add_batch_limits(model, window, runs)
    # Redundant, for the LP relaxation: every token's step holds its blocks in some batch.
    area = sum(block_area(r, limits.block_size) for r in window.requests)
    model.add(limits.kv_blocks * makespan >= area)

    gpu_units = scale.ticks(cost.a) * makespan + _recompute_cost(model, window, cost, runs, scale)
    terms = [scale.gpu * gpu_units]
    timed = objective.needs_time or deadlines is not None
    if timed:
        terms.append(_time_layer(model, window, cost, runs, makespan, horizon, scale, deadlines))
    model.minimize(sum(terms))
    _break_symmetries(model, window, runs, timed, deadlines)
    return RunModel(
        window, cost, objective, max_evictions, horizon, scale, model, runs, makespan, timed, deadlines
    )


def _request_runs(
    model: cp_model.CpModel,
    request: WindowRequest,
    horizon: int,
    max_evictions: int,
    makespan: cp_model.IntVar,
) -> list[_Run]:
    rid, remaining = request.request_id, request.remaining_outputs
    runs: list[_Run] = []
    emitted: cp_model.LinearExprT = 0
    for k in range(max_evictions + 1):
        if max_evictions == 0:
            length: cp_model.IntVar | int = remaining
            present: cp_model.IntVar | int = 1
        else:
            # A running request may be evicted before the window's first batch: its first run is then empty.
            least = 1 if k == 0 and not request.running else 0
            length = model.new_int_var(least, remaining, f"len_{rid}_{k}")
            present = model.new_bool_var(f"run_{rid}_{k}")
            model.add(length >= 1).only_enforce_if(present)
            model.add(length == 0).only_enforce_if(present.negated())
        # An empty run may sit at the horizon; a non-empty one ends by the makespan.
        start = model.new_int_var(0, horizon, f"start_{rid}_{k}")
        end = model.new_int_var(0, horizon, f"end_{rid}_{k}")
        model.add(end == start + length)
        model.add(end <= makespan)
        if k == 0:
            if request.running:  # a running request keeps running (or is evicted at once)
                model.add(start == 0)
            first_tokens: cp_model.LinearExprT = request.target_tokens - request.computed_tokens
        else:
            previous = runs[-1]
            model.add(start >= previous.end)
            if max_evictions:
                model.add(start == previous.end).only_enforce_if(
                    present.negated()
                )  # one place for an empty run
                if k >= 2:
                    model.add_implication(present, previous.present)
            first_tokens = request.target_tokens + emitted
        runs.append(_Run(present, start, length, end, emitted, request.target_tokens + emitted, first_tokens))
        emitted = emitted + length
    model.add(sum(run.length for run in runs) == remaining)
    return runs


def _add_block_intervals(
    model: cp_model.CpModel,
    run: _Run,
    request: WindowRequest,
    index: int,
    block_size: int,
    horizon: int,
    intervals: list[cp_model.IntervalVar],
    demands: list[cp_model.LinearExprT],
) -> None:
    """The run's KV in blocks: its target's blocks for the whole run, plus one more block from each batch at
    which the token count crosses a block boundary (offsets relative to the run's start)."""
    rid, remaining = request.request_id, request.remaining_outputs
    name = f"{rid}_{index}"
    if isinstance(run.target, int):  # a first run: its target, so every offset, is a constant
        blocks: cp_model.LinearExprT = -(-run.target // block_size)
        slack: cp_model.LinearExprT = blocks * block_size - run.target
    else:
        # An empty last run has the target prompt + output, one token past the peak.
        blocks = model.new_int_var(0, -(-(request.peak_tokens + 1) // block_size), f"blocks_{name}")
        slack = model.new_int_var(0, block_size - 1, f"slack_{name}")  # free slots in the last target block
        model.add(blocks * block_size == run.target + slack)
    if isinstance(run.length, int):
        intervals.append(model.new_fixed_size_interval_var(run.start, run.length, f"kv_{name}"))
    else:
        intervals.append(
            model.new_optional_interval_var(run.start, run.length, run.end, run.present, f"kv_{name}")
        )
    demands.append(blocks)
    offset_limit = remaining + block_size
    for j in range(1, (remaining - 2) // block_size + 2):
        offset = slack + 1 + (j - 1) * block_size
        if isinstance(offset, int) and isinstance(run.length, int):
            if offset < run.length:
                intervals.append(
                    model.new_fixed_size_interval_var(
                        run.start + offset, run.length - offset, f"grow_{name}_{j}"
                    )
                )
                demands.append(1)
            continue
        if isinstance(offset, int):
            grows_at: cp_model.LinearExprT = run.start + offset
        else:
            # Unbounded above: when the run is too short to grow this block, its start lies past the run.
            grows_at = model.new_int_var(0, horizon + offset_limit, f"grow_start_{name}_{j}")
            model.add(grows_at == run.start + offset)
        held = model.new_bool_var(f"grow_{name}_{j}")
        model.add(run.length >= offset + 1).only_enforce_if(held)
        model.add(run.length <= offset).only_enforce_if(held.negated())
        size = model.new_int_var(0, remaining, f"grow_size_{name}_{j}")
        model.add(size == run.length - offset).only_enforce_if(held)
        intervals.append(model.new_optional_interval_var(grows_at, size, run.end, held, f"grow_{name}_{j}"))
        demands.append(1)


def _add_batch_limits(model: cp_model.CpModel, window: Window, runs: Mapping[str, list[_Run]]) -> None:
    """Sequence cap and token budget as cumulatives, only where they can bind."""
    limits = window.limits
    requests = window.requests
    if limits.max_num_seqs < len(requests):
        intervals = [
            model.new_optional_interval_var(run.start, run.length, run.end, run.present, "seq")
            for r in requests
            for run in runs[r.request_id]
        ]
        model.add_cumulative(intervals, [1] * len(intervals), limits.max_num_seqs)
    most_tokens = sum(r.peak_tokens for r in requests)
    if limits.max_num_batched_tokens < most_tokens:
        intervals, demands = [], []
        for r in requests:
            for run in runs[r.request_id]:
                intervals.append(
                    model.new_optional_interval_var(run.start, 1, run.start + 1, run.present, "prefill")
                )
                demands.append(run.first_tokens)
                decode = model.new_int_var(0, r.remaining_outputs, "decode")
                model.add_max_equality(decode, [run.length - 1, 0])
                intervals.append(
                    model.new_optional_interval_var(run.start + 1, decode, run.end, run.present, "decode")
                )
                demands.append(1)
                model.add(run.first_tokens <= limits.max_num_batched_tokens)
        model.add_cumulative(intervals, demands, limits.max_num_batched_tokens)


def _recompute_cost(
    model: cp_model.CpModel,
    window: Window,
    cost: LinearCostModel,
    runs: Mapping[str, list[_Run]],
    scale: Scale,
) -> cp_model.LinearExprT:
    """Ticks that recompute runs add over the no-preemption baseline, looked up by tokens emitted before."""
    total: cp_model.LinearExprT = 0
    for request in window.requests:
        table = [scale.ticks(recompute_extra(request, g, cost)) for g in range(request.remaining_outputs)] + [
            0
        ]
        for k, run in enumerate(runs[request.request_id][1:], start=1):
            rid = request.request_id
            emitted = model.new_int_var(0, request.remaining_outputs, f"emitted_{rid}_{k}")
            model.add(emitted == run.emitted_before)
            looked_up = model.new_int_var(0, max(table), f"extra_{rid}_{k}")
            model.add_element(emitted, table, looked_up)
            charged = model.new_int_var(0, max(table), f"charged_{rid}_{k}")
            model.add(charged >= looked_up).only_enforce_if(run.present)
            total = total + charged
    return total


def _time_layer(
    model: cp_model.CpModel,
    window: Window,
    cost: LinearCostModel,
    runs: Mapping[str, list[_Run]],
    makespan: cp_model.IntVar,
    horizon: int,
    scale: Scale,
    deadlines: Deadlines | None,
) -> cp_model.LinearExprT:
    """Per-batch start and duration, so that arrivals and deadlines bind and finish times are seconds.
    Returns the latency part of the objective (weighted finish and first-token ticks)."""
    requests = window.requests
    a, b, c = (scale.duration_ticks(v) for v in (cost.a, cost.b, cost.c))
    e = scale.duration_ticks(cost.e)
    longest_batch = a + (b + c) * sum(r.peak_tokens for r in requests) + e * len(requests)
    longest_batch += sum(
        scale.duration_ticks(recompute_extra(r, 0, cost) + baseline_seconds(r, cost)) for r in requests
    )
    latest_arrival = max(scale.arrival_ticks(r.arrival - window.start) for r in requests)
    span = latest_arrival + horizon * longest_batch
    starts = [model.new_int_var(0, span, f"t_{j}") for j in range(horizon)]
    durations = [model.new_int_var(0, longest_batch, f"dt_{j}") for j in range(horizon)]
    ends = [model.new_int_var(0, span + longest_batch, f"end_{j}") for j in range(horizon)]
    work: list[list[cp_model.LinearExprT]] = [[] for _ in range(horizon)]
    for request in requests:
        for k, run in enumerate(runs[request.request_id]):
            _run_per_batch(model, request, k, run, cost, scale, horizon, work)
    for j in range(horizon):
        used = model.new_bool_var(f"used_{j}")
        model.add(makespan >= j + 1).only_enforce_if(used)
        model.add(makespan <= j).only_enforce_if(used.negated())
        model.add(durations[j] == a * used + sum(work[j]))
        model.add(ends[j] == starts[j] + durations[j])
        if j:
            model.add(starts[j] >= ends[j - 1])
    latency: cp_model.LinearExprT = 0
    first_due = deadlines.first_token if deadlines else {}
    finish_due = deadlines.finish if deadlines else {}
    for request in requests:
        rid = request.request_id
        first, last = runs[rid][0], runs[rid][-1]
        if not request.running:
            begun = model.new_int_var(0, span, f"begin_{rid}")
            model.add_element(first.start, starts, begun)
            model.add(begun >= scale.arrival_ticks(request.arrival - window.start))
        if scale.e2e or rid in finish_due:
            finish = model.new_int_var(0, span + longest_batch, f"finish_{rid}")
            # OR-Tools before 9.12 takes only a variable as an element index, not an affine expression.
            last_batch = model.new_int_var(0, len(ends) - 1, f"last_batch_{rid}")
            model.add(last_batch == last.end - 1)
            model.add_element(last_batch, ends, finish)
            latency = latency + scale.e2e * finish
            if rid in finish_due:
                model.add(finish <= scale.deadline_ticks(finish_due[rid] - window.start))
        fresh = request.generated_tokens == 0
        if fresh and (scale.ttft or rid in first_due):
            first_token = model.new_int_var(0, span + longest_batch, f"first_{rid}")
            model.add_element(first.start, ends, first_token)  # a fresh request's first run is never empty
            latency = latency + scale.ttft * first_token
            if rid in first_due:
                model.add(first_token <= scale.deadline_ticks(first_due[rid] - window.start))
    return latency


def _run_per_batch(
    model: cp_model.CpModel,
    request: WindowRequest,
    k: int,
    run: _Run,
    cost: LinearCostModel,
    scale: Scale,
    horizon: int,
    work: list[list[cp_model.LinearExprT]],
) -> None:
    """Adds to each batch's duration the ticks this run spends in it: b and c per token and context in decode
    batches; the first batch's whole b*T + c*K + d*P, looked up by the run's target."""
    rid = f"{request.request_id}_{k}"
    b, c, e = (scale.duration_ticks(v) for v in (cost.b, cost.c, cost.e))
    remaining = request.remaining_outputs
    if k == 0:
        first_ticks: cp_model.LinearExprT = scale.duration_ticks(_first_batch_seconds(request, 0, cost, k))
        peak_first = first_ticks
    else:
        table = [
            scale.duration_ticks(_first_batch_seconds(request, g, cost, k)) for g in range(remaining)
        ] + [0]
        emitted = model.new_int_var(0, remaining, f"emitted_t_{rid}")
        model.add(emitted == run.emitted_before)
        first_ticks = model.new_int_var(0, max(table), f"first_ticks_{rid}")
        model.add_element(emitted, table, first_ticks)
        peak_first = max(table)
    peak_decode = b + c * request.peak_tokens + e
    for j in range(horizon):
        started = model.new_bool_var(f"started_{rid}_{j}")  # start <= j
        model.add(run.start <= j).only_enforce_if(started)
        model.add(run.start >= j + 1).only_enforce_if(started.negated())
        running = model.new_bool_var(f"running_{rid}_{j}")  # end > j
        model.add(run.end >= j + 1).only_enforce_if(running)
        model.add(run.end <= j).only_enforce_if(running.negated())
        first = model.new_bool_var(f"first_{rid}_{j}")  # start == j and the run is not empty
        decoding = model.new_bool_var(f"decoding_{rid}_{j}")  # start < j < end
        model.add(run.start == j).only_enforce_if(first)
        model.add_implication(first, running)
        model.add_bool_or([first, decoding, started.negated(), running.negated()])
        model.add_implication(decoding, started)
        model.add_implication(decoding, running)
        model.add(run.start <= j - 1).only_enforce_if(decoding)
        model.add_bool_or([first.negated(), decoding.negated()])
        first_part = model.new_int_var(0, peak_first, f"first_part_{rid}_{j}")
        model.add(first_part == first_ticks).only_enforce_if(first)
        model.add(first_part == 0).only_enforce_if(first.negated())
        decode_part = model.new_int_var(0, peak_decode, f"decode_part_{rid}_{j}")
        # A decode at batch j has context_after = target + (j - start).
        model.add(decode_part == b + e + c * (run.target + j - run.start)).only_enforce_if(decoding)
        model.add(decode_part == 0).only_enforce_if(decoding.negated())
        work[j] += [first_part, decode_part]


def _first_batch_seconds(
    request: WindowRequest, emitted: int, cost: LinearCostModel, run_index: int
) -> float:
    """b*T + c*K + d*P + e of a run's first batch (without a)."""
    target = request.target_tokens + emitted
    context = request.computed_tokens if run_index == 0 else 0
    chunk = target - context
    return cost.b * chunk + cost.c * target + (cost.d * chunk * target if chunk > 1 else 0.0) + cost.e


def _break_symmetries(
    model: cp_model.CpModel,
    window: Window,
    runs: Mapping[str, list[_Run]],
    timed: bool,
    deadlines: Deadlines | None,
) -> None:
    """Fresh requests of the same shape are interchangeable (with arrivals, an earlier arrival can take a
    later one's place; with deadlines too only if its deadlines are no later): order their first runs."""
    groups: dict[tuple[int, int], list[WindowRequest]] = {}
    for r in window.requests:
        if not r.running:
            groups.setdefault((r.prompt_tokens, r.output_tokens), []).append(r)
    inf = math.inf
    for group in groups.values():
        ordered = sorted(group, key=lambda r: r.arrival) if timed else group
        if deadlines is not None:
            keys = [
                (deadlines.first_token.get(r.request_id, inf), deadlines.finish.get(r.request_id, inf))
                for r in ordered
            ]
            if any(x[0] > y[0] or x[1] > y[1] for x, y in itertools.pairwise(keys)):
                continue  # no order of this group is safe to impose
        for earlier, later in itertools.pairwise(ordered):
            model.add(runs[earlier.request_id][0].start <= runs[later.request_id][0].start)


def add_hint(run_model: RunModel, hint: Runs, *, completion_seconds: float = 5.0) -> bool:
    """Seed the search with a schedule's runs. CP-SAT follows a hint only as far as it is complete, and the
    runs fix every other variable, so a short solve with the runs fixed completes it; returns whether it did
    (otherwise the runs alone are hinted, and CP-SAT repairs what it can)."""
    model = run_model.model
    model.clear_hints()
    placed = _placed_runs(run_model, hint)
    completed = model.clone()
    for var, value in placed:
        completed.add(completed.get_int_var_from_proto_index(var.index) == value)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = completion_seconds
    solver.parameters.num_workers = 1
    if solver.solve(completed) in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        for index in range(len(model.proto.variables)):
            value = solver.value(completed.get_int_var_from_proto_index(index))
            model.add_hint(model.get_int_var_from_proto_index(index), value)
        return True
    for var, value in placed:
        model.add_hint(var, value)
    return False


def _placed_runs(run_model: RunModel, hint: Runs) -> list[tuple[cp_model.IntVar, int]]:
    """(variable, value) for every run's start and length, the makespan, and (if variable) presence."""
    placed: list[tuple[cp_model.IntVar, int]] = []
    last_end = 0
    for request in run_model.window.requests:
        runs = run_model.runs[request.request_id]
        given = list(hint.get(request.request_id, ()))
        if len(given) > len(runs):  # more preemptions than the model allows: the last run takes the rest
            tail = given[len(runs) - 1 :]
            given = [*given[: len(runs) - 1], (tail[0][0], sum(length for _, length in tail))]
        position = 0
        for k, run in enumerate(runs):
            start, length = given[k] if k < len(given) else (position, 0)
            start = min(max(start, position), run_model.horizon)
            placed.append((run.start, start))
            if not isinstance(run.length, int):
                placed.append((run.length, length))
            position = start + length
        last_end = max(last_end, position)
    placed.append((run_model.makespan, min(last_end, run_model.horizon)))
    return placed


def solve_run_model(run_model: RunModel, *, time_limit: float, workers: int, seed: int = 0) -> RunSolution:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    status = solver.solve(run_model.model)
    found = status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    runs: dict[str, list[tuple[int, int]]] = {}
    if found:
        for request in run_model.window.requests:
            runs[request.request_id] = [
                (solver.value(run.start), _value(solver, run.length))
                for k, run in enumerate(run_model.runs[request.request_id])
                if _value(solver, run.length) > 0 or (k == 0 and request.running)
            ]
    return RunSolution(
        status=STATUS_NAMES.get(status, str(status)),
        runs=runs,
        objective_units=solver.objective_value if found else math.nan,
        bound_units=solver.best_objective_bound,
        wall_seconds=solver.wall_time,
    )


def _value(solver: cp_model.CpSolver, value: cp_model.IntVar | int) -> int:
    return value if isinstance(value, int) else solver.value(value)


def schedule_from_runs(window: Window, runs: Runs) -> Schedule:
    """The batches a set of runs describes, with an eviction wherever a run ends before its request is done;
    empty batch indices are dropped (and an eviction due there moves to the next batch)."""
    by_id = window.by_id()
    horizon = max((start + length for rs in runs.values() for start, length in rs), default=0)
    tokens: list[dict[str, int]] = [{} for _ in range(horizon)]
    evicted: list[list[str]] = [[] for _ in range(horizon + 1)]
    for rid, request_runs in runs.items():
        request = by_id[rid]
        done = 0
        for k, (start, length) in enumerate(request_runs):
            continuing = k == 0 and request.running
            if length == 0:
                if continuing:  # evicted before the window's first batch
                    evicted[0].append(rid)
                continue
            computed = request.computed_tokens if continuing else 0
            tokens[start][rid] = request.target_tokens + done - computed
            for j in range(start + 1, start + length):
                tokens[j][rid] = 1
            done += length
            if done < request.remaining_outputs:
                evicted[start + length].append(rid)
    batches: list[Batch] = []
    carried: list[str] = []
    for j in range(horizon):
        carried += evicted[j]
        if tokens[j]:
            batches.append(Batch(tokens[j], tuple(carried)))
            carried = []
    return Schedule(tuple(batches))


def runs_from_schedule(window: Window, schedule: Schedule) -> dict[str, list[tuple[int, int]]]:
    """Each request's runs in a schedule: the batches where it emits tokens, split at its evictions, as
    (first emitting batch, tokens emitted); a running request evicted before emitting starts with (0, 0).
    Exact for schedules in the run form; a hint otherwise."""
    by_id = window.by_id()
    computed = {r.request_id: r.computed_tokens for r in window.requests}
    emitted = {r.request_id: r.generated_tokens for r in window.requests}
    runs: dict[str, list[list[int]]] = {rid: [] for rid in by_id}
    open_run = {rid: False for rid in by_id}
    for j, batch in enumerate(schedule.batches):
        for rid in batch.evicted:
            if by_id[rid].running and not runs[rid]:  # evicted before its first emission in the window
                runs[rid].append([0, 0])
            computed[rid] = 0
            open_run[rid] = False
        for rid, new in batch.tokens.items():
            computed[rid] += new
            if computed[rid] == by_id[rid].prompt_tokens + emitted[rid]:
                emitted[rid] += 1
                if not open_run[rid]:
                    runs[rid].append([j, 0])
                    open_run[rid] = True
                runs[rid][-1][1] += 1
    return {rid: [(s, n) for s, n in rs] for rid, rs in runs.items()}
