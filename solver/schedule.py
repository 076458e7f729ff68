"""A schedule as a plain list of batches, and the independent verifier that replays it.

The verifier is the only judge of a schedule: whatever produced it (CP-SAT, the exhaustive search, a
heuristic's recorded steps), the costs reported are the ones recomputed here, in floats, with the cost
model's own `batch_time` and the simulator's accounting:
  * a request with prompt p and output o processes p + o - 1 tokens; the step that brings its KV to
    p + (tokens emitted so far) emits one output token;
  * a batch needs, after its allocations, ceil(KV tokens / block size) blocks per request holding KV; a
    request frees its blocks after the step that emits its last token;
  * an eviction (recompute preemption) drops all of a request's KV before a batch; it must then recompute its
    prompt and every token it has emitted before emitting the next;
  * a batch starts after the previous one ends and no earlier than the arrival of every request in it;
  * with `Deadlines`, a request emits its first token and its last no later than its deadlines (latency SLOs,
    or the times of the engine's own schedule).
Nothing is assumed about how the schedule was made, so a corrupted schedule is reported, never repaired.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vllm_shadow.adapters.events import EngineStep
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.problem import Objective, Window

_TIME_TOLERANCE = 1e-9  # seconds: float sums of batch times may differ in the last bits


@dataclass(frozen=True, slots=True)
class Batch:
    tokens: Mapping[str, int]  # request id -> tokens processed in this batch
    evicted: tuple[str, ...] = ()  # requests whose KV is dropped before this batch runs


@dataclass(frozen=True, slots=True)
class Schedule:
    batches: tuple[Batch, ...]
    # Planned start of each batch; None: every batch as early as the previous batch and its arrivals allow.
    starts: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return len(self.batches)


@dataclass(frozen=True, slots=True)
class Deadlines:
    """The latest time (seconds, on the window's clock) each request may emit its first token and its last.
    A request missing from a mapping has no such deadline; a running request's first token is history."""

    first_token: Mapping[str, float]
    finish: Mapping[str, float]
    source: str  # what the deadlines come from, e.g. "vllm's own schedule" or "ttft=0.5,tpot=0.05"

    def describe(self) -> str:
        return f"no request's first token or finish later than under {self.source}"


@dataclass(frozen=True, slots=True)
class BatchReplay:
    start: float
    duration: float
    tokens: int  # new tokens processed
    sequences: int
    kv_blocks: int  # blocks held after the batch's allocations


@dataclass(frozen=True, slots=True)
class Replay:
    batches: tuple[BatchReplay, ...]
    first_token: Mapping[str, float]  # only requests that emit their first token in the window
    finish: Mapping[str, float]
    evictions: Mapping[str, int]
    recomputed_tokens: int
    gpu_seconds: float
    mean_e2e: float
    mean_ttft: float  # nan when no request emits its first token in the window
    violations: tuple[str, ...] = field(default=())

    @property
    def feasible(self) -> bool:
        return not self.violations

    def objective(self, objective: Objective) -> float:
        return objective.value(self.gpu_seconds, self.mean_e2e, self.mean_ttft)


class InfeasibleSchedule(ValueError):
    def __init__(self, violations: Sequence[str]):
        shown = "; ".join(violations[:5]) + (
            f"; ... {len(violations) - 5} more" if len(violations) > 5 else ""
        )
        super().__init__(f"infeasible schedule: {shown}")
        self.violations = tuple(violations)


@dataclass(slots=True)
class _State:
    prompt: int
    output: int
    arrival: float
    computed: int
    generated: int
    evictions: int = 0
    processed: int = 0

    @property
    def target(self) -> int:
        return self.prompt + self.generated

    @property
    def finished(self) -> bool:
        return self.generated >= self.output


def replay(
    schedule: Schedule, window: Window, cost: LinearCostModel, deadlines: Deadlines | None = None
) -> Replay:
    """Replay `schedule` on `window`; every broken rule is listed in `violations` (empty: feasible)."""
    limits = window.limits
    states = {
        r.request_id: _State(
            r.prompt_tokens, r.output_tokens, r.arrival, r.computed_tokens, r.generated_tokens
        )
        for r in window.requests
    }
    if schedule.starts is not None and len(schedule.starts) != len(schedule.batches):
        return _failed(f"{len(schedule.starts)} start times for {len(schedule.batches)} batches")
    violations: list[str] = []
    first_token: dict[str, float] = {}
    finish: dict[str, float] = {}
    replays: list[BatchReplay] = []
    clock = window.start
    for j, batch in enumerate(schedule.batches):
        where = f"batch {j}"
        for rid in batch.evicted:
            state = states.get(rid)
            if state is None or state.finished or state.computed == 0:
                violations.append(f"{where}: evicts {rid}, which holds no KV")
                continue
            state.computed = 0
            state.evictions += 1
        if not batch.tokens:
            violations.append(f"{where}: empty")
        news: list[int] = []
        contexts: list[int] = []
        members: list[tuple[str, _State]] = []
        for rid, new in batch.tokens.items():
            state = states.get(rid)
            if state is None:
                violations.append(f"{where}: unknown request {rid}")
                continue
            if state.finished:
                violations.append(f"{where}: {rid} has already emitted all its tokens")
                continue
            if new < 1 or state.computed + new > state.target:
                violations.append(
                    f"{where}: {rid} processes {new} tokens but needs 1..{state.target - state.computed}"
                )
                continue
            news.append(new)
            contexts.append(state.computed)
            members.append((rid, state))
        earliest = max([clock, *(s.arrival for _, s in members)])
        start = earliest if schedule.starts is None else schedule.starts[j]
        if start < earliest - _TIME_TOLERANCE:
            violations.append(
                f"{where}: starts at {start:.6f}s, before {earliest:.6f}s (previous batch or arrival)"
            )
        if sum(news) > limits.max_num_batched_tokens:
            violations.append(
                f"{where}: {sum(news)} tokens over the budget of {limits.max_num_batched_tokens}"
            )
        if len(news) > limits.max_num_seqs:
            violations.append(f"{where}: {len(news)} sequences over the cap of {limits.max_num_seqs}")
        duration = cost.batch_time(news, contexts)
        end = start + duration
        for (_, state), new in zip(members, news, strict=True):
            state.computed += new
            state.processed += new
        kv_blocks = sum(limits.blocks(s.computed) for s in states.values() if not s.finished)
        if kv_blocks > limits.kv_blocks:
            violations.append(f"{where}: holds {kv_blocks} KV blocks, over the {limits.kv_blocks} available")
        for rid, state in members:
            if state.computed == state.target:
                state.generated += 1
                if state.generated == 1:
                    first_token[rid] = end
                if state.finished:
                    finish[rid] = end
        replays.append(BatchReplay(start, duration, sum(news), len(news), kv_blocks))
        clock = end
    for rid, state in states.items():
        if not state.finished:
            violations.append(f"{rid}: emits {state.generated} of {state.output} output tokens")
    if deadlines is not None:
        violations += _missed_deadlines(deadlines, first_token, finish)
    fresh_work = sum(r.peak_tokens - r.computed_tokens for r in window.requests)
    recomputed = sum(s.processed for s in states.values()) - fresh_work
    e2e = [finish[r.request_id] - r.arrival for r in window.requests if r.request_id in finish]
    ttft = [first_token[r.request_id] - r.arrival for r in window.requests if r.request_id in first_token]
    return Replay(
        batches=tuple(replays),
        first_token=first_token,
        finish=finish,
        evictions={rid: s.evictions for rid, s in states.items()},
        recomputed_tokens=max(recomputed, 0),
        gpu_seconds=sum(b.duration for b in replays),
        mean_e2e=sum(e2e) / len(e2e) if e2e else float("nan"),
        mean_ttft=sum(ttft) / len(ttft) if ttft else float("nan"),
        violations=tuple(violations),
    )


def _missed_deadlines(
    deadlines: Deadlines, first_token: Mapping[str, float], finish: Mapping[str, float]
) -> list[str]:
    missed = []
    for what, times, limits in (
        ("first token", first_token, deadlines.first_token),
        ("finish", finish, deadlines.finish),
    ):
        for rid, limit in limits.items():
            if rid in times and times[rid] > limit + _TIME_TOLERANCE:
                missed.append(f"{rid}: {what} at {times[rid]:.6f}s, after its deadline {limit:.6f}s")
    return missed


def verify(
    schedule: Schedule, window: Window, cost: LinearCostModel, deadlines: Deadlines | None = None
) -> Replay:
    """`replay`, raising `InfeasibleSchedule` unless every rule holds."""
    result = replay(schedule, window, cost, deadlines)
    if result.violations:
        raise InfeasibleSchedule(result.violations)
    return result


def schedule_from_steps(steps: Sequence[EngineStep]) -> Schedule:
    """A simulated (or mirrored) step log as a schedule: same batches, evictions where the steps preempted.

    Start times are left to the verifier (as early as allowed): a simulator never idles while work is waiting,
    so the replayed times are the simulated ones.
    """
    return Schedule(tuple(Batch(dict(s.scheduled_tokens), tuple(s.preempted)) for s in steps))


def _failed(reason: str) -> Replay:
    nan = float("nan")
    return Replay((), {}, {}, {}, 0, nan, nan, nan, (reason,))
