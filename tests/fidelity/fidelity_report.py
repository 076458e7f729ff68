"""Fidelity of `solver`'s vLLM policy against a real vLLM engine, and of the calibrated cost model.

For each engine configuration: drive the real engine (CPU build, tiny Llama) with arrivals from the bundled
Azure conversation trace, scaled to the tiny model and squeezed so that KV runs short; record the mirror
stream; replay it in step space through `solver` and compare step by step; calibrate the linear cost model on
the first half of the measured steps and report its error on the second half; replay in time with the
calibrated model and report per-request TTFT and end-to-end errors.

With prefix caching on (`PREFIX_CONFIGS`), the prompts are token ids that share prefixes, so vLLM's prefix
cache really hits: a few system prompts, multi-turn conversations growing a shared history, and Mooncake's hash
ids (adapters.vllm.prefix_workloads); the step comparison then also covers each admitted request's cache hit.

    python -m tests.fidelity.fidelity_report             # all configurations, one table (from the repository root)
    python -m tests.fidelity.fidelity_report --prefix    # only the prefix-caching configurations
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.calibration_report import CalibrationReport, calibrate, step_features
from vllm_shadow.adapters.events import EngineStep, RequestArrival
from vllm_shadow.adapters.recorder import read_events
from vllm_shadow.adapters.traces import bundled_trace, read_trace, resolve_trace
from vllm_shadow.adapters.vllm.engine_run import (
    EngineSetup,
    drive_prompts,
    start_engine,
    stop_engine,
    trace_workload,
)
from vllm_shadow.adapters.vllm.prefix_workloads import (
    PromptedRequest,
    conversations,
    mooncake_conversations,
    shared_system_prompts,
)
from vllm_shadow.evaluation.candidates import current_policy
from vllm_shadow.evaluation.recorded_run import MirroredRun, replay_in_step_space, request_latencies
from vllm_shadow.evaluation.step_match import StepComparison, StepMismatch, compare_steps
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
TRACE_REQUESTS = 40


def workload(setup: EngineSetup, requests: int = TRACE_REQUESTS) -> list[RequestArrival]:
    trace = read_trace(bundled_trace("azure-conv"), limit=requests)
    return trace_workload(trace.requests, seconds=1.0, priorities=3 if setup.policy == "priority" else 0)


def _priorities(setup: EngineSetup) -> int:
    return 3 if setup.policy == "priority" else 0


def system_prompt_workload(setup: EngineSetup) -> list[PromptedRequest]:
    """The Azure arrivals and output lengths; three system prompts of 2-4 blocks, each request's own question."""
    return shared_system_prompts(workload(setup), max_question_tokens=300)


def multi_turn_workload(setup: EngineSetup) -> list[PromptedRequest]:
    """Eight conversations of five turns, each turn sent when the previous one finished."""
    return conversations(8, 5, output_tokens=(32, 160), priorities=_priorities(setup))


def engine_reply_workload(setup: EngineSetup) -> list[PromptedRequest]:
    """Six conversations of five turns, each turn sending back the tokens the engine generated for the previous
    one (a chat client's history), on a KV cache large enough to keep most of it between turns."""
    return conversations(6, 5, output_tokens=(32, 160), priorities=_priorities(setup), engine_replies=True)


def mooncake_workload(setup: EngineSetup) -> list[PromptedRequest]:
    """Whole Mooncake conversations (40 requests), one hash id per CPU block of 128 tokens."""
    trace = read_trace(resolve_trace("mooncake-conv"))
    assert trace.block_tokens
    return mooncake_conversations(trace.requests, trace.block_tokens, count=40, priorities=_priorities(setup))


Workload = Callable[[EngineSetup], Sequence[PromptedRequest]]
CACHING = EngineSetup(enable_prefix_caching=True)
# Prefix caching on, with prompts that share prefixes; KV sized so that preemption happens.
PREFIX_CONFIGS: dict[str, tuple[EngineSetup, Workload]] = {
    "prefix-system-fcfs-kv12": (
        dataclasses.replace(CACHING, num_kv_blocks=12),
        system_prompt_workload,
    ),
    "prefix-system-priority-kv12-threshold128": (
        dataclasses.replace(CACHING, num_kv_blocks=12, policy="priority", long_prefill_token_threshold=128),
        system_prompt_workload,
    ),
    "prefix-system-fcfs-kv12-unchunked": (
        dataclasses.replace(
            CACHING, num_kv_blocks=12, enable_chunked_prefill=False, max_num_batched_tokens=2048
        ),
        system_prompt_workload,
    ),
    "prefix-multiturn-fcfs-kv24": (
        dataclasses.replace(CACHING, num_kv_blocks=24),
        multi_turn_workload,
    ),
    "prefix-multiturn-priority-kv20-unchunked": (
        dataclasses.replace(
            CACHING,
            num_kv_blocks=20,
            policy="priority",
            enable_chunked_prefill=False,
            max_num_batched_tokens=2048,
        ),
        multi_turn_workload,
    ),
    "prefix-multiturn-engine-replies-fcfs-kv32": (
        dataclasses.replace(CACHING, num_kv_blocks=32),
        engine_reply_workload,
    ),
    "prefix-mooncake-fcfs-kv16-threshold256": (
        dataclasses.replace(CACHING, num_kv_blocks=16, long_prefill_token_threshold=256),
        mooncake_workload,
    ),
    "prefix-mooncake-priority-kv16": (
        dataclasses.replace(CACHING, num_kv_blocks=16, policy="priority"),
        mooncake_workload,
    ),
    "prefix-mooncake-fcfs-kv16-unchunked": (
        dataclasses.replace(
            CACHING, num_kv_blocks=16, enable_chunked_prefill=False, max_num_batched_tokens=2048
        ),
        mooncake_workload,
    ),
}


