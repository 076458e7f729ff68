"""The shadow's core at each of its bounds: events per CPU second, /metrics render time, and RSS.

Issue 13 found cliffs there (arrivals past the live-request bound at ~120 a CPU second, aborts at 1.1k a second
with 50k waiting, a step naming 50k unknown ids costing 2.6 CPU-s, 4,000 engine labels making 164k series and
a 2.4-3.1 s scrape). Each scenario drives one `ShadowCore` (no evaluation) on this process's CPU and reports:

  normal          the recorded real-engine stream, replayed many times: the ingest rate with nothing refused
  live bound      arrivals past TrackerLimits.max_live_requests (refused, counted)
  aborts          aborts of requests that never ran, from the back of a 50k-request waiting queue
  unknown ids     one step naming 50k ids the tracker never saw (placeholders up to the bound)
  source flood    20,000 sender names against max_sources (refused once every slot was recently heard)
  engine flood    4,000 engine labels against max_engines (refused likewise)
  engine bound    max_engines engines that each evaluated windows: the /metrics render at its largest

/metrics is rendered from a snapshot taken under the core's lock, as a scrape does; RSS is the process's after
each scenario (psutil). Figures from a shared 2-core machine vary by tens of percent between runs.

    python benchmarks/ingest_bounds.py
    python benchmarks/ingest_bounds.py --live-bound 100000 --json results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import shadow_support as support
from vllm_shadow.adapters.events import EngineStep, RequestArrival, RequestFinish
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.readout.exporter import exposition
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig, ShadowCore
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.tracking.tracker import TrackerLimits

# The recorded engine's announcement (a model the cost prior knows), with room for any number of requests.
INFO = dataclasses.replace(support.info_of(support.events("fcfs-kv12")), num_kv_blocks=10_000_000)
METRICS_LIMIT_SECONDS = 0.1  # the target for /metrics at every bound


@dataclasses.dataclass
class Row:
    scenario: str
    events: int
    cpu_seconds: float
    metrics_seconds: float
    series: int
    rss_mib: float

    @property
    def events_per_cpu_second(self) -> float:
        return self.events / self.cpu_seconds if self.cpu_seconds > 0 else float("inf")


def core_with(live_bound: int) -> ShadowCore:
    config = ShadowConfig(
        hardware="cpu",
        limits=TrackerLimits(max_live_requests=live_bound),
        evaluation=EvaluationSettings(optimal=False),
    )
    return ShadowCore(config, LocalTasks())


def cpu(call: Callable[[], object]) -> float:
    start = time.process_time()
    call()
    return time.process_time() - start


def scrape(core: ShadowCore) -> tuple[float, int]:
    start = time.perf_counter()
    text = exposition(core.snapshot())
    seconds = time.perf_counter() - start
    return seconds, sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def row(name: str, core: ShadowCore, events: int, seconds: float) -> Row:
    metrics_seconds, series = scrape(core)
    rss = psutil.Process().memory_info().rss / 2**20
    return Row(name, events, seconds, metrics_seconds, series, rss)


class Sender:
    """One source's batches, numbered as a publisher numbers them."""

    def __init__(self, core: ShadowCore, name: str) -> None:
        self.core, self.name, self.sequence = core, name, 0

    def send(self, events: list, size: int = 256) -> None:
        for i in range(0, len(events), size):
            self.core.ingest(EventBatch(events[i : i + size], self.name, self.sequence))
            self.sequence += 1


def shifted(events: list, copy: int, offset: float) -> list:
    """The recorded stream's events as its `copy`-th repetition: request ids renamed, times moved on."""
    return list(support.repetition(events, copy, offset, lambda request_id: f"{request_id}~{copy}"))


def normal(repeats: int) -> Row:
    """One engine's recorded stream, repeated back to back under one sender: nothing refused or lost."""
    core = core_with(100_000)
    stream = support.events("fcfs-kv12")
    span = max(e.start_time + e.duration for e in stream if isinstance(e, EngineStep)) + 1.0
    events = [stream[0]] + [e for copy in range(repeats) for e in shifted(stream[1:], copy, copy * span)]
    sender = Sender(core, "engine")
    seconds = cpu(lambda: sender.send(events, size=64))
    snapshot = core.snapshot()
    assert (
        not snapshot.unattributed_drops.get("no_engine_info")
        and snapshot.engines[0].sequence.lost_batches == 0
    )
    return row(f"normal ({repeats} x the recorded stream)", core, len(events), seconds)


