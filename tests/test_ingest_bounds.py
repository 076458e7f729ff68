"""Bounds under floods: work under the core's lock stays flat at the live-request bound, and the number of
engines and senders (so the exporter's series) stays bounded, idle ones evicted and counted.

Complexity is asserted by behaviour, never by wall clock: the work a call does is counted as the lines of
our own code it executes plus the comparisons of request ids it makes (a linear scan of a deque or list runs
in C, so it shows up only as comparisons), at two sizes. Constant work per call stays about the same; linear
work grows with the size.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import shadow_support as support
from tests.waiting import ManualClock
from vllm_shadow.adapters.events import EngineInfo, EngineStep, RequestArrival, RequestFinish
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.readout.exporter import exposition
from vllm_shadow.runtime import core as runtime_core
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig, ShadowCore
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.tracking import engine_state
from vllm_shadow.tracking.reasons import UnattributedReason

OUR_CODE = str(Path(support.__file__).resolve().parent.parent)
TESTS = str(Path(support.__file__).resolve().parent)


@pytest.fixture(autouse=True)
def plain_python_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine tracker as plain Python: the work counted is the lines it executes, and the compiled tracker
    (the same source, tests/test_compiled_tracker.py) executes none that a trace sees."""
    plain = engine_state.pure_tracker().EngineTracker
    for module in (engine_state, runtime_core, support):
        monkeypatch.setattr(module, "EngineTracker", plain)


