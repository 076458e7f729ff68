"""The per-engine request table and its windows, on mirror streams recorded from real vLLM engines.

The strongest check: every window, replayed from the engine state the tracker rebuilt at its start, reproduces
the engine's own steps exactly. Then loss: whatever is dropped, no window built on wrong state is evaluated,
every skipped window is counted with its reason, and tracking recovers.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import shadow_support as support
from vllm_shadow.adapters.events import (
    EngineInfo,
    EngineStep,
    RequestArrival,
    RequestFinish,
    SchedulerSettings,
)
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.evaluation.evaluate import Slo, check_fidelity
from vllm_shadow.evaluation.recorded_run import MirroredRun, request_latencies
from vllm_shadow.tracking.engine_state import EngineTracker
from vllm_shadow.tracking.reasons import SkipReason
from vllm_shadow.tracking.tracker import TrackerLimits
from vllm_shadow.tracking.windows import WindowRules


@pytest.mark.parametrize("name", support.NAMES)
@pytest.mark.parametrize("seconds", [0.25, 1.0])
def test_every_window_replays_the_engine_step_for_step_from_its_start_state(
    name: str, seconds: float
) -> None:
    windows = support.windows(name, seconds)
    assert len(windows) >= 5
    for window in windows:
        fidelity = check_fidelity(window, Slo())
        assert fidelity.steps_compared == len(window.steps) > 0
        assert fidelity.steps_matched == fidelity.steps_compared, fidelity.first_mismatch
    # Windows start mid-flight: requests running, waiting, and preempted ones waiting to recompute.
    assert sum(len(w.running) for w in windows) > 0 and sum(len(w.waiting) for w in windows) > 0


@pytest.mark.parametrize("name", support.NAMES)
def test_a_batch_applied_at_once_gives_what_its_events_applied_one_by_one_give(name: str) -> None:
    # `apply_run` is the core's hot path (one call per batch); `apply` the reference, one event at a time.
    stream = support.events(name)
    info, rest = support.info_of(stream), stream[1:]
    one_by_one, by_batch = support.tracker(info, 0.25), support.tracker(info, 0.25)
    for event in rest:
        one_by_one.apply(event)
    batch = [*rest[:500], info, *rest[500:1000]]  # an announcement is the caller's: the run stops before it
    assert by_batch.apply_run(batch, 0) == 500 and by_batch.apply_run(batch, 501) == len(batch)
    for start in range(1000, len(rest), 777):
        assert by_batch.apply_run(rest[start : start + 777], 0) == len(rest[start : start + 777])
    for tracker in (one_by_one, by_batch):
        tracker.flush()
    windows = one_by_one.take_ready()
    assert len(windows) >= 5 and repr(by_batch.take_ready()) == repr(windows)  # repr: NaN equal to NaN
    assert repr(by_batch.stats) == repr(one_by_one.stats)
    assert by_batch.stats.events["step"] == sum(isinstance(e, EngineStep) for e in rest)


def test_some_window_starts_with_a_preempted_request_waiting_to_recompute() -> None:
    stream = support.events("priority-kv16")
    prompts = {e.request_id: e.prompt_tokens for e in stream if isinstance(e, RequestArrival)}
    windows = support.windows("priority-kv16", 0.25)
    resumed = [r for w in windows for r in w.waiting if r.prompt_tokens > prompts[r.request_id]]
    assert resumed, "the stream is meant to leave preempted requests waiting at some window start"


@pytest.mark.parametrize("name", support.NAMES)
def test_windows_account_for_every_request_step_and_second(name: str) -> None:
    stream = support.events(name)
    tracker = support.tracker(support.info_of(stream), 0.5)
    for event in stream[1:]:
        tracker.apply(event)
    tracker.flush()
    windows = tracker.take_ready()
    run = MirroredRun.from_events(stream)
    own = [r.request_id for w in windows for r in w.arrivals]
    assert sorted(own) == sorted(r.request_id for r in run.requests)
    assert sum(len(w.steps) for w in windows) == len(run.steps) == tracker.stats.steps
    assert sum(w.actual_gpu_seconds for w in windows) == pytest.approx(sum(s.duration for s in run.steps))
    assert [w.index for w in windows] == list(range(len(windows)))
    assert tracker.stats.requests_finished == len(run.requests) and tracker.live_requests == 0
    # Every output length the windows carry is the one the engine reported.
    outputs = {r.request_id: r.output_tokens for r in run.requests}
    assert all(r.output_tokens == outputs[r.request_id] for w in windows for r in w.arrivals)


def test_observed_latencies_agree_with_the_stream_read_independently() -> None:
    stream = support.events("fcfs-kv12")
    expected = request_latencies(MirroredRun.from_events(stream))
    observed = {rid: o for w in support.windows("fcfs-kv12") for rid, o in w.observed.items()}
    assert observed.keys() == expected.keys()
    for rid, o in observed.items():
        assert o.ttft == pytest.approx(expected[rid].ttft) and o.e2e == pytest.approx(expected[rid].e2e)


def _replay_with(stream, tracker, at: int, action) -> list:
    for event in stream[1:at]:
        tracker.apply(event)
    action(tracker)
    for event in stream[at:]:
        tracker.apply(event)
    tracker.flush()
    return tracker.take_ready()


def test_lost_events_skip_the_windows_that_depend_on_them_then_tracking_recovers() -> None:
    stream = support.events("fcfs-kv12")
    cut = len(stream) // 3
    steps_before_cut = sum(isinstance(e, EngineStep) and bool(e.scheduled_tokens) for e in stream[:cut])
    whole = support.windows("fcfs-kv12", 0.25)
    tracker = support.tracker(support.info_of(stream), 0.25)
    windows = _replay_with(stream, tracker, cut, lambda t: t.lost_events())
    assert tracker.stats.windows_skipped[SkipReason.LOST_EVENTS] >= 1
    assert 0 < len(windows) < len(whole)
    assert all(check_fidelity(w, Slo()).step_match_ratio == 1.0 for w in windows)
    assert any(w.steps[0].step > steps_before_cut for w in windows), "tracking never recovered"


def test_an_arrival_that_never_came_taints_the_state_until_its_request_is_gone() -> None:
    stream = support.events("fcfs-kv12")
    victim = next(e for e in stream if isinstance(e, RequestArrival) and e.request_id.startswith("20-"))
    kept = [e for e in stream if e is not victim]
    tracker = support.tracker(support.info_of(stream), 0.25)
    for event in kept[1:]:
        tracker.apply(event)
    tracker.flush()
    windows = tracker.take_ready()
    assert tracker.stats.unknown_requests == 1 and tracker.stats.windows_skipped[SkipReason.LOST_EVENTS] >= 1
    assert victim.request_id not in {r.request.request_id for w in windows for r in w.running}
    assert all(check_fidelity(w, Slo()).step_match_ratio == 1.0 for w in windows)
    assert windows and tracker.live_requests == 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


INFO = EngineInfo(
    "m", 16, 64, SchedulerSettings(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=1024)
)
COST = LinearCostModel(a=1e-3, b=1e-5, c=1e-7)


def _tracker(clock: Clock, **limits: float) -> EngineTracker:
    return EngineTracker(
        INFO, rules=WindowRules(seconds=5.0), prior=COST, limits=TrackerLimits(**limits), clock=clock
    )


def test_a_request_that_makes_no_progress_is_given_up_and_its_windows_are_skipped() -> None:
    clock = Clock()
    t = _tracker(clock, request_stall_seconds=30.0)
    t.apply(RequestArrival("stuck", 0.0, 10, max_tokens=100))
    t.apply(RequestArrival("busy", 0.0, 10, max_tokens=100))
    t.apply(RequestArrival("queued", 0.0, 10, max_tokens=100))  # waits the whole minute, never scheduled
    t.apply(EngineStep(0, 0.0, 0.5, {"stuck": 10, "busy": 10}))
    for i in range(1, 60):  # "busy" decodes for a minute of engine time; "stuck" is never scheduled again
        t.apply(EngineStep(i, float(i), 0.5, {"busy": 1}))
        t.expire()
    assert t.stats.requests_timed_out == 1
    assert t.stats.windows_skipped[SkipReason.REQUEST_TIMEOUT] >= 1
    assert t.live_requests == 2  # "queued" waits as long as it takes: only running requests stall
    t.apply(EngineStep(60, 60.0, 0.5, {"busy": 1}, finished=("busy",)))
    t.apply(EngineStep(61, 61.0, 0.5, {"queued": 10}, finished=("queued",)))
    t.flush()
    ready = t.take_ready()
    assert ready and all("stuck" not in {r.request.request_id for r in w.running} for w in ready)
    assert t.stats.requests_finished == 2 and t.live_requests == 0
    # A later step naming the given-up request is a request we no longer know: counted, never evaluated.
    t.apply(EngineStep(62, 62.0, 0.5, {"stuck": 1}))
    assert t.stats.unknown_requests == 1


def test_a_silent_engine_s_live_requests_are_abandoned() -> None:
    stream = support.events("fcfs-kv12")
    clock = Clock()
    info = support.info_of(stream)
    t = EngineTracker(
        info,
        rules=WindowRules(seconds=0.25),
        prior=COST,
        limits=TrackerLimits(engine_silence_seconds=120.0),
        clock=clock,
    )
    for event in stream[1 : len(stream) // 2]:
        t.apply(event)
    live = t.live_requests
    assert live > 0
    clock.now += 60
    t.expire()
    assert t.live_requests == live  # quiet, not yet silent
    clock.now += 61
    t.expire()
    assert t.live_requests == 0 and t.stats.requests_abandoned == live
    assert t.stats.windows_skipped[SkipReason.ENGINE_SILENT] >= 1


def test_closed_windows_beyond_the_bound_are_dropped_oldest_first_and_counted() -> None:
    stream = support.events("fcfs-kv12")
    t = support.tracker(support.info_of(stream), 0.02, max_pending_windows=2)
    for event in stream[1:]:
        t.apply(event)
        assert t.pending_windows <= 3  # two closed, one open
    t.flush()
    ready = t.take_ready()
    assert t.stats.windows_skipped[SkipReason.BACKLOG] > 0
    assert len(ready) + t.stats.windows_skipped[SkipReason.BACKLOG] == t.stats.windows_closed
    assert all(check_fidelity(w, Slo()).step_match_ratio == 1.0 for w in ready)


def test_a_full_table_rejects_arrivals_and_stops_trusting_the_state() -> None:
    clock = Clock()
    t = _tracker(clock, max_live_requests=3)
    for i in range(5):
        t.apply(RequestArrival(f"r{i}", 0.0, 10))
    assert t.stats.requests_arrived == 3 and t.stats.requests_rejected == 2
    t.apply(EngineStep(0, 0.0, 0.1, {"r0": 10, "r3": 10}))  # the engine holds r3; we do not
    assert t.stats.unknown_requests == 1
    t.flush()
    assert t.take_ready() == []


def test_a_request_aborted_before_it_ran_leaves_no_trace_in_the_window() -> None:
    clock = Clock()
    t = _tracker(clock)
    t.apply(RequestArrival("gone", 0.0, 10))
    t.apply(RequestArrival("kept", 0.0, 10))
    t.apply(RequestFinish("gone", 0.1, 0, "abort"))
    t.apply(EngineStep(0, 0.2, 0.1, {"kept": 10}, finished=("kept",)))
    t.apply(RequestFinish("kept", 0.3, 1))
    t.flush()
    (window,) = t.take_ready()
    assert [r.request_id for r in window.arrivals] == ["kept"] and window.approximations == 0
    assert t.live_requests == 0 and t.stats.requests_finished == 2


def test_an_arrival_announced_twice_counts_once() -> None:
    t = _tracker(Clock())
    arrival = RequestArrival("a", 0.0, 10)
    t.apply(arrival)
    t.apply(dataclasses.replace(arrival))
    assert t.stats.requests_arrived == 1 and t.live_requests == 1


def test_the_window_rules_close_on_time_or_on_requests() -> None:
    rules = WindowRules(seconds=2.0, requests=3)
    assert rules.full(2.0, 0, 0) and rules.full(0.1, 3, 0) and not rules.full(1.9, 2, 10)
    assert WindowRules(seconds=None, requests=5, max_requests=8).full(0.0, 2, 6)
    with pytest.raises(ValueError):
        WindowRules(seconds=None, requests=None)


@given(
    seconds=st.one_of(st.none(), st.floats(0.01, 100.0)),
    requests=st.one_of(st.none(), st.integers(1, 50)),
    max_requests=st.integers(1, 60),
    elapsed=st.one_of(st.floats(0.0, 200.0), st.just(0.0)),
    arrived=st.integers(0, 70),
    carried=st.integers(0, 70),
)
def test_the_trackers_per_step_test_is_the_window_rules(
    seconds: float | None, requests: int | None, max_requests: int, elapsed: float, arrived: int, carried: int
) -> None:
    """The engine tracker tests a window's fullness through `arrivals_to_full`, fixed when the window opens."""
    if seconds is None and requests is None:
        requests = 1
    rules = WindowRules(seconds=seconds, requests=requests, max_requests=max_requests)
    by_arrivals = arrived >= rules.arrivals_to_full(carried)
    assert rules.full(elapsed, arrived, carried) == (
        (seconds is not None and elapsed >= seconds) or by_arrivals
    )


