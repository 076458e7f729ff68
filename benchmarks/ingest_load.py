"""Loopback load on the real ingest path: the sustained events/s with nothing dropped, and the receiver's RSS and
CPU at each of the shadow's bounds.

The sending side is what an engine runs: the mirror hook's `Publisher` (its bounded queue and delivery thread)
with a `GrpcSink`, one per engine. The receiving side is what `shadow serve` runs, in its own process: a
`ShadowService` with its gRPC ingest server on 127.0.0.1 feeding a `ShadowCore` (default bounds, maintenance
thread ticking). Evaluation is left out: `shadow serve` runs it as Ray tasks in other processes, so here windows
are handed to a task runner that never runs them (they are dropped at the evaluation bounds, counted); what the
receiver spends is ingest, sequencing, tracking and maintenance.

The events are the recorded real-engine streams (tests/data/shadow/*.jsonl.gz), replayed back to back with
request ids, step numbers and times moved on for every repetition, and each engine's announcement given its own
engine index, so that every engine sees a fresh, consistent stream.

Each scenario fills the receiver to one bound first, then offers events at stepped rates (each step bounded in
time and in count, the next `--factor` times faster) until a step fails; it stops by itself after `--max-steps`.
A step fails when the sender cannot keep the pace, when any event is dropped anywhere (the publisher's queue, a
failed or skipped gRPC call, a refusal, a late, stray or lost batch, an unattributed or rejected event), or when
the receiver falls behind (all events offered are not received within `--drain-seconds` of the step's end).

  baseline       one engine, nothing held
  live bound     one engine holding TrackerLimits.max_live_requests less a margin (waiting requests that never
                 run), the replayed stream on top
  engine bound   ShadowConfig.max_engines engines, one publisher each, the rate split between them
  source bound   the engine bound plus idle senders (announcements only) up to ShadowConfig.max_sources

Then the receive path in-process, without gRPC: the same stream's encoded batches decoded, sequenced and tracked
on this process's CPU (events per CPU second), with the online calibration of the cost model on and off.

Loopback only; the receiver is a child process of this one. Figures from a shared 2-core machine (sender and
receiver compete for the same two cores) vary by tens of percent between runs.

    python benchmarks/ingest_load.py                       # every scenario, about 5 minutes
    python benchmarks/ingest_load.py --scenarios baseline --max-steps 3 --step-seconds 2
    python benchmarks/ingest_load.py --json results.json
    python benchmarks/ingest_load.py --only-path            # the receive path in-process alone, under a minute
    python benchmarks/ingest_load.py --path-against HEAD~1  # the whole path, this tree's tracker and core
                                                            # alternating with those of a git revision
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.revision_modules import load_revision_modules
from tests import shadow_support as support
from vllm_shadow.adapters import wire
from vllm_shadow.adapters.events import EngineInfo, EngineStep, Event, RequestArrival
from vllm_shadow.adapters.grpc_ingest import DEFAULT_MAX_CONCURRENT_RPCS, GrpcSink, IngestServer, IngestStats
from vllm_shadow.adapters.publisher import EventBatch, Publisher
from vllm_shadow.adapters.recorder import read_events
from vllm_shadow.adapters.wire import decode_batch, decode_batch_upb, encode_batch
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig, ShadowCore
from vllm_shadow.tracking.tracker import TrackerLimits

STREAMS = Path(__file__).resolve().parent.parent / "tests" / "data" / "shadow"
RECORDINGS = ("fcfs-kv12", "priority-kv16", "fcfs-kv6-crowded")
DEFAULTS = ShadowConfig()
SCENARIOS = ("baseline", "live bound", "engine bound", "source bound")
# The live-bound scenario holds this many fewer than the bound, so the replayed stream's own requests (at most a
# few dozen at once: its windows are cut and released as it goes) fit beside them, none rejected.
LIVE_MARGIN = 1_000
SENDER_PACE = 0.97  # a step whose sender published less than this share of the offered rate failed there


# ---- the receiving side (a child process) -----------------------------------------------------------------


class NoEvaluation:
    """A task runner that never runs a task: evaluation is not what this benchmark measures."""

    def share(self, value: Any) -> Any:
        return value

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future:
        return Future()

    def cancel(self, future: Future) -> None:
        future.cancel()

    def shutdown(self) -> None:
        pass


def shadow_config(max_live_requests: int, max_engines: int, max_sources: int) -> ShadowConfig:
    return ShadowConfig(
        hardware="cpu",
        limits=TrackerLimits(max_live_requests=max_live_requests),
        evaluation=EvaluationSettings(optimal=False),
        max_engines=max_engines,
        max_sources=max_sources,
    )


def receiver_stats(service: Any, server: IngestServer) -> dict[str, float]:
    """What the receiver took and lost so far, and what it costs: its CPU seconds and RSS."""
    import psutil

    snapshot = service.snapshot()
    engines = snapshot.engines
    me = psutil.Process()
    cpu = me.cpu_times()
    return {
        "events": snapshot.events.get("grpc", 0),
        "refused": sum(
            getattr(server.stats, f.name)
            for f in dataclasses.fields(IngestStats)
            if f.name.startswith("refused_")
        )
        + server.stats.sink_failures,
        "unattributed": sum(snapshot.unattributed_drops.values()),
        "lost_batches": sum(e.sequence.lost_batches for e in engines),
        "late_events": sum(e.sequence.late_events for e in engines),
        "stray_events": sum(e.sequence.stray_events for e in engines),
        "rejected": sum(e.tracker.requests_rejected for e in engines),
        "live_requests": sum(e.live_requests for e in engines),
        "engines": len(engines),
        "sources": snapshot.sources,
        "cpu_seconds": cpu.user + cpu.system,
        "rss_mib": me.memory_info().rss / 2**20,
    }


def serve_receiver(args: argparse.Namespace) -> None:
    """The receiver: say where it listens, then answer `stats` lines on stdin until `quit` (or EOF).

    Wired as `ShadowService` wires its gRPC ingest (the server's sink is the core's `ingest` under transport
    "grpc"), with the server built here so that its bound on concurrent calls can be varied."""
    from vllm_shadow.runtime.service import ServiceConfig, ShadowService

    config = ServiceConfig(
        shadow=shadow_config(args.max_live_requests, args.max_engines, args.max_sources),
        grpc_address=None,
        metrics_port=None,
    )
    service = ShadowService(config, NoEvaluation())
    server = IngestServer(
        lambda batch: service.core.ingest(batch, "grpc"),
        address="127.0.0.1:0",
        max_message_bytes=config.max_message_bytes,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
    ).start()
    print(json.dumps({"address": server.address}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        print(json.dumps(receiver_stats(service, server)), flush=True)
    server.stop(grace=0.5)
    service.close()


class Receiver:
    """The receiving process, seen from the driver."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._process = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--receiver",
                f"--max-live-requests={args.max_live_requests}",
                f"--max-engines={args.max_engines}",
                f"--max-sources={args.max_sources}",
                f"--max-concurrent-rpcs={args.max_concurrent_rpcs}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None and self._process.stdin is not None
        self._stdin, self._stdout = self._process.stdin, self._process.stdout
        self.address = json.loads(self._stdout.readline())["address"]

    def stats(self) -> dict[str, float]:
        self._stdin.write("stats\n")
        self._stdin.flush()
        return json.loads(self._stdout.readline())

    def wait_for(self, events: Callable[[], int], timeout: float) -> tuple[dict[str, float], float | None]:
        """The receiver's stats once it has taken `events()` (what was sent less what the senders know they
        lost, which changes while they deliver) and the seconds that took; None for the seconds past `timeout`."""
        start = time.monotonic()
        while True:
            stats = self.stats()
            waited = time.monotonic() - start
            if stats["events"] >= events():
                return stats, waited if waited <= timeout else None
            if waited > timeout:
                return stats, None
            time.sleep(0.02)  # polling the child's counters: each poll costs it a snapshot

    def close(self) -> None:
        try:
            self._stdin.write("quit\n")
            self._stdin.flush()
            self._process.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait(10)


