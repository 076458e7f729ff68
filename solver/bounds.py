"""Lower bounds that scale to windows of any size: relaxations valid for every schedule the verifier accepts.

Every schedule, however it chunks, pauses, evicts or idles, must (per request) emit each remaining token in a
batch of its own, in which the request holds ceil((target + t) / block_size) blocks and attends target + t
KV tokens, and must process its prompt once. Summing what that alone costs gives the bound:
  * batches: at least the longest request's remaining tokens, and at least the block-batches all requests
    need over the KV capacity (and the token and sequence totals over the budget and the cap);
  * b*T + c*K + d*P: each request's own tokens, attention over its own context, and for a prefill split into
    chunks the cheapest the d term could be made by any chunking (see `prefill_extra_bound`);
  * latency: a request alone on the engine, from the later of its arrival and the window start.
O(total tokens); no solver. CP-SAT's bound is usually much tighter; this one is for windows too large for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.problem import Objective, Window, WindowRequest, cdiv


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
    """b*T + c*K + d*P the request adds to the batches it runs in, at the least: own tokens, own context at
    each emission, and the cheapest prefill chunking."""
    target, remaining = request.target_tokens, request.remaining_outputs
    tokens = target - request.computed_tokens + remaining - 1
    attended = _sum_range(target, target + remaining - 1)
    return cost.b * tokens + cost.c * attended + prefill_extra_bound(request, cost)


def min_batches(window: Window) -> int:
    limits = window.limits
    requests = window.requests
    area = sum(
        sum(cdiv(r.target_tokens + t, limits.block_size) for t in range(r.remaining_outputs))
        for r in requests
    )
    emissions = sum(r.remaining_outputs for r in requests)
    tokens = sum(r.peak_tokens - r.computed_tokens for r in requests)
    return max(
        max((r.remaining_outputs for r in requests), default=0),
        cdiv(area, limits.kv_blocks),
        cdiv(emissions, limits.max_num_seqs),
        cdiv(tokens, limits.max_num_batched_tokens),
    )


def relaxation_bound(window: Window, cost: LinearCostModel) -> RelaxationBound:
    batches = min_batches(window)
    gpu = cost.a * batches + sum(request_work_seconds(r, cost) for r in window.requests)
    e2e, ttft = [], []
    for r in window.requests:
        wait = max(window.start - r.arrival, 0.0)
        alone = cost.a * r.remaining_outputs + request_work_seconds(r, cost)
        e2e.append(wait + alone)
        if r.generated_tokens == 0:
            chunk = r.target_tokens - r.computed_tokens
            ttft.append(
                wait + cost.a + cost.b * chunk + cost.c * r.target_tokens + prefill_extra_bound(r, cost)
            )
    return RelaxationBound(
        batches=batches,
        gpu_seconds=gpu,
        mean_e2e=sum(e2e) / len(e2e) if e2e else math.nan,
        mean_ttft=sum(ttft) / len(ttft) if ttft else math.nan,
    )