def test_victims_of_one_step_wait_in_vllm_s_order_nearest_the_running_head_first() -> None:
    """vLLM pops victims off the running queue's tail and puts each at the waiting queue's front."""
    t = _tracker(Clock())
    for rid in ("a", "b", "c"):
        t.apply(RequestArrival(rid, 0.0, 16))
    t.apply(EngineStep(0, 0.0, 0.1, {"a": 16, "b": 16, "c": 16}))
    t.apply(EngineStep(1, 0.1, 0.1, {"a": 1}, preempted=("c", "b")))  # a set: no order on the wire
    t.flush()  # the next window starts at this boundary
    t.apply(RequestArrival("d", 0.2, 16))
    t.apply(EngineStep(2, 0.2, 0.1, {"a": 1, "b": 17, "c": 17, "d": 16}, finished=("a", "b", "c", "d")))
    t.flush()
    windows = t.take_ready()
    assert [r.request_id for r in windows[-1].waiting] == ["b", "c"]
    # Each comes back as the recomputation it will do: prompt plus its one token, one token left to emit.
    assert [(r.prompt_tokens, r.output_tokens) for r in windows[-1].waiting] == [(17, 1), (17, 1)]


def test_an_engine_holding_more_than_a_window_may_gets_time_marking_windows_counted_as_too_large() -> None:
    stream = support.events("fcfs-kv12")
    info = support.info_of(stream)
    t = EngineTracker(
        info, rules=WindowRules(seconds=0.25, max_requests=4), prior=COST, clock=Clock()
    )  # a few requests are more than four at once in this run
    for event in stream[1:]:
        t.apply(event)
    t.flush()
    ready = t.take_ready()
    skipped = t.stats.windows_skipped[SkipReason.TOO_LARGE]
    assert skipped > 0 and ready
    assert all(w.num_requests <= 4 + len(w.arrivals) for w in ready)
    assert all(check_fidelity(w, Slo()).step_match_ratio == 1.0 for w in ready)
    # Marking time, not churning: windows close on their rules, not at every step.
    assert len(ready) + sum(t.stats.windows_skipped.values()) < t.stats.steps / 10