# ---- the sending side ---------------------------------------------------------------------------------------


def recording(name: str) -> tuple[EngineInfo, list[Event], float]:
    """A recorded stream: its announcement, the rest, and its span on the engine clock (a repetition's offset)."""
    events = list(read_events(STREAMS / f"{name}.jsonl.gz"))
    info, rest = events[0], events[1:]
    assert isinstance(info, EngineInfo)
    span = max(e.start_time + e.duration for e in rest if isinstance(e, EngineStep)) + 1.0
    return info, rest, span


class EngineStream:
    """One engine's endless stream: a recording replayed back to back, relabelled for this engine and repetition."""

    def __init__(self, index: int) -> None:
        info, self._template, self._span = recording(RECORDINGS[index % len(RECORDINGS)])
        self.info = dataclasses.replace(info, engine=str(index))
        self._prefix = f"e{index}"
        self._copy = 0
        self._pending: list[Event] = []

    def take(self, n: int) -> list[Event]:
        while len(self._pending) < n:
            self._pending.extend(self._repetition())
        out, self._pending = self._pending[:n], self._pending[n:]
        return out

    def _repetition(self) -> Iterator[Event]:
        copy, self._copy = self._copy, self._copy + 1
        offset = copy * self._span
        tag = f"{self._prefix}-{copy}-"

        yield from support.repetition(self._template, copy, offset, lambda request_id: tag + request_id)


