"""The core end to end on recorded real-engine streams, evaluating on a local task runner: windows evaluated,
several engines, restarts, duplicates, and every bound and loss counted."""

from __future__ import annotations

import dataclasses

import pytest

from tests import shadow_support as support
from tests.waiting import ManualClock, drain
from vllm_shadow.adapters.events import EngineInfo, RequestArrival, RequestFinish
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.evaluation.costs import engine_prior
from vllm_shadow.evaluation.recommend import Goal
from vllm_shadow.runtime import core as core_module
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig, ShadowCore
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.tracking.reasons import SkipReason, UnattributedReason
from vllm_shadow.tracking.windows import WindowRules

FAST = EvaluationSettings(optimal_time_limit=0.5, optimal_max_requests=24)


def config(**evaluation) -> ShadowConfig:
    return ShadowConfig(
        windows=WindowRules(seconds=0.5),
        hardware="cpu",
        evaluation=dataclasses.replace(FAST, **evaluation),
        goal=Goal(min_windows=2, min_calibration_steps=50),
        reorder_seconds=0.05,
    )


def relabel(batches: list[EventBatch], source: str, engine: str) -> list[EventBatch]:
    out = []
    for b in batches:
        events = [dataclasses.replace(e, engine=engine) if isinstance(e, EngineInfo) else e for e in b.events]
        out.append(EventBatch(events, source, b.sequence, b.dropped))
    return out


def test_a_recorded_run_is_evaluated_window_by_window() -> None:
    core = ShadowCore(config(), LocalTasks())
    for batch in support.batches("fcfs-kv12"):
        core.ingest(batch, "grpc")
    drain(core)
    (engine,) = core.snapshot().engines
    assert engine.windows_evaluated == engine.tracker.windows_ready == engine.tracker.windows_closed >= 5
    assert engine.windows_skipped == {}
    last = engine.last
    assert last.fidelity.step_match_ratio == 1.0
    assert {o.label for o in last.outcomes()} == set(engine.candidates)
    assert engine.simulated_gpu_seconds[engine.current] > 0
    assert engine.actual_gpu_seconds == pytest.approx(engine.tracker.actual_gpu_seconds)
    assert engine.verdict is not None and engine.verdict.evidence


def test_reordered_batches_give_the_same_windows() -> None:
    ordered = support.batches("priority-kv16")
    swapped = list(ordered)
    for i in range(1, len(swapped) - 1, 3):
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    results = []
    for stream in (ordered, swapped):
        core = ShadowCore(config(optimal=False), LocalTasks())
        for batch in stream:
            core.ingest(batch)
        drain(core)
        (engine,) = core.snapshot().engines
        results.append((engine.windows_evaluated, engine.tracker.steps, engine.sequence.lost_batches))
    assert results[0] == results[1] and results[0][2] == 0


def test_a_lost_batch_is_counted_and_only_the_windows_it_touches_are_skipped() -> None:
    stream = support.batches("fcfs-kv12")
    clock = ManualClock()
    # Room to hold every batch after the gap, and a wait no test run outlasts: only the core's clock gives the
    # missing batch up.
    settings = dataclasses.replace(config(optimal=False), reorder_batches=len(stream), reorder_seconds=60.0)
    core = ShadowCore(settings, LocalTasks(), monotonic=clock)
    for i, batch in enumerate(stream):
        if i != len(stream) // 2:
            core.ingest(batch)
    core.tick()
    assert core.snapshot().engines[0].sequence.lost_batches == 0  # still waiting for the missing batch
    clock.advance(settings.reorder_seconds + 1)
    core.tick()
    assert core.snapshot().engines[0].sequence.lost_batches == 1  # given up on, and the rest delivered
    drain(core)
    (engine,) = core.snapshot().engines
    assert engine.sequence.lost_batches == 1
    assert engine.windows_skipped.get(SkipReason.LOST_EVENTS, 0) >= 1
    assert engine.windows_evaluated >= 2
    assert engine.last.fidelity.step_match_ratio == 1.0


def test_several_engines_feed_one_shadow() -> None:
    core = ShadowCore(config(optimal=False), LocalTasks())
    a = relabel(support.batches("fcfs-kv12"), "host:1", "0")
    b = relabel(support.batches("fcfs-kv12"), "host:2", "1")
    for x, y in zip(a, b, strict=False):
        core.ingest(x)
        core.ingest(y)
    drain(core)
    engines = core.snapshot().engines
    assert [e.engine for e in engines] == ["0", "1"]
    assert engines[0].windows_evaluated == engines[1].windows_evaluated >= 5
    assert engines[0].tracker.requests_finished == engines[1].tracker.requests_finished


