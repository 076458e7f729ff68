"""The compiled engine tracker (shadow/tracking/engine_state.py built by Cython, see setup.py) against the
plain-Python one.

Both run the same source. The property test drives both with the same random event streams (arrivals, steps with
admissions, preemptions and finishes, reported finishes and aborts, ids never announced, lost events, idle and
stall time-outs, a full request table; FCFS and priority, prefix caching and async scheduling on and off) and holds
them to the same outcome after every call: the same exception if any, and at the end the same windows, counters,
calibrated model and request table. The recorded real-engine streams are held to it too.

The compiled tracker must be built (`pip install -e .` builds it). Only where the build was skipped on purpose
(VLLM_SHADOW_SKIP_COMPILE=1, a machine without a C compiler) do these tests skip instead of failing.
"""

from __future__ import annotations

import os
import time
import types
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import shadow_support as support
from tests.compiled_support import current_build
from vllm_shadow.adapters.events import (
    EngineInfo,
    EngineStep,
    Event,
    RequestArrival,
    RequestFinish,
    SchedulerSettings,
)
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.evaluation.costs import engine_prior
from vllm_shadow.tracking import engine_state
from vllm_shadow.tracking.tracker import TrackerLimits
from vllm_shadow.tracking.windows import WindowRules

COST = LinearCostModel(a=1e-3, b=1e-5, c=1e-7, d=1e-9, e=2e-5)


def trackers() -> tuple[ModuleType, ModuleType]:
    """(compiled, pure); skips only where the build was skipped on purpose, fails anywhere else."""
    compiled = current_build(
        engine_state.compiled_tracker(), engine_state.COMPILED_MODULE, "engine tracker", compiled_build_stale
    )
    pure = engine_state.pure_tracker()
    assert pure.EngineTracker is not compiled.EngineTracker
    # A request's counts are C fields in the build (getset descriptors), Python slots in the plain tracker.
    assert isinstance(compiled._Request.__dict__["computed"], types.GetSetDescriptorType)
    assert isinstance(pure._Request.__dict__["computed"], types.MemberDescriptorType)
    return compiled, pure


def compiled_build_stale(compiled: ModuleType) -> list[str]:
    from vllm_shadow.solver import compiled_build

    return compiled_build.stale_sources(compiled, engine_state._SOURCE, engine_state._DECLARATIONS)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def view(tracker: Any) -> dict[str, Any]:
    """Everything a tracker hands out or keeps, as comparable values (repr: NaN equal to NaN, and an extension
    type's request compared by its fields)."""
    requests = {
        request_id: (
            r.arrival,
            r.arrival_step,
            r.prompt,
            r.max_tokens,
            r.priority,
            r.block_hashes,
            r.output_block_hashes,
            r.computed,
            r.dropped_kv,
            r.generated,
            r.first_token,
            r.finish,
            r.finished,
            r.reported_output,
            r.last_progress,
            r.admission,
            r.last_run,
            r.prev_run,
            r.last_sampled,
            r.last_decode,
            r.refs,
            r.running,
            r.tainted,
        )
        for request_id, r in tracker._requests.items()
    }
    calibrator = tracker.calibrator
    return {
        "windows": repr(tracker.take_ready()),
        "stats": repr(tracker.stats),
        "model": repr((calibrator.model(), calibrator.mape(), calibrator.samples)),
        "requests": repr(requests),
        "queues": (list(tracker._running), list(tracker._waiting)),
        "reading": (tracker.live_requests, tracker.pending_windows, tracker.prefix_cache_mismatches),
        "next_index": tracker.next_index,
    }


# ---- random streams --------------------------------------------------------------------------------------------