def live_bound(bound: int, refused: int) -> Row:
    core = core_with(bound)
    sender = Sender(core, "s")
    sender.send([INFO, *(RequestArrival(f"r{i}", i * 1e-4, 16) for i in range(bound))])
    extra = [RequestArrival(f"x{i}", 10.0, 16) for i in range(refused)]
    seconds = cpu(lambda: sender.send(extra))
    return row(f"live bound ({bound:,} live, {refused:,} refused)", core, refused, seconds)


def aborts(waiting: int, aborted: int) -> Row:
    core = core_with(waiting + 1)
    sender = Sender(core, "s")
    sender.send([INFO, *(RequestArrival(f"r{i}", i * 1e-4, 16) for i in range(waiting))])
    finishes = [RequestFinish(f"r{i}", 10.0, 0, "abort") for i in range(waiting - aborted, waiting)]
    seconds = cpu(lambda: sender.send(finishes))
    return row(f"aborts ({aborted:,} of {waiting:,} waiting)", core, aborted, seconds)


def unknown_ids(unknown: int, bound: int) -> Row:
    core = core_with(bound)
    sender = Sender(core, "s")
    sender.send([INFO, *(RequestArrival(f"r{i}", i * 1e-4, 16) for i in range(1_000))])
    step = EngineStep(0, 1.0, 0.01, {f"ghost{i}": 1 for i in range(unknown)})
    seconds = cpu(lambda: sender.send([step]))
    return row(f"unknown ids ({unknown:,} in one step, bound {bound:,})", core, unknown, seconds)


def source_flood(names: int) -> Row:
    core = core_with(100_000)
    batches = [EventBatch([RequestArrival("r", 0.0, 1)], f"flood-{n}", 0) for n in range(names)]
    seconds = cpu(lambda: [core.ingest(b) for b in batches])
    return row(f"source flood ({names:,} names, bound {core.config.max_sources})", core, names, seconds)


def engine_flood(labels: int) -> Row:
    core = core_with(100_000)
    batches = [
        EventBatch([dataclasses.replace(INFO, engine=str(n)), RequestArrival("r", 0.0, 16)], f"e-{n}", 0)
        for n in range(labels)
    ]
    seconds = cpu(lambda: [core.ingest(b) for b in batches])
    name = f"engine flood ({labels:,} labels, bound {core.config.max_engines})"
    return row(name, core, 2 * labels, seconds)


def engine_bound() -> Row:
    """max_engines engines, each as one that evaluated windows (its snapshot copied under new labels)."""
    core = core_with(100_000)
    stream = support.batches("fcfs-kv12")
    seconds = cpu(lambda: [core.ingest(b) for b in stream])
    from tests.waiting import drain

    drain(core)
    evaluated = core.snapshot()
    (engine,) = evaluated.engines
    engines = tuple(dataclasses.replace(engine, engine=str(n)) for n in range(core.config.max_engines))
    snapshot = dataclasses.replace(evaluated, engines=engines)
    start = time.perf_counter()
    text = exposition(snapshot)
    metrics_seconds = time.perf_counter() - start
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    rss = psutil.Process().memory_info().rss / 2**20
    events = sum(len(b.events) for b in stream)
    return Row(
        f"engine bound ({len(engines)} evaluated engines)", events, seconds, metrics_seconds, series, rss
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--live-bound", type=int, default=TrackerLimits().max_live_requests)
    parser.add_argument("--waiting", type=int, default=50_000)
    parser.add_argument("--unknown", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=50, help="copies of the recorded stream in 'normal'")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    scenarios = [
        lambda: normal(args.repeats),
        lambda: live_bound(args.live_bound, 20_000),
        lambda: aborts(args.waiting, 10_000),
        lambda: unknown_ids(args.unknown, args.live_bound),
        lambda: unknown_ids(args.unknown, args.unknown // 10),
        lambda: source_flood(20_000),
        lambda: engine_flood(4_000),
        engine_bound,
    ]
    print(f"{'scenario':55} {'events/CPU-s':>13} {'/metrics ms':>12} {'series':>8} {'RSS MiB':>8}")
    rows = []
    for scenario in scenarios:
        r = scenario()
        rows.append(r)
        flag = "" if r.metrics_seconds < METRICS_LIMIT_SECONDS else "  (over 100 ms)"
        print(
            f"{r.scenario:55} {r.events_per_cpu_second:13,.0f} {r.metrics_seconds * 1e3:12.1f} "
            f"{r.series:8,} {r.rss_mib:8.0f}{flag}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [dataclasses.asdict(r) | {"events_per_cpu_second": r.events_per_cpu_second} for r in rows]
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
