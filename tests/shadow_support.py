"""Shared by the shadow's tests: the recorded real-engine streams (tests/data/shadow) and small builders."""

from __future__ import annotations

import dataclasses
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from vllm_shadow.adapters.events import EngineInfo, EngineStep, Event, RequestArrival, RequestFinish
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.recorder import read_batches, read_events
from vllm_shadow.evaluation.costs import engine_prior
from vllm_shadow.runtime.service import ShadowService
from vllm_shadow.tracking.engine_state import EngineTracker
from vllm_shadow.tracking.tracker import TrackerLimits
from vllm_shadow.tracking.windows import TrafficWindow, WindowRules

STREAMS = Path(__file__).resolve().parent / "data" / "shadow"
NAMES = ("fcfs-kv12", "priority-kv16", "fcfs-kv6-crowded")


def events(name: str) -> list[Event]:
    return list(read_events(STREAMS / f"{name}.jsonl.gz"))


def batches(name: str) -> list[EventBatch]:
    return list(read_batches(STREAMS / f"{name}.jsonl.gz"))


def info_of(stream: list[Event]) -> EngineInfo:
    info = stream[0]
    assert isinstance(info, EngineInfo)
    return info


def tracker(info: EngineInfo, seconds: float = 0.5, **limits: float) -> EngineTracker:
    return EngineTracker(
        info,
        rules=WindowRules(seconds=seconds),
        prior=engine_prior(info, "cpu")[0],
        limits=TrackerLimits(**limits),
        clock=time.monotonic,
    )


def windows(name: str, seconds: float = 0.5) -> list[TrafficWindow]:
    stream = events(name)
    t = tracker(info_of(stream), seconds)
    for event in stream[1:]:
        t.apply(event)
    t.flush()
    return t.take_ready()


def scrape(service: ShadowService) -> dict[tuple[str, frozenset], float]:
    """A live service's /metrics, as {(sample name, its labels): value}."""
    with urllib.request.urlopen(service.addresses()["metrics"], timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(found: dict, name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels`."""
    (value,) = [v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls]
    return value


def repetition(
    events: Iterable[Event], copy: int, offset: float, rename: Callable[[str], str]
) -> Iterator[Event]:
    """A recorded stream's arrivals, steps and finishes as its `copy`-th repetition: request ids renamed, times
    moved on by `offset`, step numbers by a million a copy (load benchmarks replay one recording many times)."""
    for e in events:
        if isinstance(e, RequestArrival | RequestFinish):
            yield dataclasses.replace(e, request_id=rename(e.request_id), time=e.time + offset)
        elif isinstance(e, EngineStep):
            yield dataclasses.replace(
                e,
                step=e.step + copy * 1_000_000,
                start_time=e.start_time + offset,
                scheduled_tokens={rename(r): n for r, n in e.scheduled_tokens.items()},
                preempted=tuple(map(rename, e.preempted)),
                resumed=tuple(map(rename, e.resumed)),
                finished=tuple(map(rename, e.finished)),
                cached_tokens={rename(r): n for r, n in e.cached_tokens.items()},
            )
