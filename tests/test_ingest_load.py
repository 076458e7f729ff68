"""The loopback load benchmark (benchmarks/ingest_load.py) on a small scale: its real path delivers every event
of the relabelled recorded streams, it fills the receiver to the bounds it says, and a step that lost anything
fails for the reasons it names."""

from __future__ import annotations

import dataclasses
import itertools

from benchmarks.ingest_load import (
    EngineStream,
    Step,
    failure,
    parse_args,
    receive_path,
    run_scenario,
)
from vllm_shadow.adapters.events import EngineStep, RequestArrival

SMALL = ["--max-steps", "1", "--start-rate", "2000", "--step-seconds", "0.5", "--idle-seconds", "0.1"]


def test_a_low_rate_reaches_the_receiver_whole_over_loopback() -> None:
    (step,) = run_scenario("baseline", parse_args(SMALL))
    assert step.ok, failure(step)
    assert step.events == 1000 and step.sender_dropped == step.sender_lost == step.receiver_lost == 0
    assert step.drain_seconds is not None and step.engines == 1 and step.sources == 1
    assert step.rss_mib > 0 and step.receiver_cpu_us_per_event > 0


def test_the_bounds_are_filled_as_the_scenarios_say() -> None:
    bounds = [
        "--max-engines",
        "2",
        "--max-sources",
        "6",
        "--max-live-requests",
        "10300",
        "--live-margin",
        "10000",
    ]
    (sources,) = run_scenario("source bound", parse_args(SMALL + bounds))
    assert sources.ok, failure(sources)
    assert sources.engines == 2 and sources.sources == 6  # two engines talking, four idle senders
    (live,) = run_scenario("live bound", parse_args(SMALL + bounds))
    assert live.ok, failure(live)
    assert live.live_requests >= 300  # the held arrivals, and the stream's own on top, none rejected


def test_a_step_that_lost_anything_or_fell_behind_fails_and_says_why() -> None:
    clean = Step("baseline", 1000, 1000, 1000, 0, 0, {}, 0, 0.01, 50.0, 150.0, 1, 1, 1, ok=True)
    assert failure(clean) == "at 1,000/s: "
    lost = dataclasses.replace(
        clean, sender_lost=24, sender_failures={"RESOURCE_EXHAUSTED": 1}, receiver_lost=3
    )
    assert failure(lost) == "at 1,000/s: 24 events in failed calls (1 RESOURCE_EXHAUSTED), receiver lost 3"
    slow = dataclasses.replace(clean, achieved=900, drain_seconds=None, sender_dropped=5)
    assert failure(slow) == (
        "at 1,000/s: sender kept 900/s, publisher queue full: 5 dropped, receiver fell behind"
    )


def test_each_repetition_of_a_recording_is_a_fresh_consistent_stream() -> None:
    stream = EngineStream(3)
    assert stream.info.engine == "3"
    n = len(stream._template)
    first, second = stream.take(n), stream.take(n)
    ids = [{e.request_id for e in part if isinstance(e, RequestArrival)} for part in (first, second)]
    assert ids[0] and not ids[0] & ids[1]  # no request id twice
    steps = [e for e in first + second if isinstance(e, EngineStep)]
    assert all(a.step < b.step and a.start_time <= b.start_time for a, b in itertools.pairwise(steps))
    assert all(set(s.scheduled_tokens) <= ids[0] | ids[1] for s in steps)  # steps name only arrived requests


def test_the_receive_path_takes_every_event_of_the_relabelled_streams() -> None:
    # receive_path checks that nothing was unattributed, lost or rejected; here, that each cost was measured.
    costs = receive_path(engines=2, repetitions=1)
    assert [c.what.strip() for c in costs] == [
        "decode (wire -> events)",
        "the same through upb (the oracle)",
        "decode + sequencing + trackers",
        "the same, online calibration off",
        "the same, decoded beforehand",
    ]
    assert all(c.events > 1000 and c.cpu_seconds > 0 for c in costs)