def test_an_id_used_again_after_its_request_finished_is_a_new_request() -> None:
    """vLLM takes an id again once its request finished. The windows that still hold the first request would
    read the second under its id: they are given up and counted, and the second is tracked like any other."""
    t = _tracker(Clock())
    t.apply(RequestArrival("a", 0.0, 10, max_tokens=2))
    t.apply(RequestArrival("b", 0.0, 10, max_tokens=50))
    t.apply(EngineStep(0, 0.0, 0.1, {"a": 10, "b": 10}))
    t.apply(EngineStep(1, 0.1, 0.1, {"a": 1, "b": 1}, finished=("a",)))
    t.apply(RequestArrival("a", 0.3, 20, max_tokens=1))  # the id again: a new request of 20 tokens
    assert t.stats.windows_skipped[SkipReason.REUSED_ID] == 1
    t.apply(EngineStep(2, 0.3, 0.1, {"b": 1, "a": 20}, finished=("a",)))
    t.apply(EngineStep(3, 0.4, 0.1, {"b": 1}, finished=("b",)))
    t.flush()
    (window,) = t.take_ready()
    assert [(r.request_id, r.prompt_tokens) for r in window.arrivals] == [("a", 20)]
    assert [r.request.request_id for r in window.running] == ["b"]
    assert check_fidelity(window, Slo()).step_match_ratio == 1.0
    assert t.stats.requests_arrived == 3 and t.stats.requests_finished == 3 and t.live_requests == 0