@st.composite
def streams(draw: st.DrawFn) -> tuple[EngineInfo, dict[str, Any], list[tuple[str, Any]]]:
    """An engine announcement, tracker settings and a list of calls: ("event", Event), ("lost", None),
    ("idle", seconds of shadow clock), ("expire", seconds), ("flush", None). The steps are plausible (known
    ids mostly, tokens up to a prompt's worth) but not checked against vLLM's rules: whatever the tracker makes
    of an odd stream, both trackers must make the same."""
    block_size = draw(st.sampled_from([1, 4, 16]))
    settings_ = SchedulerSettings(
        policy=draw(st.sampled_from(["fcfs", "priority"])),
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=4096,
        enable_prefix_caching=draw(st.booleans()),
        async_scheduling=draw(st.booleans()),
    )
    info = EngineInfo("m", block_size, draw(st.integers(4, 64)), settings_)
    options = {
        "seconds": draw(st.sampled_from([0.05, 0.3, 2.0])),
        "max_requests": draw(st.sampled_from([3, 2000])),
        "max_live_requests": draw(st.sampled_from([4, 10, 100])),
        "max_pending_windows": draw(st.sampled_from([1, 32])),
        "calibration_steps_per_second": draw(st.sampled_from([20.0, 1e6])),
    }
    calls: list[tuple[str, Any]] = []
    now, step_number, fresh = 0.0, 0, 0
    live: list[str] = []  # arrived, not finished by a step: what steps schedule
    running: list[str] = []  # scheduled since it last arrived or was preempted
    prompts: dict[str, int] = {}
    scheduled_once: set[str] = set()
    hashes = st.lists(st.integers(0, 6), max_size=4).map(tuple)
    for _ in range(draw(st.integers(1, 80))):
        kind = draw(st.sampled_from(["arrival"] * 3 + ["step"] * 6 + ["finish", "other"]))
        if kind == "arrival":
            if prompts and draw(st.integers(0, 9)) == 0:  # an id announced before (a resent batch)
                request_id = draw(st.sampled_from(sorted(prompts)))
            else:
                request_id, fresh = f"r{fresh}", fresh + 1
                live.append(request_id)
            prompt = draw(st.integers(0, 90))
            prompts.setdefault(request_id, prompt)
            arrival = RequestArrival(
                request_id,
                now,
                prompt,
                max_tokens=draw(st.none() | st.integers(1, 50)),
                priority=draw(st.integers(-2, 2)),
                block_hashes=draw(hashes),
            )
            calls.append(("event", arrival))
        elif kind == "step":
            pool = [*live, "ghost"] if draw(st.integers(0, 14)) == 0 else live  # an id never announced
            chosen = draw(st.lists(st.sampled_from(pool), unique=True, max_size=6)) if pool else []
            scheduled = {
                r: draw(st.integers(0, max(1, prompts.get(r, 1))) if draw(st.booleans()) else st.just(1))
                for r in chosen
            }
            victims = [r for r in running if r not in scheduled]
            preempted = (
                tuple(draw(st.lists(st.sampled_from(victims), unique=True, max_size=2))) if victims else ()
            )
            finished = (
                tuple(draw(st.lists(st.sampled_from(chosen), unique=True, max_size=2))) if chosen else ()
            )
            cached = (
                {r: draw(st.integers(0, 16)) for r in chosen if draw(st.integers(0, 3)) == 0}
                if settings_.enable_prefix_caching
                else {}
            )
            duration = draw(st.sampled_from([0.0, 0.004, 0.02, 0.02, 0.3]))
            calls.append(
                (
                    "event",
                    EngineStep(
                        step_number,
                        now,
                        duration,
                        scheduled,
                        preempted,
                        finished=finished,
                        kv_blocks_used=draw(st.integers(0, 8)),
                        cached_tokens=cached,
                    ),
                )
            )
            step_number += 1
            now += duration + draw(st.sampled_from([0.0, 0.001, 0.5]))
            gone = {*preempted, *finished}
            scheduled_once.update(scheduled)
            running = [r for r in dict.fromkeys([*running, *scheduled]) if r not in gone]
            live = [r for r in live if r not in finished]
        elif kind == "finish":  # mostly a request a step finished (its output), else one aborted or unknown
            request_id = draw(st.sampled_from([*prompts, "ghost"]))
            if request_id not in scheduled_once:  # aborted before it ran: the tracker forgets it
                live = [r for r in live if r != request_id]
            output_hashes = draw(hashes) if settings_.enable_prefix_caching else ()
            calls.append(
                ("event", RequestFinish(request_id, now, draw(st.integers(0, 6)), block_hashes=output_hashes))
            )
        else:
            other = draw(st.sampled_from(["lost", "idle", "expire", "flush", "info"]))
            if other in ("idle", "expire"):
                calls.append((other, draw(st.sampled_from([0.5, 3.0, 200.0]))))
            elif other == "info":
                calls.append(("event", info))
            else:
                calls.append((other, None))
    return info, options, calls


