"""Test oracle: calibrate the linear cost model on an engine's own measured steps, and say how well it
predicts the rest.

The mirror stream gives each step's batch (tokens per request) and measured duration, but not each request's
context length: that is rebuilt here by replaying the stream's bookkeeping (a request's KV grows by what it
computes, a preemption drops it to 0, a finish retires it). Fit on the first part of a run, judge on the rest:
the error a live shadow sees when it calibrates on the past and predicts the future.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vllm_shadow.adapters.events import EngineStep
from vllm_shadow.costmodel.linear import (
    MIN_SAMPLES,
    BatchFeatures,
    LinearCostModel,
    batch_features,
    fit_linear,
)


def step_features(steps: Sequence[EngineStep]) -> np.ndarray:
    """(T, K, P, R) per non-empty step, in order (see `vllm_shadow.costmodel.linear`), from the mirrored steps."""
    computed: dict[str, int] = {}
    rows = []
    for step in steps:
        for request_id in step.preempted:
            computed[request_id] = 0
        computed.update(step.cached_tokens)  # admitted with a prefix-cache hit: attention reads the hit too
        if step.scheduled_tokens:
            new = list(step.scheduled_tokens.values())
            context = [computed.get(r, 0) for r in step.scheduled_tokens]
            rows.append(batch_features(new, context))
            for request_id, n in step.scheduled_tokens.items():
                computed[request_id] = computed.get(request_id, 0) + n
        for request_id in step.finished:
            computed.pop(request_id, None)
    return np.asarray(rows, dtype=float).reshape(-1, len(BatchFeatures._fields))


@dataclass(frozen=True, slots=True)
class CalibrationReport:
    model: LinearCostModel
    train_steps: int
    test_steps: int
    mape: float  # mean absolute percentage error on the held-out (later) steps, as a fraction
    median_ape: float  # median of the same errors

    def describe(self) -> str:
        m = self.model
        return (
            f"fit on {self.train_steps} steps, tested on {self.test_steps}: MAPE {self.mape:.1%}, "
            f"median APE {self.median_ape:.1%} "
            f"(a={m.a:.3g}s b={m.b:.3g}s/token c={m.c:.3g}s/KV-token d={m.d:.3g}s/pair "
            f"e={m.e:.3g}s/request)"
        )


def calibrate(steps: Sequence[EngineStep], train_fraction: float = 0.5) -> CalibrationReport:
    """Fit on the first `train_fraction` of the non-empty steps, report the error on the remainder."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    features = step_features(steps)
    times = np.asarray([s.duration for s in steps if s.scheduled_tokens], dtype=float)
    split = int(len(times) * train_fraction)
    if split < MIN_SAMPLES or len(times) - split < 1:
        raise ValueError(f"{len(times)} non-empty steps are too few to fit on {train_fraction:.0%} and test")
    model = fit_linear(features[:split], times[:split])
    errors = np.abs(model.predict(features[split:]) - times[split:]) / times[split:]
    return CalibrationReport(model, split, len(times) - split, float(errors.mean()), float(np.median(errors)))