def test_a_step_naming_a_finished_request_again_without_its_arrival_taints_the_state() -> None:
    """The id of a finished request, still held by a window, scheduled again with no arrival before it (the
    new request's arrival was lost): counted as unknown and the state given up, never an exception."""
    t = _tracker(Clock())
    t.apply(RequestArrival("a", 0.0, 10, max_tokens=1))
    t.apply(RequestArrival("b", 0.0, 10, max_tokens=50))
    t.apply(EngineStep(0, 0.0, 0.1, {"b": 10, "a": 10}, finished=("a",)))
    t.apply(EngineStep(1, 0.1, 0.1, {"b": 1, "a": 5}))
    assert t.stats.unknown_requests == 1 and t.stats.windows_skipped[SkipReason.LOST_EVENTS] == 1
    t.apply(EngineStep(2, 0.2, 0.1, {"b": 1}, finished=("b",)))
    t.apply(RequestArrival("c", 0.3, 10, max_tokens=1))  # the state is known again once "b" is gone
    t.apply(EngineStep(3, 0.3, 0.1, {"c": 10}, finished=("c",)))
    t.flush()
    (window,) = t.take_ready()
    assert [r.request_id for r in window.arrivals] == ["c"] and not window.running
    assert t.stats.steps == 4 and t.live_requests == 0


def test_a_step_of_zero_token_counts_is_tracked_without_calibrating() -> None:
    """Zero tokens for a request is valid on the wire: the step is tracked, the calibrator has nothing to fit."""
    t = _tracker(Clock())
    t.apply(RequestArrival("a", 0.0, 10, max_tokens=1))
    t.apply(EngineStep(0, 0.0, 0.1, {"a": 0}))
    assert t.calibrator.samples == 0 and t.stats.steps == 1
    t.apply(EngineStep(1, 2.0, 0.1, {"a": 10}, finished=("a",)))
    assert t.calibrator.samples == 1 and t.live_requests == 0
