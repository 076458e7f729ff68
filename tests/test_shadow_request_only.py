"""Windows for senders that report requests only once finished (OTLP spans, the stat-logger plugin)."""

from __future__ import annotations

import dataclasses
import math
import time

from tests import shadow_support as support
from vllm_shadow.adapters.events import RequestArrival, RequestFinish
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.evaluation.evaluate import Slo, check_fidelity
from vllm_shadow.evaluation.recorded_run import MirroredRun
from vllm_shadow.tracking.request_only import RequestOnlyTracker
from vllm_shadow.tracking.windows import WindowRules

COST = LinearCostModel(a=5e-3, b=4e-5, c=1e-7)


def reports(name: str) -> tuple[list, MirroredRun]:
    """What an OTLP receiver makes of the run: per finished request, its arrival (with its output length) and its
    finish, in the order the requests finished."""
    run = MirroredRun.from_events(support.events(name))
    out = []
    for rid in sorted(run.finishes, key=lambda r: run.finishes[r].time):
        arrival = next(r for r in run.requests if r.request_id == rid)
        out += [arrival, run.finishes[rid]]
    return out, run


def tracker(run: MirroredRun, lateness: float) -> RequestOnlyTracker:
    return RequestOnlyTracker(
        run.info, rules=WindowRules(seconds=0.5, lateness_seconds=lateness), prior=COST, clock=time.monotonic
    )


def test_every_request_lands_in_exactly_one_window_cut_on_the_arrival_clock() -> None:
    events, run = reports("fcfs-kv12")
    t = tracker(run, lateness=60.0)
    for event in events:
        t.apply(event)
    t.flush()
    windows = t.take_ready()
    ids = [r.request_id for w in windows for r in w.arrivals]
    assert sorted(ids) == sorted(r.request_id for r in run.requests)
    for window in windows:
        assert not window.exact and not window.running and window.cost == COST
        assert all(0 <= r.time < 0.5 for r in window.arrivals)
        fidelity = check_fidelity(window, Slo())
        assert fidelity.steps_compared == 0 and not math.isnan(fidelity.e2e_error_ratio)


def test_a_request_reported_after_its_window_was_evaluated_is_late_and_counted() -> None:
    events, run = reports("fcfs-kv12")
    t = tracker(run, lateness=0.0)
    for event in events:
        t.apply(event)
    t.flush()
    windows = t.take_ready()
    evaluated = sum(len(w.arrivals) for w in windows)
    assert t.stats.late_requests > 0
    assert evaluated + t.stats.late_requests == len(run.requests)


def test_a_finish_without_its_arrival_is_unknown_and_an_unfinished_arrival_times_out() -> None:
    events, run = reports("fcfs-kv12")
    t = tracker(run, lateness=60.0)
    first_arrival, first_finish = events[0], events[1]
    assert isinstance(first_arrival, RequestArrival) and isinstance(first_finish, RequestFinish)
    t.apply(first_finish)
    assert t.stats.unknown_requests == 1
    t.apply(dataclasses.replace(first_arrival, request_id="never-finishes", time=first_arrival.time - 1000))
    for event in events[2:]:
        t.apply(event)
    t.expire()
    assert t.stats.requests_timed_out == 1 and t.live_requests == 0
