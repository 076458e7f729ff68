"""Reassembling a mirrored run: arrival steps in non-empty-step space, outputs, latencies, step features."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.calibration_report import calibrate, step_features
from vllm_shadow.adapters.events import EngineInfo, EngineStep, RequestArrival, RequestFinish
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.evaluation.recorded_run import MirroredRun, request_latencies

# The order the mirror guarantees: an arrival follows the step before the one that could first schedule it.
STREAM = [
    EngineInfo("tiny", 128, 12),
    RequestArrival("a", 10.0, 3, max_tokens=2),
    EngineStep(0, 10.1, 0.1, {"a": 3}),  # a's prefill: its first token ends this step
    RequestArrival("b", 10.15, 2, max_tokens=3),
    EngineStep(1, 10.2, 0.1, {"a": 1, "b": 2}, finished=("a",)),
    RequestFinish("a", 10.3, 2),
    EngineStep(2, 10.3, 0.0, {}),  # empty (vLLM telling the workers what finished): not counted
    RequestArrival("c", 10.35, 4, max_tokens=1),
    EngineStep(3, 10.4, 0.1, {"b": 1, "c": 2}, preempted=()),
    EngineStep(4, 10.5, 0.1, {"c": 2}, preempted=("b",)),
    EngineStep(5, 10.6, 0.1, {"b": 3}, resumed=("b",), finished=("c",)),
    RequestFinish("c", 10.7, 1),
    EngineStep(6, 10.7, 0.1, {"b": 1}, finished=("b",)),
    RequestFinish("b", 10.8, 3),
]


def test_arrival_steps_count_non_empty_steps_before_each_arrival() -> None:
    run = MirroredRun.from_events(STREAM)
    assert run.arrival_steps == {"a": 0, "b": 1, "c": 2}
    assert run.empty_steps == 1 and len(run.steps) == 6
    assert [(r.request_id, r.output_tokens) for r in run.finished_requests] == [("a", 2), ("b", 3), ("c", 1)]
    assert run.info is not None and run.info.num_kv_blocks == 12


def test_latencies_come_from_the_steps_that_completed_prefill_and_produced_the_last_token() -> None:
    latency = request_latencies(MirroredRun.from_events(STREAM))
    assert latency["a"].ttft == pytest.approx(0.2) and latency["a"].e2e == pytest.approx(0.3)
    assert latency["b"].ttft == pytest.approx(0.15) and latency["b"].e2e == pytest.approx(0.65)
    assert latency["c"].ttft == pytest.approx(0.25) and latency["c"].e2e == pytest.approx(0.35)


def test_step_features_rebuild_context_through_preemption_and_finish() -> None:
    run = MirroredRun.from_events(STREAM)
    # (T, K, P, R): K sums context after the step; P sums new * context_after over multi-token chunks; R
    # counts the requests in the step.
    assert step_features(run.steps).tolist() == [
        [3, 3, 9, 1],
        [3, 4 + 2, 4, 2],  # a decodes at 4; b prefills 2
        [3, 3 + 2, 4, 2],  # b decodes at 3; c's first chunk of 2
        [2, 4, 8, 1],  # c's second chunk
        [3, 3, 9, 1],  # b recomputes from scratch after its preemption
        [1, 4, 0, 1],
    ]


def test_calibration_recovers_a_known_model_and_reports_error_on_later_steps() -> None:
    truth = LinearCostModel(a=0.004, b=3e-5, c=2e-7, d=0.0, e=4e-4)
    rng = np.random.default_rng(0)
    steps = []
    context: dict[str, int] = {}
    for i in range(400):
        batch = {
            f"r{j}": int(rng.integers(1, 300)) if j == i % 7 else 1 for j in range(int(rng.integers(1, 12)))
        }
        new, ctx = list(batch.values()), [context.get(r, 0) for r in batch]
        steps.append(EngineStep(i, float(i), truth.batch_time(new, ctx), batch))
        for r, n in batch.items():
            context[r] = context.get(r, 0) + n
    report = calibrate(steps, train_fraction=0.5)
    assert (report.train_steps, report.test_steps) == (200, 200)
    assert report.mape < 1e-6 and report.model.a == pytest.approx(truth.a, rel=1e-6)
    assert report.model.e == pytest.approx(truth.e, rel=1e-6)
    assert "e=0.0004s/request" in report.describe()
    with pytest.raises(ValueError):
        calibrate(steps[:6])
