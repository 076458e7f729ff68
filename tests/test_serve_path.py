"""The production serve path, for real: two OpenAI-compatible vLLM servers (CPU build, tiny Llama with its
bundled tokenizer, started with the command CPU users run) feed one shadow over gRPC, driven by vLLM's own
load client, `vllm bench serve`; the shadow's figures are checked against the client's own report.

- "hooked" runs the mirror hook (`--scheduler-cls vllm_shadow.MirrorScheduler`); vLLM also loads the
  stat-logger plugin there, in the API-server process: the shadow keeps the hook's stream, and the two
  processes record to two files (SHADOW_RECORD names one) whose request ids join.
- "plugin" runs vLLM's stock scheduler: only the stat-logger plugin reports.
The shadow tracks them as two engines, each with its own counts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the CPU build of vLLM is installed by `make test`")


from tests.shadow_support import metric, scrape
from tests.waiting import wait_until
from vllm_shadow.adapters.events import EngineStep, Event, RequestArrival, RequestFinish
from vllm_shadow.adapters.recorder import RecordingError, RecordingTruncatedWarning, read_events
from vllm_shadow.adapters.traces import bundled_trace, read_trace
from vllm_shadow.adapters.vllm.engine_run import (
    TINY_LLAMA,
    EngineSetup,
    serve_command,
    trace_workload,
    write_bench_dataset,
)
from vllm_shadow.adapters.vllm.env import api_request_id
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig
from vllm_shadow.runtime.service import ServiceConfig, ShadowService
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.tracking.windows import WindowRules

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SETUP = EngineSetup(num_kv_blocks=24, max_num_seqs=8, max_num_batched_tokens=512)
STARTUP_SECONDS = 240  # two servers starting at once on 2 cores take about 60-120 s
RANDOM_PROMPTS = 16
TRACE_PROMPTS = 12


@dataclass
class Server:
    engine: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    recording: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"the {self.engine} server exited ({self.process.returncode}):\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: vLLM shuts its engine core down and the hooks flush
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # The server's own session (start_new_session): its engine core must not outlive it.
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine: str, setup: EngineSetup, shadow_address: str, tmp: Path) -> Server:
    env = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "SHADOW_ADDRESS": shadow_address,
        "SHADOW_ENGINE": engine,
        "SHADOW_RECORD": str(tmp / f"{engine}.jsonl"),
    }
    port = free_port()
    log = tmp / f"{engine}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            serve_command(setup, port), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return Server(engine, port, process, log, tmp / f"{engine}.jsonl")


@dataclass
class Session:
    service: ShadowService
    hooked: Server
    plugin: Server
    tmp: Path
    sent: dict[str, int] = field(default_factory=dict)  # requests the tests completed, per engine label


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    tmp = tmp_path_factory.mktemp("serve-path")
    config = ServiceConfig(
        shadow=ShadowConfig(
            windows=WindowRules(seconds=2.0),
            hardware="cpu",
            evaluation=EvaluationSettings(optimal_time_limit=1.0, optimal_max_requests=16),
        ),
        tick_seconds=0.1,
    )
    service = ShadowService(config, LocalTasks())
    servers: list[Server] = []
    try:
        address = service.addresses()["grpc"]
        servers.append(start_server("hooked", SETUP, address, tmp))
        servers.append(start_server("plugin", replace(SETUP, scheduler_cls=None), address, tmp))
        for server in servers:
            wait_until(server.healthy, STARTUP_SECONDS, lambda s=server: f"{s.engine} to serve:\n{s.tail()}")
        yield Session(service, servers[0], servers[1], tmp)
    finally:
        for server in servers:
            server.stop()
        service.close()


def bench(server: Server, tmp: Path, name: str, *dataset_args: str) -> dict:
    """Run `vllm bench serve` against `server`; its own report (--save-result JSON)."""
    command = [
        sys.executable, "-m", "vllm_shadow.adapters.vllm.cpu_cli", "bench", "serve",
        "--backend", "vllm", "--base-url", server.url, "--model", str(TINY_LLAMA),
        "--request-rate", "8", "--seed", "0", "--ignore-eos", "--disable-tqdm",
        "--save-result", "--result-dir", str(tmp), "--result-filename", f"{name}.json",
        *dataset_args,
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads((tmp / f"{name}.json").read_text())


def whole_recording(path: Path) -> list[Event]:
    def read() -> list[Event] | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", RecordingTruncatedWarning)
                return list(read_events(path))
        except (RecordingError, RecordingTruncatedWarning):  # read while a line was being written
            return None

    return wait_until(read, 5.0, f"a whole recording in {path}")


def engine_snapshot(service: ShadowService, engine: str):
    found = [e for e in service.snapshot().engines if e.engine == engine]
    return found[0] if found else None


def finished_in_shadow(service: ShadowService, engine: str, count: int) -> None:
    wait_until(
        lambda: (e := engine_snapshot(service, engine)) is not None and e.tracker.requests_finished >= count,
        60,
        lambda: f"the shadow to see {count} requests of {engine} finish: {engine_snapshot(service, engine)}",
        every=0.1,
    )


def test_random_load_through_the_hook_matches_the_client_s_report(session: Session) -> None:
    report = bench(
        session.hooked,
        session.tmp,
        "random",
        *("--dataset-name", "random", "--num-prompts", str(RANDOM_PROMPTS)),
        *("--random-input-len", "64", "--random-output-len", "16", "--random-range-ratio", "0.5"),
    )
    assert (report["completed"], report["failed"]) == (RANDOM_PROMPTS, 0)
    session.sent["hooked"] = RANDOM_PROMPTS
    finished_in_shadow(session.service, "hooked", RANDOM_PROMPTS)
    snapshot = engine_snapshot(session.service, "hooked")
    assert snapshot.mode == "steps"  # the hook's stream; the plugin's reports of the same engine are ignored
    assert snapshot.tracker.requests_arrived == snapshot.tracker.requests_finished == report["completed"]
    # The shadow's own token check: each finish's output count matches the tokens its steps emitted.
    assert snapshot.tracker.inconsistencies == snapshot.tracker.unknown_requests == 0
    labels = {"engine": "hooked"}
    found = scrape(session.service)
    assert metric(found, "vllm_shadow_requests_finished_total", **labels) == report["completed"]
    assert metric(found, "vllm_shadow_requests_arrived_total", **labels) == report["completed"]

    # Tokens: what the hook reported (the shadow's input) against what the client sent and received.
    hook_stream = whole_recording(session.hooked.recording)
    arrivals = [e for e in hook_stream if isinstance(e, RequestArrival)]
    finishes = [e for e in hook_stream if isinstance(e, RequestFinish)]
    assert sum(a.prompt_tokens for a in arrivals) == report["total_input_tokens"]
    assert sum(f.output_tokens for f in finishes) == report["total_output_tokens"]
    steps = [e for e in hook_stream if isinstance(e, EngineStep) and e.scheduled_tokens]
    assert metric(found, "vllm_shadow_engine_steps_total", **labels) == len(steps)
    # Every token the engine computed is a prompt token or a generated one, the last of which is never fed back.
    scheduled = sum(sum(s.scheduled_tokens.values()) for s in steps)
    preempted = sum(len(s.preempted) for s in steps)
    if not preempted:
        assert scheduled == report["total_input_tokens"] + report["total_output_tokens"] - RANDOM_PROMPTS

    # The API server's stat logger recorded the same requests to its own file; the ids join.
    api_stream = whole_recording(session.tmp / "hooked.api-server.jsonl")
    api_finishes = {e.request_id: e.output_tokens for e in api_stream if isinstance(e, RequestFinish)}
    assert {api_request_id(f.request_id): f.output_tokens for f in finishes} == api_finishes
    assert all(e.request_id != api_request_id(e.request_id) for e in finishes)  # they needed joining


def test_trace_driven_load_through_the_stat_logger_is_a_second_engine(session: Session) -> None:
    requests = trace_workload(
        read_trace(bundled_trace("azure-conv"), limit=TRACE_PROMPTS).requests,
        prompt_scale=0.05,
        output_scale=0.1,
        max_prompt_tokens=200,
        max_output_tokens=24,
    )
    dataset = write_bench_dataset(requests, session.tmp / "azure-conv.jsonl")
    report = bench(
        session.plugin,
        session.tmp,
        "trace",
        *("--dataset-name", "custom", "--dataset-path", str(dataset), "--num-prompts", str(TRACE_PROMPTS)),
        *("--custom-output-len", "-1", "--skip-chat-template", "--disable-shuffle"),
    )
    assert (report["completed"], report["failed"]) == (TRACE_PROMPTS, 0)
    session.sent["plugin"] = TRACE_PROMPTS
    assert report["total_input_tokens"] == sum(r.prompt_tokens for r in requests)
    assert report["total_output_tokens"] == sum(r.output_tokens for r in requests)
    finished_in_shadow(session.service, "plugin", TRACE_PROMPTS)

    plugin = engine_snapshot(session.service, "plugin")
    assert plugin.mode == "requests"
    assert plugin.tracker.requests_arrived == plugin.tracker.requests_finished == TRACE_PROMPTS
    api_stream = whole_recording(session.tmp / "plugin.api-server.jsonl")
    arrivals = [e for e in api_stream if isinstance(e, RequestArrival)]
    assert sorted(a.prompt_tokens for a in arrivals) == sorted(r.prompt_tokens for r in requests)
    assert sum(a.output_tokens or 0 for a in arrivals) == report["total_output_tokens"]
    assert not (session.tmp / "plugin.jsonl").exists()  # no hook in that engine core: nothing else recorded

    # One shadow, two engines, each with its own counts: neither engine's requests are mixed into the other's.
    found = scrape(session.service)
    engines = {(e.model_name, e.engine): e for e in session.service.snapshot().engines}
    labels = {engine for _, engine in engines}
    # Both, when the module runs whole; "hooked" may be missing or idle when this test runs alone.
    assert set(session.sent) <= labels <= {"hooked", "plugin"}
    assert len(engines) == len(labels) == len({e.source for e in engines.values()})
    for engine in labels:
        sent = session.sent.get(engine, 0)
        snapshot = engine_snapshot(session.service, engine)
        assert snapshot.tracker.requests_arrived == snapshot.tracker.requests_finished == sent, engine
        assert metric(found, "vllm_shadow_requests_finished_total", engine=engine) == sent, engine