CACHE_HITS = "cache-hits"


@dataclass(slots=True)
class FidelityResult:
    name: str
    run: MirroredRun
    produced: dict[str, int]  # output tokens per request, as the engine returned them
    comparison: StepComparison
    calibration: CalibrationReport
    ttft_median_error: float
    e2e_median_error: float
    simulated_cached_tokens: int = 0  # prefix-cache hits of the step-space replay, all steps
    timing: StepTimeNoise | None = None

    @property
    def preemptions(self) -> int:
        return sum(len(s.preempted) for s in self.run.steps)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the engine found in its prefix cache, over all admissions and resumptions."""
        return sum(sum(s.cached_tokens.values()) for s in self.run.steps)

    def row(self) -> str:
        noise = f"  {self.timing.describe()}" if self.timing else ""
        return (
            f"{self.name:42s} steps {len(self.run.steps):4d} (+{self.run.empty_steps} empty)  "
            f"preemptions {self.preemptions:3d}  cache hits {self.cached_tokens:6d} "
            f"(replay {self.simulated_cached_tokens:6d})  identical {self.comparison.match_ratio:7.2%}  "
            f"step-time MAPE {self.calibration.mape:6.1%} (median {self.calibration.median_ape:6.1%})  "
            f"TTFT err {self.ttft_median_error:6.1%}  E2E err {self.e2e_median_error:6.1%}{noise}"
        )


@dataclass(frozen=True, slots=True)
class StepTimeNoise:
    """How much of the step-time error is the machine's, not the model's: decode-only steps of the held-out
    half with the same batch (requests, KV tokens within one 128-token bucket) should take the same time;
    their spread around their group's median is a floor no model of the batch can beat."""

    steps: int  # decode-only held-out steps in groups of 4 or more
    floor: float  # median |duration - group median| / group median
    model_error: float  # the calibrated model's median relative error on the same steps
    total_time_error: float  # (sum of predicted - sum of measured) / measured, held-out steps: the bias

    def describe(self) -> str:
        return (
            f"decode noise floor {self.floor:5.1%} vs model {self.model_error:5.1%} on {self.steps} steps, "
            f"held-out time bias {self.total_time_error:+5.1%}"
        )