def run(module: ModuleType, info: EngineInfo, options: dict[str, Any], calls: list[tuple[str, Any]]) -> list:
    """The calls on a fresh tracker of `module`: what each returned or raised, then the tracker's `view`."""
    clock = Clock()
    limits = TrackerLimits(
        max_live_requests=options["max_live_requests"],
        max_pending_windows=options["max_pending_windows"],
        request_stall_seconds=0.4,
        engine_silence_seconds=100.0,
        calibration_steps_per_second=options["calibration_steps_per_second"],
    )
    rules = WindowRules(seconds=options["seconds"], max_requests=options["max_requests"], idle_seconds=2.0)
    tracker = module.EngineTracker(info, rules=rules, prior=COST, limits=limits, clock=clock)
    outcomes: list = []
    for kind, argument in calls:
        try:
            if kind == "event":
                tracker.apply(argument)
            elif kind == "lost":
                tracker.lost_events()
            elif kind == "idle":
                clock.now += argument
                tracker.close_idle()
            elif kind == "expire":
                clock.now += argument
                tracker.expire()
            else:
                tracker.flush()
            outcomes.append(None)
        except Exception as error:  # an odd stream may make both raise: alike
            outcomes.append(repr(error))
        # A request's `running` is its id's membership in the running queue, whatever happened.
        assert {r for r, request in tracker._requests.items() if request.running} == set(tracker._running)
    tracker.flush()
    return [outcomes, view(tracker)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_the_compiled_tracker_follows_the_plain_one_on_random_streams(
    stream: tuple[EngineInfo, dict[str, Any], list[tuple[str, Any]]],
) -> None:
    compiled, pure = trackers()
    info, options, calls = stream
    assert run(compiled, info, options, calls) == run(pure, info, options, calls)


@pytest.mark.parametrize("name", support.NAMES)
@pytest.mark.parametrize("by_batch", [False, True])
def test_the_compiled_tracker_follows_the_plain_one_on_recorded_engines(name: str, by_batch: bool) -> None:
    compiled, pure = trackers()
    stream: list[Event] = support.events(name)
    info = support.info_of(stream)
    views = []
    for module in (compiled, pure):
        tracker = module.EngineTracker(
            info, rules=WindowRules(seconds=0.25), prior=engine_prior(info, "cpu")[0], clock=time.monotonic
        )
        if by_batch:  # the core's hot path: a batch at a time, an announcement handed back to the caller
            for first in range(1, len(stream), 300):
                batch, index = stream[first : first + 300], 0
                while index < len(batch):
                    index = tracker.apply_run(batch, index)
                    if index < len(batch):
                        tracker.apply(batch[index])
                        index += 1
        else:
            for event in stream[1:]:
                tracker.apply(event)
        tracker.flush()
        views.append(view(tracker))
    assert views[0] == views[1]
    assert views[0]["windows"].count("TrafficWindow(") >= 5


def test_the_tracker_in_use_is_the_compiled_one_unless_plain_python_is_asked_for() -> None:
    compiled, pure = trackers()
    if os.environ.get("VLLM_SHADOW_PURE_PYTHON", "") not in ("", "0"):
        assert engine_state.EngineTracker is pure.EngineTracker and not engine_state.COMPILED
    else:
        assert engine_state.EngineTracker is compiled.EngineTracker and engine_state.COMPILED
