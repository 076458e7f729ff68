"""The three attach points on one real vLLM engine, and an engine that outlives its shadow.

One engine (CPU build, tiny Llama, KV sized for preemption) runs with the mirror scheduler (publishing to a
gRPC ingest and a recording), the stat-logger plugin and an OTLP endpoint pointed at our span receiver.
"""

from __future__ import annotations

import itertools
import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the CPU build of vLLM is installed by `make test`")

from tests.waiting import wait_until
from vllm_shadow.adapters.events import EngineInfo, EngineStep, Event, RequestArrival, RequestFinish
from vllm_shadow.adapters.grpc_ingest import IngestServer
from vllm_shadow.adapters.otlp import OtlpSpanReceiver
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.recorder import RecordingError, RecordingTruncatedWarning, read_events
from vllm_shadow.adapters.traces import bundled_trace, read_trace
from vllm_shadow.adapters.vllm.engine_run import EngineSetup, drive, start_engine, stop_engine, trace_workload
from vllm_shadow.evaluation.recorded_run import MirroredRun

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SETUP = EngineSetup(num_kv_blocks=12)


class Collect:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[EventBatch] = []

    def __call__(self, batch: EventBatch) -> None:
        with self.lock:
            self.batches.append(batch)

    @property
    def events(self) -> list[Event]:
        return [e for b in self.batches for e in b.events]

    def mirror_events(self) -> list[Event]:
        """Events from the engine process (the one source that sends steps), not the stat logger's."""
        with self.lock:
            batches = list(self.batches)
        sources = {b.source for b in batches if any(isinstance(e, EngineStep) for e in b.events)}
        assert len(sources) <= 1, f"steps from several sources: {sources}"
        return [e for b in batches if b.source in sources for e in b.events]


class Session:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ingested = Collect()
        self.spans = Collect()
        self.ingest = IngestServer(self.ingested).start()
        self.otlp = OtlpSpanReceiver(self.spans).start()

    def recording(self, pid: int) -> list[Event]:
        return list(read_events(self.tmp / f"{pid}.jsonl"))

    def engine_recording(self) -> list[Event]:
        (path,) = [p for p in self.tmp.glob("*.jsonl") if p.stem != str(os.getpid())]

        def whole() -> list[Event] | None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", RecordingTruncatedWarning)
                    return list(read_events(path))
            except (RecordingError, RecordingTruncatedWarning):  # read while a line was half written
                return None

        return wait_until(whole, 1.0, f"a whole line at the end of {path}")


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Session, object]]:
    from vllm_shadow.adapters.vllm.stat_logger import ShadowStatLogger

    s = Session(tmp_path_factory.mktemp("shadow"))
    saved = dict(os.environ)
    os.environ["SHADOW_ADDRESS"] = s.ingest.address
    os.environ["SHADOW_RECORD"] = str(s.tmp / "{pid}.jsonl")
    try:
        engine = start_engine(SETUP, stat_loggers=[ShadowStatLogger], otlp_traces_endpoint=s.otlp.address)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield s, engine
    stop_engine(engine)
    from opentelemetry import trace

    trace.get_tracer_provider().shutdown()  # vLLM installed it in this process; stop it exporting to a dead port
    s.otlp.stop()
    s.ingest.stop()


def _workload(first: int, count: int) -> list[RequestArrival]:
    trace = read_trace(bundled_trace("azure-conv"), limit=first + count)
    return trace_workload(trace.requests[first:], seconds=0.5)


def _external(request_id: str) -> str:
    return request_id.rsplit("-", 1)[0]  # vLLM's internal id is <external>-<8 hex>


