"""End to end with a real vLLM engine (CPU build, tiny Llama): engine -> mirror hook -> gRPC -> shadow ->
/metrics, checked against the same engine's recorded stream; and a request that never finishes."""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("vllm", reason="the CPU build of vLLM is installed by `make test`")

import psutil

from tests.shadow_support import metric, scrape
from tests.waiting import wait_until
from vllm_shadow.adapters.events import EngineStep, RequestFinish
from vllm_shadow.adapters.recorder import read_events
from vllm_shadow.adapters.traces import bundled_trace, read_trace
from vllm_shadow.adapters.vllm.engine_run import EngineSetup, drive, start_engine, stop_engine, trace_workload
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig
from vllm_shadow.runtime.service import ServiceConfig, ShadowService
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.tracking.reasons import SkipReason
from vllm_shadow.tracking.tracker import TrackerLimits
from vllm_shadow.tracking.windows import WindowRules

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SILENCE = 4.0  # seconds without events after which the shadow drops a silent engine's live requests


class ShiftedClock:
    """The wall clock plus a shift the test adds to, to let the shadow see time pass that did not."""

    def __init__(self) -> None:
        self.shift = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift


CLOCK = ShiftedClock()


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("shadow-vllm")
    config = ServiceConfig(
        shadow=ShadowConfig(
            windows=WindowRules(seconds=1.0),
            limits=TrackerLimits(engine_silence_seconds=SILENCE),
            hardware="cpu",
            evaluation=EvaluationSettings(optimal_time_limit=1.0, optimal_max_requests=24),
        ),
        tick_seconds=0.1,
    )
    service = ShadowService(config, LocalTasks(), clock=CLOCK)
    saved = dict(os.environ)
    os.environ["SHADOW_ADDRESS"] = service.addresses()["grpc"]
    os.environ["SHADOW_RECORD"] = str(tmp / "engine.jsonl")
    try:
        engine = start_engine(EngineSetup(num_kv_blocks=12))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield service, engine, tmp / "engine.jsonl"
    stop_engine(engine)
    service.close()


def test_metrics_scraped_from_the_shadow_agree_with_the_engine_s_own_recording(session) -> None:
    service, engine, recording = session
    requests = trace_workload(read_trace(bundled_trace("azure-conv"), limit=24).requests, seconds=1.0)
    produced = drive(engine, requests)
    assert len(produced) == 24
    wait_until(
        lambda: sum(e.tracker.requests_finished for e in service.snapshot().engines) == 24,
        60,
        "the shadow to see 24 requests finish",
        every=0.1,
    )
    service.flush()
    wait_until(service.idle, 60, "the shadow to evaluate every window", every=0.1)
    recorded = list(read_events(recording))
    steps = [e for e in recorded if isinstance(e, EngineStep) and e.scheduled_tokens]
    (engine_snapshot,) = service.snapshot().engines
    labels = {"model_name": engine_snapshot.model_name, "engine": engine_snapshot.engine}
    found = scrape(service)

    assert metric(found, "vllm_shadow_requests_finished_total", **labels) == sum(
        isinstance(e, RequestFinish) for e in recorded
    )
    assert metric(found, "vllm_shadow_engine_steps_total", **labels) == len(steps)
    measured = sum(s.duration for s in steps)
    assert metric(found, "vllm_shadow_actual_gpu_seconds_total", **labels) == pytest.approx(measured)
    evaluated = metric(found, "vllm_shadow_windows_evaluated_total", **labels)
    assert evaluated >= 1 and metric(
        found, "vllm_shadow_evaluated_gpu_seconds_total", **labels
    ) <= measured * (1 + 1e-9)
    assert metric(found, "vllm_shadow_self_replay_step_match_ratio", **labels) == 1.0
    assert metric(found, "vllm_shadow_window_actual_gpu_seconds", **labels) <= measured
    assert sum(v for (n, _), v in found.items() if n == "vllm_shadow_windows_skipped_total") == 0
    assert metric(found, "vllm_shadow_events_dropped_total", reason="sender_queue", **labels) == 0


def test_requests_in_flight_when_the_engine_dies_are_counted_once_it_falls_silent(session) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    service, engine, _ = session
    before = service.snapshot().engines[0]
    for i in range(3):
        engine.add_request(
            f"endless-{i}",
            TokensPrompt(prompt_token_ids=[7] * 64),
            SamplingParams(max_tokens=1500, ignore_eos=True, detokenize=False),
        )
    wait_until(
        lambda: service.snapshot().engines[0].tracker.steps > before.tracker.steps + 10,
        20,
        "ten more engine steps",
        every=0.1,
    )
    # The engine process dies mid-generation (a graceful shutdown would abort them, and say so): these
    # requests never finish.
    (core,) = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]
    core.kill()
    core.wait(timeout=10)
    assert service.snapshot().engines[0].live_requests == 3
    CLOCK.shift += SILENCE + 1  # the engine's silence passes on the shadow's clock, not the wall's
    wait_until(
        lambda: (
            service.snapshot().engines[0].tracker.requests_abandoned == before.tracker.requests_abandoned + 3
        ),
        10,
        "the silent engine's three requests to be abandoned",
        every=0.1,
    )
    after = service.snapshot().engines[0]
    assert after.live_requests == 0
    silent = SkipReason.ENGINE_SILENT
    assert after.windows_skipped.get(silent, 0) == before.windows_skipped.get(silent, 0) + 1