class RecordingSink(GrpcSink):
    """A `GrpcSink` that notes the status of each failed call, so that a failed step says why."""

    def __init__(self, address: str, failures: Counter[str]) -> None:
        super().__init__(address)
        self._failures = failures

    def __call__(self, batch: EventBatch) -> None:
        try:
            super().__call__(batch)
        except grpc.RpcError as exc:
            self._failures[exc.code().name] += 1
            raise


@dataclasses.dataclass
class Step:
    """One offered rate, and what came of it."""

    scenario: str
    offered: float  # events/s asked for
    achieved: float  # events/s the sender published
    events: int
    sender_dropped: int  # the publisher's queue was full
    sender_lost: int  # events in failed or skipped gRPC calls
    sender_failures: dict[str, int]  # failed gRPC calls by status
    receiver_lost: int  # refused, unattributed, late, stray, rejected events, and lost batches
    drain_seconds: float | None  # after the step's end, until the receiver had every event; None: not in time
    receiver_cpu_us_per_event: float
    rss_mib: float
    live_requests: int
    engines: int
    sources: int
    ok: bool
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS  # the ingest server's bound on calls at once
    idle_cpu: float = 0.0  # the receiver's CPU seconds a second, filled up but sent nothing (this scenario's)
    filled_rss_mib: float = 0.0  # the receiver's RSS once filled up, before the first step