class RequestId(str):
    """A request id that counts the comparisons made with it (what a linear scan of a container costs)."""

    comparisons = 0

    def __eq__(self, other: object) -> bool:
        RequestId.comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def work(call: Callable[[], object]) -> int:
    """Lines of the shadow's own code `call` executes, plus request-id comparisons."""
    lines = 0

    def local(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
        return local

    def start(frame, event, arg):
        name = frame.f_code.co_filename
        if name.startswith(OUR_CODE) and not name.startswith(TESTS):
            return local
        return None

    RequestId.comparisons = 0
    sys.settrace(start)
    try:
        call()
    finally:
        sys.settrace(None)
    return lines + RequestId.comparisons


def fresh(request_id: str) -> RequestId:
    """An id equal to `request_id` but a distinct object, as a decoded message carries it."""
    return RequestId("".join(request_id))


def arrivals(n: int, start: int = 0) -> list[RequestArrival]:
    return [RequestArrival(RequestId(f"r{i}"), float(i) * 1e-3, 16) for i in range(start, start + n)]


INFO = EngineInfo("m", block_size=16, num_kv_blocks=1_000_000)
# Constant work per call may differ a little between sizes; linear work grows 8x here.
SIZES = (1_000, 8_000)


# ---- the tracker at its bounds -------------------------------------------------------------------------------


def test_arrivals_past_the_live_request_bound_cost_constant_work() -> None:
    def per_refused_arrival(bound: int) -> float:
        tracker = support.tracker(INFO, max_live_requests=bound)
        for event in arrivals(bound):
            tracker.apply(event)
        tracker.apply(arrivals(1, start=bound)[0])  # the first refusal: the state becomes unknown, once
        refused = arrivals(200, start=bound + 1)
        cost = work(lambda: [tracker.apply(e) for e in refused])
        assert tracker.stats.requests_rejected == 201 and tracker.live_requests == bound
        return cost / len(refused)

    small, large = (per_refused_arrival(n) for n in SIZES)
    assert large < 2 * small, (small, large)


def test_aborts_with_many_requests_waiting_cost_constant_work() -> None:
    def per_abort(waiting: int) -> float:
        tracker = support.tracker(INFO)
        events = arrivals(waiting)
        for event in events:
            tracker.apply(event)
        # Aborted before they ever ran, from the back of the queue: what a client's disconnects do.
        aborts = [RequestFinish(fresh(e.request_id), 1.0, 0, "abort") for e in events[-300:-100]]
        cost = work(lambda: [tracker.apply(e) for e in aborts])
        assert tracker.live_requests == waiting - len(aborts)
        return cost / len(aborts)

    small, large = (per_abort(n) for n in SIZES)
    assert large < 2 * small, (small, large)


def test_finishes_from_a_large_running_batch_cost_constant_work_each() -> None:
    def per_finish(running: int) -> float:
        tracker = support.tracker(INFO)
        events = arrivals(running)
        for event in events:
            tracker.apply(event)
        ids = [e.request_id for e in events]
        tracker.apply(EngineStep(0, 0.0, 0.01, {r: 16 for r in ids}))  # all admitted, prefills done
        finished = tuple(fresh(r) for r in ids[-300:-100])  # the latest admitted: at the running queue's end
        step = EngineStep(1, 0.01, 0.01, {r: 1 for r in ids[-300:]}, finished=finished)
        cost = work(lambda: tracker.apply(step))
        assert tracker.live_requests == running - len(finished)
        return cost / len(finished)

    small, large = (per_finish(n) for n in SIZES)
    assert large < 2 * small, (small, large)


def test_a_step_naming_unknown_ids_costs_linear_work_and_keeps_the_bound() -> None:
    def per_unknown(unknown: int) -> float:
        tracker = support.tracker(INFO, max_live_requests=10 * unknown)
        for event in arrivals(50):
            tracker.apply(event)
        step = EngineStep(0, 0.0, 0.01, {RequestId(f"ghost{i}"): 1 for i in range(unknown)})
        cost = work(lambda: tracker.apply(step))
        assert tracker.stats.unknown_requests == unknown
        return cost / unknown

    small, large = (per_unknown(n) for n in SIZES)
    assert large < 2 * small, (small, large)


def test_placeholders_for_unknown_ids_respect_the_live_request_bound() -> None:
    tracker = support.tracker(INFO, max_live_requests=500)
    for event in arrivals(100):
        tracker.apply(event)
    tracker.apply(EngineStep(0, 0.0, 0.01, {f"ghost{i}": 1 for i in range(5_000)}))
    assert tracker.live_requests <= 500
    assert tracker.stats.unknown_requests == 5_000 and tracker.stats.requests_rejected == 5_000 - 400
    # Still a working tracker: the ghosts finish, the requests it knows stay.
    tracker.apply(EngineStep(1, 0.01, 0.01, {}, finished=tuple(f"ghost{i}" for i in range(5_000))))
    assert tracker.live_requests == 100


# ---- engines and senders ----------------------------------------------------------------------------------------


def bounded_core(clock: ManualClock, **bounds: float) -> ShadowCore:
    config = ShadowConfig(hardware="cpu", evaluation=EvaluationSettings(optimal=False), **bounds)
    return ShadowCore(config, LocalTasks(), monotonic=clock)


def engine_batch(n: int, *, sequence: int = 0, events: int = 1) -> EventBatch:
    info = EngineInfo(f"model-{n}", block_size=16, num_kv_blocks=1000, engine=str(n))
    first = [info] if sequence == 0 else []
    return EventBatch(
        first + [RequestArrival(f"s{n}-{sequence}-{i}", 0.0, 16) for i in range(events)],
        source=f"host:{n}",
        sequence=sequence,
    )


def test_senders_are_bounded_and_the_idle_ones_evicted_to_make_room() -> None:
    clock = ManualClock()
    core = bounded_core(clock, max_sources=4, max_engines=100, idle_eviction_seconds=60.0)
    for n in range(4):
        core.ingest(engine_batch(n))
    assert core.ingest(engine_batch(4, events=3)) == 0  # every sender active: the newcomer is refused
    snapshot = core.snapshot()
    assert snapshot.sources == 4 and snapshot.sources_evicted == 0
    assert snapshot.unattributed_drops[UnattributedReason.TOO_MANY_SOURCES] == 4
    clock.advance(30)
    for n in (1, 2, 3):
        core.ingest(engine_batch(n, sequence=1))  # sender 0 falls silent
    clock.advance(31)
    assert core.ingest(engine_batch(4, events=3)) == 4  # sender 0, idle for 61 s, makes room
    snapshot = core.snapshot()
    assert snapshot.sources == 4 and snapshot.sources_evicted == 1
    assert "host:0" not in core.engine_infos() and "host:4" in core.engine_infos()


def test_engines_are_bounded_and_the_idle_ones_evicted_to_make_room() -> None:
    clock = ManualClock()
    core = bounded_core(clock, max_sources=100, max_engines=3, idle_eviction_seconds=60.0)
    for n in range(3):
        core.ingest(engine_batch(n))
    core.ingest(engine_batch(3))
    snapshot = core.snapshot()
    assert [e.model_name for e in snapshot.engines] == ["model-0", "model-1", "model-2"]
    assert (
        snapshot.unattributed_drops[UnattributedReason.TOO_MANY_ENGINES] == 1
        and snapshot.engines_evicted == 0
    )
    clock.advance(30)
    core.ingest(engine_batch(0, sequence=1))
    core.ingest(engine_batch(2, sequence=1))
    clock.advance(31)
    core.ingest(engine_batch(3, sequence=1))  # engine 1, silent for 61 s, is forgotten
    snapshot = core.snapshot()
    assert [e.model_name for e in snapshot.engines] == ["model-0", "model-2", "model-3"]
    assert snapshot.engines_evicted == 1 and snapshot.engines[-1].tracker.requests_arrived == 1


def test_thousands_of_engine_labels_keep_the_exporter_s_series_bounded() -> None:
    """4,000 engine labels once made 164,261 series: now the engines beyond the bound are refused, counted."""
    clock = ManualClock()
    core = bounded_core(clock)
    for n in range(4_000):
        core.ingest(engine_batch(n))
    snapshot = core.snapshot()
    bound = core.config.max_engines
    assert len(snapshot.engines) == bound and snapshot.sources == core.config.max_sources
    lines = [line for line in exposition(snapshot).splitlines() if line and not line.startswith("#")]
    per_engine = sum(1 for line in lines if 'model_name="model-0"' in line)
    assert per_engine > 0 and len(lines) < (bound + 1) * per_engine
    dropped = snapshot.unattributed_drops
    assert dropped[UnattributedReason.TOO_MANY_SOURCES] + dropped[UnattributedReason.TOO_MANY_ENGINES] > 0


@pytest.mark.parametrize("field", ["max_engines", "max_sources"])
def test_the_bounds_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        bounded_core(ManualClock(), **{field: 0})
