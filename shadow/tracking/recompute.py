"""The recompute tax: GPU time an engine spends computing again the KV that recompute preemptions dropped.

What counts as recomputation, and the step it is priced against, are defined once, in
`vllm_shadow.solver.simulator` (`recomputed_tokens`, `without_recompute`; the simulator prices its candidates'
steps by the same definition): the tokens a request computes below the KV its preemptions dropped, and the same
step without them. Here a real step is priced with the calibrated cost model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm_shadow.costmodel.linear import BatchFeatures, LinearCostModel, batch_features
from vllm_shadow.solver.simulator import recomputed_tokens, without_recompute

__all__ = ["RecomputeTax", "recompute_tax", "recomputed_tokens", "step_recompute_tax"]


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
    without = without_recompute(new_tokens, context_tokens, recomputed)
    return recompute_tax(
        cost, batch_features(new_tokens, context_tokens), batch_features(*without), total, preemptions
    )


def recompute_tax(
    cost: LinearCostModel,
    features: BatchFeatures | tuple[int, int, int, int],
    without: BatchFeatures | tuple[int, int, int, int],
    recomputed: int,
    preemptions: int = 0,
) -> RecomputeTax:
    """`step_recompute_tax` from the step's features (T, K, P, R) and those of the step without its
    recomputation, for a caller that sums them as it walks the step (the engine tracker)."""
    if recomputed == 0:
        return RecomputeTax(preemptions)
    seconds = cost.time_from_features(*features) - cost.time_from_features(*without)
    return RecomputeTax(preemptions, recomputed, max(seconds, 0.0))
