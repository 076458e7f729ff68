"""Fidelity of `solver`'s vLLM policy against a real vLLM engine, and of the calibrated cost model.

For each engine configuration: drive the real engine (CPU build, tiny Llama) with arrivals from the bundled
Azure conversation trace, scaled to the tiny model and squeezed so that KV runs short; record the mirror
stream; replay it in step space through `solver` and compare step by step; calibrate the linear cost model on
the first half of the measured steps and report its error on the second half; replay in time with the
calibrated model and report per-request TTFT and end-to-end errors.

    python -m tests.fidelity.fidelity_report   # all configurations, one table (from the repository root)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.calibration_report import CalibrationReport, calibrate
from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.recorder import read_events
from vllm_shadow.adapters.traces import bundled_trace, read_trace
from vllm_shadow.adapters.vllm.engine_run import EngineSetup, drive, start_engine, stop_engine, trace_workload
from vllm_shadow.evaluation.candidates import current_policy
from vllm_shadow.evaluation.recorded_run import MirroredRun, replay_in_step_space, request_latencies
from vllm_shadow.evaluation.step_match import StepComparison, compare_steps
from vllm_shadow.solver.simulator import simulate

# Engine configurations by name; KV sizes are chosen so that preemption happens.
CONFIGS: dict[str, EngineSetup] = {
    "fcfs-kv12": EngineSetup(num_kv_blocks=12),
    "fcfs-kv16-threshold64": EngineSetup(num_kv_blocks=16, long_prefill_token_threshold=64),
    "fcfs-kv24-budget256": EngineSetup(num_kv_blocks=24, max_num_batched_tokens=256, max_num_seqs=16),
    # Without chunked prefill a prompt must fit the budget whole, so the budget covers max_model_len.
    "fcfs-kv16-unchunked": EngineSetup(
        num_kv_blocks=16, enable_chunked_prefill=False, max_num_batched_tokens=2048
    ),
    "priority-kv12": EngineSetup(num_kv_blocks=12, policy="priority"),
    "priority-kv16-threshold128": EngineSetup(
        num_kv_blocks=16, policy="priority", long_prefill_token_threshold=128
    ),
}
PREFIX_CACHING = EngineSetup(num_kv_blocks=16, long_prefill_token_threshold=64, enable_prefix_caching=True)
TRACE_REQUESTS = 40


def workload(setup: EngineSetup, requests: int = TRACE_REQUESTS) -> list[RequestArrival]:
    trace = read_trace(bundled_trace("azure-conv"), limit=requests)
    return trace_workload(trace.requests, seconds=1.0, priorities=3 if setup.policy == "priority" else 0)


@dataclass(slots=True)
class FidelityResult:
    name: str
    run: MirroredRun
    produced: dict[str, int]  # output tokens per request, as the engine returned them
    comparison: StepComparison
    calibration: CalibrationReport
    ttft_median_error: float
    e2e_median_error: float

    @property
    def preemptions(self) -> int:
        return sum(len(s.preempted) for s in self.run.steps)

    def row(self) -> str:
        return (
            f"{self.name:28s} steps {len(self.run.steps):4d} (+{self.run.empty_steps} empty)  "
            f"preemptions {self.preemptions:3d}  identical {self.comparison.match_ratio:7.2%}  "
            f"step-time MAPE {self.calibration.mape:6.1%} (median {self.calibration.median_ape:6.1%})  "
            f"TTFT err {self.ttft_median_error:6.1%}  E2E err {self.e2e_median_error:6.1%}"
        )


def record_run(setup: EngineSetup, requests: list[RequestArrival], path: Path) -> tuple[MirroredRun, dict]:
    """Drive a fresh engine with `requests`, its mirror recording to `path`."""
    os.environ["SHADOW_RECORD"] = str(path)  # read by the mirror inside the engine process it spawns
    try:
        engine = start_engine(setup)
    finally:
        del os.environ["SHADOW_RECORD"]
    try:
        produced = drive(engine, requests)
    finally:
        stop_engine(engine)
    return MirroredRun.from_events(read_events(path)), produced


def latency_errors(run: MirroredRun, calibration: CalibrationReport) -> tuple[float, float]:
    """Median relative TTFT and E2E error of a time-driven self replay with the calibrated model."""
    assert run.info is not None
    sim = simulate(
        run.finished_requests,
        current_policy(run.info.scheduler),
        calibration.model,
        num_kv_blocks=run.info.num_kv_blocks,
        block_size=run.info.block_size,
    )
    real = request_latencies(run)  # with prefix caching a request may never compute its whole prompt: skipped
    pairs = [(r, real[r.request_id]) for r in sim.requests if r.request_id in real]
    ttft = [abs(s.ttft - r.ttft) / r.ttft for s, r in pairs]
    e2e = [abs(s.e2e - r.e2e) / r.e2e for s, r in pairs]
    return statistics.median(ttft), statistics.median(e2e)


def evaluate(name: str, setup: EngineSetup, directory: Path) -> FidelityResult:
    run, produced = record_run(setup, workload(setup), directory / f"{name}.jsonl")
    calibration = calibrate(run.steps)
    comparison = compare_steps(run.steps, replay_in_step_space(run, calibration.model).steps or [])
    ttft, e2e = latency_errors(run, calibration)
    return FidelityResult(name, run, produced, comparison, calibration, ttft, e2e)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        results = [evaluate(name, setup, Path(tmp)) for name, setup in CONFIGS.items()]
        for result in results:
            print(result.row(), flush=True)
        cached = evaluate("prefix-caching-fcfs-kv16-thr64", PREFIX_CACHING, Path(tmp))
        print(cached.row())
        print("prefix caching on:", cached.comparison.describe())
    total = sum(max(r.comparison.real_steps, r.comparison.simulated_steps) for r in results)
    matched = sum(r.comparison.matched for r in results)
    print(
        f"prefix caching off, all configurations: {matched}/{total} steps identical ({matched / total:.2%})"
    )
    return 0 if matched == total else 1


if __name__ == "__main__":
    sys.exit(main())
