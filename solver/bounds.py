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
sum over disjoint intervals (`deadline_min_batches`). O(total tokens), plus O(n^2) for the deadlines; no
solver. CP-SAT's bound is usually much tighter; this one is for windows too large for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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
    return sum(cdiv(request.target_tokens + t, block_size) for t in range(request.remaining_outputs))


def min_batches(window: Window, deadlines: Deadlines | None = None) -> int:
    limits = window.limits
    requests = window.requests
    area = sum(_block_area(r, limits.block_size) for r in requests)
    emissions = sum(r.remaining_outputs for r in requests)
    tokens = sum(r.peak_tokens - r.computed_tokens for r in requests)
    unconstrained = max(
        max((r.remaining_outputs for r in requests), default=0),
        cdiv(area, limits.kv_blocks),
        cdiv(emissions, limits.max_num_seqs),
        cdiv(tokens, limits.max_num_batched_tokens),
    )
    if deadlines is None or not deadlines.finish:
        return unconstrained
    return max(unconstrained, deadline_min_batches(window, deadlines))


def deadline_min_batches(window: Window, deadlines: Deadlines) -> int:
    """The most batches that disjoint time intervals force: interval [s, t] holds every batch of the requests
    that arrive at or after s (or the window start) and must finish by t, at least as many as the longest of
    them emits and as their KV block-batches over the capacity (token and sequence totals likewise). Dynamic
    programming over t in deadline order: best(t) = max(best(earlier t), best(up to s) + forced(s, t))."""
    limits = window.limits
    requests = [r for r in window.requests if r.request_id in deadlines.finish]
    if not requests:
        return 0
    arrival = np.array([max(r.arrival, window.start) for r in requests])
    due = np.array([deadlines.finish[r.request_id] for r in requests])
    longest = np.array([r.remaining_outputs for r in requests])
    area = np.array([_block_area(r, limits.block_size) for r in requests])
    tokens = np.array([r.peak_tokens - r.computed_tokens for r in requests])
    ends = np.unique(due)
    best = np.zeros(len(ends), dtype=np.int64)  # best[k]: over intervals ending by ends[k]
    for k, end in enumerate(ends):
        inside = np.flatnonzero(due <= end)
        order = inside[np.argsort(-arrival[inside], kind="stable")]  # latest arrival first
        # forced[i]: batches the requests arriving at or after arrival[order[i]] force into [that, end].
        forced = np.maximum.reduce(
            [
                np.maximum.accumulate(longest[order]),
                -(-np.cumsum(area[order]) // limits.kv_blocks),
                -(-np.cumsum(longest[order]) // limits.max_num_seqs),
                -(-np.cumsum(tokens[order]) // limits.max_num_batched_tokens),
            ]
        )
        # Intervals that end by this interval's start (a batch of one ends by the other's start).
        before = np.searchsorted(ends, arrival[order], side="right") - 1
        earlier = np.where(before >= 0, best[np.maximum(before, 0)], 0)
        best[k] = max(best[k - 1] if k else 0, int((earlier + forced).max()))
    return int(best[-1])


def relaxation_bound(
    window: Window, cost: LinearCostModel, deadlines: Deadlines | None = None
) -> RelaxationBound:
    """Holds for every schedule (that meets `deadlines`, when given: they raise the batch count)."""
    batches = min_batches(window, deadlines)
    gpu = cost.a * batches + sum(request_work_seconds(r, cost) for r in window.requests)
    e2e, ttft = [], []
    for r in window.requests:
        wait = max(window.start - r.arrival, 0.0)
        alone = cost.a * r.remaining_outputs + request_work_seconds(r, cost)
        e2e.append(wait + alone)
        if r.generated_tokens == 0:
            chunk = r.target_tokens - r.computed_tokens
            ttft.append(
                wait
                + cost.a
                + cost.b * chunk
                + cost.c * r.target_tokens
                + prefill_extra_bound(r, cost)
                + cost.e
            )
    return RelaxationBound(
        batches=batches,
        gpu_seconds=gpu,
        mean_e2e=sum(e2e) / len(e2e) if e2e else math.nan,
        mean_ttft=sum(ttft) / len(ttft) if ttft else math.nan,
    )
