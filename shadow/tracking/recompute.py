"""The recompute tax: GPU time an engine spends computing again the KV that recompute preemptions dropped.

vLLM's recompute preemption frees a victim's KV blocks and resets its computed tokens to 0; when the victim is
admitted again it prefills its prompt and every token it had emitted once more. The tokens it computes below
the KV it held when it was preempted are the recomputation (a request preempted again while recomputing still
owes the most it ever held). What they cost is priced with the calibrated cost model as the step's time minus
the time of the same step without them: each victim's recomputed tokens are the first of its new ones, so
without them it would run only the rest, from where its KV had been (and not at all if nothing is left).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm_shadow.costmodel.linear import LinearCostModel


@dataclass(frozen=True, slots=True)
class RecomputeTax:
    """What recompute preemptions cost an engine over some steps (a window's, or a sum over windows)."""

    preemptions: int = 0  # requests preempted in the steps
    recomputed_tokens: int = 0  # tokens computed again after a preemption had dropped their KV
    gpu_seconds: float = 0.0  # what computing them again cost, by the calibrated cost model

    def __add__(self, other: RecomputeTax) -> RecomputeTax:
        return RecomputeTax(
            self.preemptions + other.preemptions,
            self.recomputed_tokens + other.recomputed_tokens,
            self.gpu_seconds + other.gpu_seconds,
        )


def recomputed_tokens(computed: int, new: int, dropped_kv: int) -> int:
    """Of `new` tokens scheduled for a request holding `computed` KV tokens, those below `dropped_kv` (the KV
    its preemption dropped): computed before, computed again now."""
    return max(0, min(computed + new, dropped_kv) - computed)


def step_recompute_tax(
    cost: LinearCostModel,
    new_tokens: Sequence[int],
    context_tokens: Sequence[int],
    recomputed: Sequence[int],
    preemptions: int = 0,
) -> RecomputeTax:
    """One step's recompute tax: per request its new tokens, the KV it held before the step, and how many of
    the new tokens are recomputation (`recomputed_tokens`)."""
    total = sum(recomputed)
    if total == 0:
        return RecomputeTax(preemptions)
    without_new, without_context = [], []
    for new, context, again in zip(new_tokens, context_tokens, recomputed, strict=True):
        without_new.append(new - again)
        without_context.append(context + again)
    seconds = cost.batch_time(new_tokens, context_tokens) - cost.batch_time(without_new, without_context)
    return RecomputeTax(preemptions, total, max(seconds, 0.0))