def offer(
    publishers: list[Publisher], streams: list[EngineStream], rate: float, count: int
) -> tuple[int, float]:
    """Publish `count` events round-robin over the engines at `rate` events/s, from one thread (as each engine
    loop publishes from its own); returns the events published and the seconds it took. Events are built before
    the clock starts, so building them costs the sender nothing during the step."""
    per_engine = -(-count // len(streams))
    chunk = 16  # consecutive events of one engine, as its loop emits them
    items: list[tuple[Publisher, Event]] = []
    batches = [s.take(per_engine) for s in streams]
    for start in range(0, per_engine, chunk):
        for publisher, events in zip(publishers, batches, strict=True):
            items.extend((publisher, e) for e in events[start : start + chunk])
    published = 0
    begin = time.monotonic()
    while published < len(items):
        due = min(len(items), int((time.monotonic() - begin) * rate) + 1)
        for publisher, event in items[published:due]:
            publisher.publish(event)
        published = max(published, due)
        time.sleep(0.002)
    return published, time.monotonic() - begin


def losses(stats: dict[str, float]) -> int:
    keys = ("refused", "unattributed", "lost_batches", "late_events", "stray_events", "rejected")
    return int(sum(stats[k] for k in keys))


def run_scenario(name: str, args: argparse.Namespace) -> list[Step]:
    engines = args.max_engines if name in ("engine bound", "source bound") else 1
    receiver = Receiver(args)
    publishers: list[Publisher] = []
    try:
        streams = [EngineStream(i) for i in range(engines)]
        if name == "source bound":
            for i in range(args.max_sources - engines):  # idle senders: announced, then silent
                sink = GrpcSink(receiver.address)
                idle_info = dataclasses.replace(streams[0].info, engine=f"idle-{i}")
                sink(EventBatch([idle_info], f"idle-{i}", 0, incarnation=1))
                sink.close()
        failures: Counter[str] = Counter()
        publishers = [
            Publisher([RecordingSink(receiver.address, failures)], source=f"bench-engine-{i}")
            for i in range(engines)
        ]
        expected = receiver.stats()["events"]
        for publisher, stream in zip(publishers, streams, strict=True):
            publisher.publish(stream.info)
            expected += 1
        if name == "live bound":
            held = args.max_live_requests - args.live_margin
            for i in range(held):  # arrivals before the stream's first, that never run
                publishers[0].publish(RequestArrival(f"held-{i}", -1.0, 16, max_tokens=16))
            expected += held
        baseline, _ = receiver.wait_for(lambda: expected, timeout=120)
        if baseline["events"] < expected or losses(baseline):
            raise RuntimeError(f"{name}: the receiver did not take the fill-up cleanly: {baseline}")
        time.sleep(args.idle_seconds)  # what the receiver spends when nothing comes: ticks, gRPC's threads
        idle = receiver.stats()
        idle_cpu = (idle["cpu_seconds"] - baseline["cpu_seconds"]) / args.idle_seconds
        steps = []
        rate = args.start_rate
        for _ in range(args.max_steps):
            count = min(args.max_step_events, int(rate * args.step_seconds))
            before = receiver.stats()
            dropped = sum(p.dropped for p in publishers)
            lost = sum(s.lost_events for p in publishers for s in p.sink_stats())
            failures.clear()
            published, seconds = offer(publishers, streams, rate, count)

            def delivered(
                start: int = int(before["events"]),
                published: int = published,
                dropped: int = dropped,
                lost: int = lost,
            ) -> int:
                dropped_now = sum(p.dropped for p in publishers) - dropped
                lost_now = sum(s.lost_events for p in publishers for s in p.sink_stats()) - lost
                return start + published - dropped_now - lost_now

            after, drain = receiver.wait_for(delivered, args.drain_seconds)
            received = after["events"] - before["events"]
            step = Step(
                scenario=name,
                offered=rate,
                achieved=published / seconds,
                events=published,
                sender_dropped=sum(p.dropped for p in publishers) - dropped,
                sender_lost=sum(s.lost_events for p in publishers for s in p.sink_stats()) - lost,
                sender_failures=dict(failures),
                receiver_lost=losses(after) - losses(before),
                drain_seconds=drain,
                receiver_cpu_us_per_event=1e6
                * (after["cpu_seconds"] - before["cpu_seconds"])
                / max(1, received),
                rss_mib=after["rss_mib"],
                live_requests=int(after["live_requests"]),
                engines=int(after["engines"]),
                sources=int(after["sources"]),
                ok=False,
                max_concurrent_rpcs=args.max_concurrent_rpcs,
                idle_cpu=idle_cpu,
                filled_rss_mib=idle["rss_mib"],
            )
            step.ok = not failure_reasons(step)
            steps.append(step)
            print(format_step(step), flush=True)
            if not step.ok:
                break
            rate *= args.factor
        return steps
    finally:
        for publisher in publishers:
            publisher.close(timeout=2.0)
        receiver.close()


# ---- the receive path in-process ----------------------------------------------------------------------------


@dataclasses.dataclass
class PathCost:
    what: str
    events: int
    cpu_seconds: float

    @property
    def events_per_cpu_second(self) -> float:
        return self.events / self.cpu_seconds


BOUNDS = (DEFAULTS.limits.max_live_requests, DEFAULTS.max_engines, DEFAULTS.max_sources)


def encoded_streams(engines: int, repetitions: int, batch_size: int = 1024) -> list[bytes]:
    """The engines' streams as a publisher sends them: encoded batches, each engine's announcement first."""
    streams = [EngineStream(i) for i in range(engines)]
    messages: list[bytes] = []
    for i, stream in enumerate(streams):
        events = [stream.info, *stream.take(repetitions * len(stream._template))]
        for sequence, start in enumerate(range(0, len(events), batch_size)):
            batch = EventBatch(events[start : start + batch_size], f"engine-{i}", sequence, incarnation=1)
            messages.append(encode_batch(batch))
    return messages


def receive_path(engines: int, repetitions: int, batch_size: int = 1024) -> list[PathCost]:
    """Decode (as the gRPC ingest does, and through upb alone), then decode + sequencing + tracking
    (`ShadowCore.ingest`, as the gRPC sink calls it), on this process's CPU, for the engines' encoded batches as
    a publisher sends them."""
    messages = encoded_streams(engines, repetitions, batch_size)
    total = sum(len(decode_batch(m).events) for m in messages)
    out = []
    start = time.process_time()
    for m in messages:
        decode_batch(m)
    out.append(PathCost("decode (wire -> events)", total, time.process_time() - start))
    start = time.process_time()
    for m in messages:
        decode_batch_upb(m)
    out.append(PathCost("  the same through upb (the oracle)", total, time.process_time() - start))
    for what, per_second, decoded in (
        ("decode + sequencing + trackers", TrackerLimits().calibration_steps_per_second, False),
        ("  the same, online calibration off", 1e-9, False),
        ("    the same, decoded beforehand", 1e-9, True),
    ):
        config = dataclasses.replace(
            shadow_config(DEFAULTS.limits.max_live_requests, DEFAULTS.max_engines, DEFAULTS.max_sources),
            limits=TrackerLimits(calibration_steps_per_second=per_second),
        )
        core = ShadowCore(config, NoEvaluation())
        batches = [decode_batch(m) for m in messages] if decoded else None  # decoded before the clock starts
        start = time.process_time()
        if batches is not None:
            for batch in batches:
                core.ingest(batch, "grpc")
        else:
            for m in messages:
                core.ingest(decode_batch(m), "grpc")
        seconds = time.process_time() - start
        snapshot = core.snapshot()
        assert sum(snapshot.unattributed_drops.values()) == 0 and snapshot.events["grpc"] == total
        assert all(
            e.sequence.lost_batches == 0 and e.tracker.requests_rejected == 0 for e in snapshot.engines
        )
        out.append(PathCost(what, total, seconds))
    return out


def revision_core(revision: str) -> Any:
    """`ShadowCore` with the tracker (shadow/tracking/engine_state.py) and the core (shadow/runtime/core.py) of a
    git revision, loaded beside this tree's under private module names; everything else is this tree's."""
    modules = load_revision_modules(
        revision,
        (
            ("engine_state", "shadow/tracking/engine_state.py", ()),
            (
                "core",
                "shadow/runtime/core.py",
                (("vllm_shadow.tracking.engine_state", "_revision_engine_state"),),
            ),
        ),
    )
    return modules["core"].ShadowCore


def revision_decoder(revision: str) -> Callable[[bytes], EventBatch]:
    """`decode_batch` with the compiled wire reader (adapters/_wire_compiled.pyx) of a git revision, built
    beside this tree's (once per source, under the system's temporary directory) and loaded under a private
    package name; this tree's `decode_batch` where the revision's reader is this tree's, or it has none."""
    root = Path(__file__).resolve().parent.parent
    shown = subprocess.run(
        ["git", "show", f"{revision}:adapters/_wire_compiled.pyx"], cwd=root, capture_output=True, text=True
    )
    ours = root / "adapters" / "_wire_compiled.pyx"
    if shown.returncode != 0 or not wire.COMPILED or shown.stdout == ours.read_text():
        return decode_batch
    import hashlib
    import importlib.util
    import tempfile

    from Cython.Build import cythonize
    from setuptools import Extension
    from setuptools.dist import Distribution

    digest = hashlib.sha256(shown.stdout.encode()).hexdigest()[:16]
    build = Path(tempfile.gettempdir()) / f"vllm_shadow_wire_{digest}"
    package = f"_revision_wire_{digest}"
    built = list((build / "lib" / package).glob("_wire_compiled.*"))
    if not built:
        (build / package).mkdir(parents=True, exist_ok=True)
        source = build / package / "_wire_compiled.pyx"
        source.write_text(shown.stdout)
        extension = Extension(f"{package}._wire_compiled", [str(source)])
        directives = {"language_level": 3, "annotation_typing": False, "overflowcheck": False}
        extensions = cythonize(
            [extension], build_dir=str(build / "c"), compiler_directives=directives, quiet=True
        )
        command = Distribution({"ext_modules": extensions}).get_command_obj("build_ext")
        command.build_lib, command.build_temp = str(build / "lib"), str(build / "tmp")
        command.ensure_finalized()
        command.run()
        built = list((build / "lib" / package).glob("_wire_compiled.*"))
    spec = importlib.util.spec_from_file_location(f"{package}._wire_compiled", built[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def decode(data: bytes) -> EventBatch:
        fast = module.decode(data)
        return decode_batch_upb(data) if fast is None else wire._checked_batch(*fast)

    return decode


def path_against(
    revision: str, rounds: int, repetitions: int, engines: int
) -> list[tuple[int, float, float]]:
    """decode + sequencing + trackers (as in `receive_path`), the revision's wire reader, tracker and core and
    this tree's alternating in one process on the same batches: (engines, theirs, ours) in events per CPU
    second, per round."""
    theirs = (revision_decoder(revision), revision_core(revision))
    loads = {1: encoded_streams(1, repetitions), engines: encoded_streams(engines, repetitions // 4)}
    out = []
    for _ in range(rounds):
        for count, messages in loads.items():
            figures = []
            for decode, core_cls in (theirs, (decode_batch, ShadowCore)):
                core = core_cls(shadow_config(*BOUNDS), NoEvaluation())
                start = time.process_time()
                events = sum(core.ingest(decode(m), "grpc") for m in messages)
                figures.append(events / (time.process_time() - start))
            out.append((count, *figures))
    return out


# ---- output -------------------------------------------------------------------------------------------------


def format_step(s: Step) -> str:
    drain = f"{s.drain_seconds:5.2f}" if s.drain_seconds is not None else " late"
    verdict = "ok" if s.ok else "FAIL"
    return (
        f"{s.scenario:<13} {s.offered:>9,.0f} {s.achieved:>9,.0f} {s.events:>9,} "
        f"{s.sender_dropped + s.sender_lost:>6,} {s.receiver_lost:>6,} {drain:>6} "
        f"{s.receiver_cpu_us_per_event:>7.1f} {s.rss_mib:>7.0f} {s.live_requests:>7,} "
        f"{s.engines:>4} {s.sources:>5}  {verdict}"
    )


HEADER = (
    f"{'scenario':<13} {'offered/s':>9} {'sent/s':>9} {'events':>9} {'s.lost':>6} {'r.lost':>6} {'drain':>6} "
    f"{'us/ev':>7} {'RSS MiB':>7} {'live':>7} {'eng':>4} {'srcs':>5}"
)


def summary(steps: list[Step]) -> str:
    lines = [
        f"{'scenario':<13} {'sustained events/s':>18} {'receiver us/event':>17} {'idle CPU':>8} "
        f"{'RSS MiB filled/loaded':>21} {'live':>7} {'eng':>4} {'srcs':>5}  first failure"
    ]
    for name in dict.fromkeys(s.scenario for s in steps):
        mine = [s for s in steps if s.scenario == name]
        passed = [s for s in mine if s.ok]
        failed = next((s for s in mine if not s.ok), None)
        why = "none (--max-steps reached)" if failed is None else failure(failed)
        best = passed[-1] if passed else None
        if best is None:
            lines.append(f"{name:<13} {'below ' + format(mine[0].offered, ',.0f'):>18}  {why}")
            continue
        lines.append(
            f"{name:<13} {best.achieved:>18,.0f} {best.receiver_cpu_us_per_event:>17.1f} {best.idle_cpu:>8.0%} "
            f"{best.filled_rss_mib:>13.0f} / {best.rss_mib:>5.0f} {best.live_requests:>7,} {best.engines:>4} "
            f"{best.sources:>5}  {why}"
        )
    return "\n".join(lines)


def failure_reasons(s: Step) -> list[str]:
    """Why a step failed; none if it passed: the sender kept the pace, nothing was lost, the receiver kept up."""
    reasons = []
    if s.achieved < SENDER_PACE * s.offered:
        reasons.append(f"sender kept {s.achieved:,.0f}/s")
    if s.sender_dropped:
        reasons.append(f"publisher queue full: {s.sender_dropped:,} dropped")
    if s.sender_lost:
        codes = ", ".join(f"{n} {code}" for code, n in sorted(s.sender_failures.items()))
        reasons.append(f"{s.sender_lost:,} events in failed calls ({codes})")
    if s.receiver_lost:
        reasons.append(f"receiver lost {s.receiver_lost:,}")
    if s.drain_seconds is None:
        reasons.append("receiver fell behind")
    return reasons


def failure(s: Step) -> str:
    return f"at {s.offered:,.0f}/s: " + ", ".join(failure_reasons(s))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--start-rate", type=float, default=2_000.0, help="events/s of the first step")
    p.add_argument("--factor", type=float, default=1.25, help="each step offers this many times more")
    p.add_argument("--max-steps", type=int, default=16)
    p.add_argument("--step-seconds", type=float, default=4.0)
    p.add_argument("--max-step-events", type=int, default=400_000, help="a step's bound in count")
    p.add_argument("--drain-seconds", type=float, default=0.5, help="the receiver's slack after a step")
    p.add_argument(
        "--idle-seconds", type=float, default=2.0, help="the receiver's idle CPU, measured so long"
    )
    p.add_argument("--live-margin", type=int, default=LIVE_MARGIN, help="live bound: held this many below it")
    p.add_argument("--no-path", action="store_true", help="skip the in-process measure of the receive path")
    p.add_argument("--only-path", action="store_true", help="only the in-process measure of the receive path")
    p.add_argument("--path-repetitions", type=int, default=40, help="recorded-stream repetitions per engine")
    p.add_argument(
        "--path-against",
        metavar="REV",
        help="only the whole receive path, this tree's wire reader, tracker and core alternating with those "
        "of git REV (its wire reader built on first use, about a minute)",
    )
    p.add_argument("--path-rounds", type=int, default=5, help="--path-against: alternating rounds")
    p.add_argument("--max-live-requests", type=int, default=DEFAULTS.limits.max_live_requests)
    p.add_argument("--max-engines", type=int, default=DEFAULTS.max_engines)
    p.add_argument("--max-sources", type=int, default=DEFAULTS.max_sources)
    p.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=DEFAULT_MAX_CONCURRENT_RPCS,
        help="the ingest server's bound on calls at once (the service's default)",
    )
    p.add_argument("--json", type=Path, help="also write the steps and the receive-path costs here")
    p.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.receiver:
        serve_receiver(args)
        return
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; ingest server: at most "
        f"{args.max_concurrent_rpcs} calls at once; wire decoding through "
        f"{'the compiled reader' if wire.COMPILED else 'upb (the compiled reader is not built)'}",
        flush=True,
    )
    if args.path_against:
        print(f"decode + sequencing + trackers, events per CPU second: {args.path_against} | this tree")
        for engines, theirs, ours in path_against(
            args.path_against, args.path_rounds, args.path_repetitions, args.max_engines
        ):
            print(
                f"  {engines:2d} engine(s) {theirs:>9,.0f} | {ours:>9,.0f}  x{ours / theirs:.2f}", flush=True
            )
        return
    steps: list[Step] = []
    if not args.only_path:
        print(HEADER, flush=True)
        steps = [step for name in args.scenarios for step in run_scenario(name, args)]
        print("\n" + summary(steps), flush=True)
    costs: list[PathCost] = []
    if not args.no_path:
        costs = receive_path(1, args.path_repetitions) + receive_path(
            args.max_engines, args.path_repetitions // 4
        )
        print(f"\n{'receive path in-process':<42} {'events':>8} {'CPU s':>7} {'events/CPU-s':>13}")
        per_group = len(costs) // 2
        for engines, group in ((1, costs[:per_group]), (args.max_engines, costs[per_group:])):
            print(f"{engines} engine(s)")
            for c in group:
                print(
                    f"  {c.what:<40} {c.events:>8,} {c.cpu_seconds:>7.2f} {c.events_per_cpu_second:>13,.0f}"
                )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "steps": [dataclasses.asdict(s) for s in steps],
                    "receive_path": [
                        dataclasses.asdict(c) | {"per_cpu_second": c.events_per_cpu_second} for c in costs
                    ],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
