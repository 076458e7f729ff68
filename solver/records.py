"""What a simulation returns: per-request records, optional per-step records, and aggregates; and the requests it
starts with (`RunningRequest`), a class both simulator cores share.

A simulated step is an `EngineStep`, the event schema's own step type, so that a simulated step and a mirrored
real step compare field by field. `RequestRecord` is the one per-request latency record: the simulator's, the
report's and the test oracles' (what a real engine delivered). `SimResult.summary()` is the row a replay table
prints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vllm_shadow.adapters.events import EngineStep, RequestArrival


@dataclass(frozen=True, slots=True)
class RunningRequest:
    """A request already in the engine when the simulation starts (the live shadow's window start)."""

    request: RequestArrival
    computed_tokens: int  # tokens whose KV is held
    generated_tokens: int  # output tokens produced so far
    # Its last token is in flight (async scheduling: the step before the start produced it, and vLLM frees the
    # request after the first step's schedule): it holds its blocks and its place in the running queue until
    # then, under a policy without async scheduling it is freed before the first step; it is no request of the
    # replay (no record). Its `generated_tokens` are its whole output.
    finishing: bool = False
    # Async scheduling: its last run, the step right before the start, decoded the token its run the step
    # before had sampled, so vLLM had not cached the block of that token (were it preempted at the first step).
    decoded_in_flight: bool = False


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    arrival: float
    prompt_tokens: int
    output_tokens: int
    priority: int = 0
    first_scheduled: float = float("nan")  # start of the first step that ran any of its tokens
    first_token: float = float("nan")  # end of the step that produced its first output token
    finish: float = float("nan")  # end of the step that produced its last output token
    preemptions: int = 0
    recomputed_tokens: int = 0  # tokens computed again after preemptions
    num_cached_tokens: int = 0  # vLLM's name: prompt tokens found in the prefix cache at its first admission

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (nan for single-token outputs)."""
        if self.output_tokens <= 1:
            return float("nan")
        return (self.finish - self.first_token) / (self.output_tokens - 1)


def _percentile(ordered: Sequence[float], q: float) -> float:
    # numpy's default ("linear") percentile, written out: the result types are read by `shadow status`,
    # which should not load numpy to print a table.
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def quantiles(values: Iterable[float]) -> tuple[float, float, float]:
    """p50, p90 and p99 of `values`, NaNs ignored; NaNs when nothing is left."""
    ordered = sorted(float(v) for v in values if not math.isnan(v))
    if not ordered:
        return (math.nan, math.nan, math.nan)
    return _percentile(ordered, 50), _percentile(ordered, 90), _percentile(ordered, 99)


class SchedulerThrashes(RuntimeError):
    """The policy preempts and readmits on this workload without finishing it (past a hundred times the
    requests' own computation): a property of the policy and the KV cache, reported, not a crash."""


@dataclass(frozen=True, slots=True)
class RunDemands:
    """The most a run's tests of the knobs that can hold a request back asked of them. A setting above what its
    tests asked never held a request back, so every such setting runs the same steps (the shadow simulates such
    candidates once: `vllm_shadow.evaluation.shared_runs`)."""

    running: int  # requests in the running queue at a test of the sequence cap (len(running) >= max_num_seqs)
    tokens: int  # a step's tokens so far plus those a request asked for, at a test of the token budget
    chunk: int  # the tokens one request asked for at a test of the long-prefill threshold
    # The victim rules and queue orders that decide as the run did. A rule is read only to pick a victim: one
    # that would have picked each victim the run picked (by its state then) runs the same steps. So does the
    # other queue order, at one priority, when the waiting queue stayed in (arrival, index) order: FCFS's list,
    # fed at the back and given back preempted requests at the front, then pops what the heap on (priority,
    # arrival, index) pops.
    preempted: bool = False  # a victim was picked
    newest_victims: bool = True  # every victim was the running queue's last (FCFS's rule)
    least_computed_victims: bool = True  # ... the one with fewest computed tokens, the newest on a tie
    worst_priority_victims: bool = True  # ... the worst (priority, arrival), the first on a tie
    arrival_order: bool = True  # the waiting queue stayed in (arrival, index) order, fed back and front


@dataclass(slots=True)
class SimResult:
    policy: str
    requests: list[RequestRecord]
    gpu_seconds: float  # sum of batch times: the engine's busy time
    num_steps: int
    peak_kv_blocks: int
    steps: list[EngineStep] | None = None
    tokens_processed: int = 0  # every token computed, recomputation included
    # Of gpu_seconds, what computing again the KV recompute preemptions dropped cost: the recompute tax, by the
    # engine tracker's definition (solver.simulator.without_recompute) on the simulated steps.
    recompute_gpu_seconds: float = 0.0
    demands: RunDemands | None = None  # None where no simulator ran it

    def summary(self) -> dict[str, float | int | str]:
        done = [r for r in self.requests if r.finish == r.finish]
        start = min((r.arrival for r in self.requests), default=0.0)
        end = max((r.finish for r in done), default=start)
        makespan = end - start
        ttft = quantiles([r.ttft for r in done])
        tpot = quantiles([r.tpot for r in done])
        e2e = quantiles([r.e2e for r in done])
        output_tokens = sum(r.output_tokens for r in done)
        return {
            "policy": self.policy,
            "requests": len(self.requests),
            "finished": len(done),
            "steps": self.num_steps,
            "gpu_seconds": self.gpu_seconds,
            "makespan_s": makespan,
            "ttft_p50_s": ttft[0],
            "ttft_p90_s": ttft[1],
            "ttft_p99_s": ttft[2],
            "tpot_p50_s": tpot[0],
            "tpot_p90_s": tpot[1],
            "tpot_p99_s": tpot[2],
            "e2e_p50_s": e2e[0],
            "e2e_p90_s": e2e[1],
            "e2e_p99_s": e2e[2],
            "throughput_rps": len(done) / makespan if makespan > 0 else float("nan"),
            "throughput_tokens_per_s": output_tokens / makespan if makespan > 0 else float("nan"),
            "preemptions": sum(r.preemptions for r in self.requests),
            "recomputed_tokens": sum(r.recomputed_tokens for r in self.requests),
            "recompute_gpu_seconds": self.recompute_gpu_seconds,
            "peak_kv_blocks": self.peak_kv_blocks,
        }