def test_replicas_of_one_deployment_share_one_cost_prior(monkeypatch: pytest.MonkeyPatch) -> None:
    # The roofline fit behind a prior takes milliseconds: done once per announcement, engine index aside.
    fitted = []

    def counted(info: EngineInfo, hardware: str):
        fitted.append(info.engine)
        return engine_prior(info, hardware)

    monkeypatch.setattr(core_module, "engine_prior", counted)
    core = ShadowCore(config(optimal=False), LocalTasks())
    stream = support.events("fcfs-kv12")
    info = support.info_of(stream)
    wider = dataclasses.replace(info, tensor_parallel_size=2)
    for source, engine, announced in (("host:1", "0", info), ("host:2", "1", info), ("host:3", "2", wider)):
        core.ingest(EventBatch([dataclasses.replace(announced, engine=engine), *stream[1:100]], source, 0, 0))
    assert fitted == ["0", "2"]
    engines = core.snapshot().engines
    assert [e.cost_prior for e in engines] == [engine_prior(i, "cpu")[1] for i in (info, info, wider)]


def test_an_engine_restarted_mid_run_is_counted_and_tracked_afresh() -> None:
    core = ShadowCore(config(optimal=False), LocalTasks())
    first = support.batches("fcfs-kv12")
    for batch in first[: len(first) // 2]:
        core.ingest(batch)
    live = core.snapshot().engines[0].live_requests
    assert live > 0
    for batch in relabel(support.batches("fcfs-kv12"), "host:restarted", "0"):
        core.ingest(batch)
    drain(core)
    (engine,) = core.snapshot().engines
    assert engine.restarts == 1 and engine.source == "host:restarted"
    assert engine.tracker.requests_abandoned == live
    assert engine.windows_skipped.get(SkipReason.ENGINE_RESTART, 0) >= 1
    assert engine.windows_evaluated >= 5 and engine.last.fidelity.step_match_ratio == 1.0


def test_a_request_only_sender_beside_the_mirror_is_ignored_and_counted() -> None:
    core = ShadowCore(config(optimal=False), LocalTasks())
    mirror = support.batches("fcfs-kv12")
    info = mirror[0].events[0]
    core.ingest(mirror[0])
    core.ingest(mirror[1])
    reports = [info, RequestArrival("x", 0.0, 10, 5), RequestFinish("x", 1.0, 5)]
    core.ingest(EventBatch(reports, "stat-logger", 0))
    snapshot = core.snapshot()
    assert len(snapshot.engines) == 1 and snapshot.engines[0].mode == "steps"
    assert snapshot.unattributed_drops[UnattributedReason.DUPLICATE_SOURCE] == 2


def test_events_from_a_sender_that_never_announced_its_engine_are_counted() -> None:
    core = ShadowCore(config(), LocalTasks())
    core.ingest(EventBatch([RequestArrival("x", 0.0, 10)], "anonymous", 0))
    snapshot = core.snapshot()
    assert snapshot.engines == () and snapshot.unattributed_drops == {UnattributedReason.NO_ENGINE_INFO: 1}


def test_windows_beyond_the_evaluation_queue_are_dropped_and_counted() -> None:
    core = ShadowCore(config(optimal=False, max_queued=1, max_in_flight=1), LocalTasks())
    for batch in support.batches("fcfs-kv12"):
        core.ingest(batch)
    drain(core)
    (engine,) = core.snapshot().engines
    dropped = engine.windows_skipped[SkipReason.EVALUATION_BACKLOG]
    assert dropped > 0 and engine.windows_evaluated + dropped == engine.tracker.windows_ready


def test_an_evaluation_past_its_time_limit_is_given_up_and_counted() -> None:
    core = ShadowCore(config(timeout_seconds=1e-3, optimal_time_limit=0.5), LocalTasks())
    for batch in support.batches("fcfs-kv12"):
        core.ingest(batch)
    drain(core)
    (engine,) = core.snapshot().engines
    assert engine.windows_skipped[SkipReason.EVALUATION_TIMEOUT] == engine.tracker.windows_ready
    assert engine.windows_evaluated == 0


def test_a_window_the_simulator_cannot_replay_is_an_evaluation_error_not_a_crash() -> None:
    """An engine announcing less KV than it used (a misconfigured sender): its windows cannot be replayed."""
    stream = support.batches("fcfs-kv12")
    info = stream[0].events[0]
    lying = dataclasses.replace(info, num_kv_blocks=3)
    stream[0] = EventBatch([lying, *stream[0].events[1:]], stream[0].source, 0)
    core = ShadowCore(config(optimal=False), LocalTasks())
    for batch in stream:
        core.ingest(batch)
    drain(core)
    (engine,) = core.snapshot().engines
    assert engine.windows_skipped[SkipReason.EVALUATION_ERROR] >= 1


def test_cp_sat_runs_on_every_k_th_window_and_the_bound_on_all() -> None:
    core = ShadowCore(config(optimal_every=3, optimal_max_requests=1000), LocalTasks())
    for batch in support.batches("fcfs-kv12"):
        core.ingest(batch)
    drain(core)
    recent = core.snapshot().engines[0].recent
    assert len(recent) >= 6
    for evaluation in recent:
        tried = evaluation.optimal.method == "cp-sat" or evaluation.optimal.status == "NO_SOLUTION"
        assert tried == (evaluation.index % 3 == 0), evaluation.optimal