def step_time_noise(steps: Sequence[EngineStep], calibration: CalibrationReport) -> StepTimeNoise:
    features = step_features(steps)
    durations = [s.duration for s in steps if s.scheduled_tokens]
    held_out = range(calibration.train_steps, len(durations))
    groups: dict[tuple[int, int], list[int]] = {}
    for i in held_out:
        tokens, kv, _, requests = features[i]
        if tokens == requests:  # one token per request: decode only
            groups.setdefault((int(requests), int(kv) // 128), []).append(i)
    floor, model_error = [], []
    for members in groups.values():
        if len(members) < 4:
            continue
        median = statistics.median(durations[i] for i in members)
        for i in members:
            floor.append(abs(durations[i] - median) / median)
            model_error.append(
                abs(calibration.model.predict(features[i : i + 1])[0] - durations[i]) / durations[i]
            )
    predicted = sum(calibration.model.predict(features[calibration.train_steps :]))
    measured = sum(durations[calibration.train_steps :])
    return StepTimeNoise(
        len(floor),
        statistics.median(floor) if floor else float("nan"),
        statistics.median(model_error) if model_error else float("nan"),
        (predicted - measured) / measured,
    )


def compare_with_cache_hits(real: Sequence[EngineStep], simulated: Sequence[EngineStep]) -> StepComparison:
    """`compare_steps`, and a step that agrees there must also give every request it admitted (or resumed) the
    same prefix-cache hit."""
    comparison = compare_steps(real, simulated)
    diverged = {m.index for m in comparison.mismatches}
    real = [s for s in real if s.scheduled_tokens]
    for i, (r, s) in enumerate(zip(real, simulated, strict=False)):
        if i not in diverged and r.cached_tokens != s.cached_tokens:
            comparison.mismatches.append(
                StepMismatch(i, (CACHE_HITS,), r.cached_tokens, s.cached_tokens, r.preempted, s.preempted)
            )
            comparison.matched -= 1
    comparison.mismatches.sort(key=lambda m: m.index)
    return comparison


def record_run(
    setup: EngineSetup, requests: Sequence[PromptedRequest], path: Path
) -> tuple[MirroredRun, dict[str, int]]:
    """Drive a fresh engine with `requests`, its mirror recording to `path`."""
    os.environ["SHADOW_RECORD"] = str(path)  # read by the mirror inside the engine process it spawns
    try:
        engine = start_engine(setup)
    finally:
        del os.environ["SHADOW_RECORD"]
    try:
        produced = drive_prompts(engine, requests)
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
    real = request_latencies(run)
    pairs = [(r, real[r.request_id]) for r in sim.requests if r.request_id in real]
    ttft = [abs(s.ttft - r.ttft) / r.ttft for s, r in pairs]
    e2e = [abs(s.e2e - r.e2e) / r.e2e for s, r in pairs]
    return statistics.median(ttft), statistics.median(e2e)


def assess(name: str, run: MirroredRun, produced: dict[str, int]) -> FidelityResult:
    """Replay a recorded run in step space and compare; calibrate on its first half; replay it in time."""
    calibration = calibrate(run.steps)
    replay = replay_in_step_space(run, calibration.model).steps or []
    comparison = compare_with_cache_hits(run.steps, replay)
    ttft, e2e = latency_errors(run, calibration)
    hits = sum(sum(s.cached_tokens.values()) for s in replay)
    noise = step_time_noise(run.steps, calibration)
    return FidelityResult(name, run, produced, comparison, calibration, ttft, e2e, hits, noise)


def evaluate_prompts(
    name: str, setup: EngineSetup, requests: Sequence[PromptedRequest], directory: Path
) -> FidelityResult:
    run, produced = record_run(setup, requests, directory / f"{name}.jsonl")
    return assess(name, run, produced)


def evaluate(name: str, setup: EngineSetup, directory: Path) -> FidelityResult:
    """A prefix-caching-off configuration of `CONFIGS` on the Azure workload (one token id per prompt)."""
    requests = sorted(workload(setup), key=lambda r: r.time)
    prompted = [PromptedRequest(r, (100 + i % 1000,) * r.prompt_tokens) for i, r in enumerate(requests)]
    return evaluate_prompts(name, setup, prompted, directory)


def evaluate_prefix(name: str, directory: Path) -> FidelityResult:
    """A configuration of `PREFIX_CONFIGS`: prefix caching on, prompts sharing prefixes."""
    setup, build = PREFIX_CONFIGS[name]
    return evaluate_prompts(name, setup, build(setup), directory)


def served_workload(setup: EngineSetup) -> list[PromptedRequest]:
    """Eight concurrent clients, each a conversation of four turns opening with one of two system prompts."""
    return conversations(8, 4, system_prompts=2, priorities=_priorities(setup))


SERVED = "prefix-served-fcfs-kv16"
SERVED_SETUP = dataclasses.replace(CACHING, num_kv_blocks=16)


def evaluate_served(directory: Path, setup: EngineSetup = SERVED_SETUP, name: str = SERVED) -> FidelityResult:
    """The OpenAI-compatible server with concurrent clients (tests/fidelity/serve_run.py), compared likewise.
    `produced` is keyed by the workload's request ids (the server names requests itself)."""
    from tests.fidelity.serve_run import drive_clients, running_server

    with running_server(setup, directory, name) as server:
        produced = drive_clients(server, str(setup.model), served_workload(setup))
    run = MirroredRun.from_events(read_events(server.recording))
    return assess(name, run, produced)


def _total(results: Sequence[FidelityResult]) -> tuple[int, int]:
    compared = sum(max(r.comparison.real_steps, r.comparison.simulated_steps) for r in results)
    return sum(r.comparison.matched for r in results), compared


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    only_prefix = "--prefix" in args
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        if not only_prefix:
            results = []
            for name, setup in CONFIGS.items():
                results.append(evaluate(name, setup, Path(tmp)))
                print(results[-1].row(), flush=True)
            matched, total = _total(results)
            print(
                f"prefix caching off, all configurations: {matched}/{total} steps identical ({matched / total:.2%})"
            )
            failed |= matched != total
        cached = []
        for name in PREFIX_CONFIGS:
            cached.append(evaluate_prefix(name, Path(tmp)))
            print(cached[-1].row(), flush=True)
            if cached[-1].comparison.mismatches:
                print("  ", cached[-1].comparison.describe(), flush=True)
        cached.append(evaluate_served(Path(tmp)))
        print(cached[-1].row(), flush=True)
        matched, total = _total(cached)
        print(
            f"prefix caching on, all configurations: {matched}/{total} steps identical ({matched / total:.2%})"
        )
        failed |= matched != total
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