def test_mirror_reports_every_arrival_step_and_finish_exactly(session) -> None:
    s, engine = session
    produced = drive(engine, _workload(0, 24), id_prefix="a")
    wait_until(
        lambda: sum(isinstance(e, RequestFinish) for e in s.ingested.mirror_events()) >= 24,
        10,
        "the shadow to receive 24 finishes",
    )
    events = [
        e
        for e in s.ingested.mirror_events()
        if not isinstance(e, RequestArrival | RequestFinish) or e.request_id.startswith("a")
    ]

    infos = [e for e in events if isinstance(e, EngineInfo)]
    assert len(infos) == 1 and infos[0].num_kv_blocks == 12 and infos[0].block_size == 128
    assert (
        infos[0].scheduler.max_num_seqs == SETUP.max_num_seqs
        and infos[0].model_config["num_hidden_layers"] == 4
    )

    run = MirroredRun.from_events(events)
    assert {_external(r.request_id): r.output_tokens for r in run.finished_requests} == produced
    steps = [e for e in events if isinstance(e, EngineStep)]
    assert [e.step for e in steps] == list(range(len(steps)))
    assert all(b.start_time + b.duration <= a.start_time + 1e-6 for b, a in itertools.pairwise(steps))
    assert all(0 <= e.kv_blocks_used <= 11 and e.duration > 0 for e in steps)

    # Token accounting: what the steps computed for each request is its prompt plus all but its last output
    # token, plus what preemption threw away and recomputation redid.
    prompt = {r.request_id: r.prompt_tokens for r in run.requests}
    computed: Counter[str] = Counter()
    preempted = Counter()
    for step in run.steps:
        for r in step.preempted:
            computed[r] = 0
            preempted[r] += 1
        assert not set(step.resumed) - set(step.scheduled_tokens)
        computed.update(step.scheduled_tokens)
        for r in step.finished:
            assert computed[r] == prompt[r] + run.finishes[r].output_tokens - 1
    assert sum(preempted.values()) > 0, "the KV cache was meant to be under pressure"
    resumed = Counter(r for step in run.steps for r in step.resumed)
    assert resumed == preempted  # every preempted request came back exactly once per preemption


def test_stat_logger_and_otlp_see_the_mirror_s_requests(session) -> None:
    from opentelemetry import trace

    s, engine = session
    produced = drive(engine, _workload(24, 12), id_prefix="b")
    trace.get_tracer_provider().force_flush()
    wait_until(
        lambda: sum(isinstance(e, RequestFinish) for e in s.spans.events) >= 12, 10, "12 finishes over OTLP"
    )

    def arrivals_of(events: list[Event], request_id=lambda rid: rid) -> dict[str, RequestArrival]:
        return {
            request_id(e.request_id): e
            for e in events
            if isinstance(e, RequestArrival) and e.request_id.startswith("b")
        }

    def every_request(read: Callable[[], list[Event]], **kwargs) -> Callable[[], dict | None]:
        # The hook and the stat logger write their recordings from their own delivery threads: a run's last
        # finishes may reach the file a moment after the client has them.
        def complete() -> dict | None:
            arrivals = arrivals_of(read(), **kwargs)
            return arrivals if arrivals.keys() >= produced.keys() else None

        return complete

    mirror = wait_until(
        every_request(s.engine_recording, request_id=_external), 10, "every request in the hook's recording"
    )
    stat_logger = wait_until(
        every_request(lambda: s.recording(os.getpid())), 10, "every request in the stat logger's recording"
    )
    for name, arrivals in (("stat logger", stat_logger), ("OTLP", arrivals_of(s.spans.events))):
        assert arrivals.keys() == mirror.keys() == produced.keys(), name
        for rid, a in arrivals.items():
            assert a.prompt_tokens == mirror[rid].prompt_tokens and a.output_tokens == produced[rid], name
            assert abs(a.time - mirror[rid].time) < 1e-3, name  # all three read vLLM's arrival_time


def test_engine_finishes_every_request_when_the_shadow_dies_mid_run(session) -> None:
    s, engine = session
    requests = _workload(36, 24)
    killed = threading.Event()

    def kill_the_shadow_once_the_run_is_under_way() -> None:
        def under_way() -> bool:
            return any(
                isinstance(e, RequestArrival) and e.request_id.startswith("c") for e in s.ingested.events
            )

        wait_until(under_way, 60, "the first arrival of this run at the shadow")
        s.ingest.stop(grace=0)
        killed.set()

    killer = threading.Thread(target=kill_the_shadow_once_the_run_is_under_way, daemon=True)
    killer.start()
    produced = drive(engine, requests, id_prefix="c")
    assert produced == {"c" + r.request_id: r.output_tokens for r in requests}
    killer.join(60)
    assert killed.is_set(), "the shadow was never killed: the test would prove nothing"

    # The recording, a second destination of the same publisher, still has the whole run ...
    def recorded() -> list[RequestFinish]:
        events = s.engine_recording()
        return [e for e in events if isinstance(e, RequestFinish) and e.request_id.startswith("c")]

    # The publisher writes every few milliseconds.
    wait_until(lambda: len(recorded()) >= len(requests), 10, "every finish in the engine's recording")
    assert {_external(e.request_id): e.output_tokens for e in recorded()} == produced
    # ... while the dead shadow got only what was sent before it died.
    ingested = [
        e for e in s.ingested.mirror_events() if isinstance(e, RequestFinish) and e.request_id.startswith("c")
    ]
    assert len(ingested) < len(recorded())
