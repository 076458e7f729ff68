"""Where the in-engine hooks send events, from environment variables (vLLM instantiates the hooks itself).

    SHADOW_ADDRESS=host:port        gRPC ingest of a shadow (adapters.grpc_ingest.IngestServer)
    SHADOW_TOKEN=secret             shared secret sent with every gRPC batch
    SHADOW_RECORD=path[.gz]         record the stream to a file; `{pid}` in the path becomes the process id,
                                    `{stream}` the writer's stream name (see `record_path`)
    SHADOW_RAY_ACTOR=name           a named Ray actor with an `ingest(batch)` method; `name-0,name-1,...`: a
                                    fleet of them (adapters.ray_transport.FleetSink places the engine)
    SHADOW_RAY_NAMESPACE=ns         its Ray namespace
    SHADOW_QUEUE_CAPACITY=100000    events buffered in the engine before new ones are dropped (and counted)
    SHADOW_ENGINE=label             the engine's label in EngineInfo (default: its data-parallel rank;
                                    with data parallelism, `label-rank`)

With none of the destinations set, no publisher is created and the hooks only pass calls through.

One file, one writer. Under `vllm serve` the hook runs in the engine-core process(es) and the stat-logger plugin
in the API-server process; every writer of a recording names its stream, and `record_path` gives each stream
its own file, so no two writers ever truncate or interleave one file. The engine core's request ids are the
API server's with `-` and 8 random characters appended (vLLM's `InputProcessor.assign_request_id`);
`api_request_id` maps one to the other, which joins the two streams.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from vllm_shadow.adapters.publisher import BatchSink, Publisher

DEFAULT_QUEUE_CAPACITY = 100_000
ENGINE_CORE = "engine-core"  # the mirror hook's process
API_SERVER = "api-server"  # the stat-logger plugin's process under `vllm serve`
_RECORD_SUFFIXES = re.compile(r"(\.jsonl)?(\.gz)?$")
_ENGINE_CORE_SUFFIX = re.compile(r"-[0-9a-zA-Z]{8}$")


@dataclass(frozen=True, slots=True)
class RecordStream:
    """Who writes a recording: the process role, the data-parallel engine index it reports, and which of
    several processes of that role it is (vLLM runs one API server per data-parallel rank by default)."""

    role: str = ENGINE_CORE
    index: int = 0
    process: int = 0

    @property
    def name(self) -> str:
        name = self.role if self.process == 0 else f"{self.role}-p{self.process}"
        return name if self.index == 0 else f"{name}-{self.index}"


def record_path(template: str, stream: RecordStream = RecordStream(), pid: int | None = None) -> str:
    """The file `stream` records to. `{pid}` and `{stream}` are filled in. Without `{stream}`, the first
    engine core's hook writes the file as named and every other stream gets its name inserted before the
    extension (`run.jsonl.gz` -> `run.api-server.jsonl.gz`); with `{pid}` the processes' files differ
    already, and only a second stream in one process (a data-parallel engine's stat logger) is renamed."""
    has_pid = "{pid}" in template
    path = template.replace("{pid}", str(os.getpid() if pid is None else pid))
    if "{stream}" in path:
        return path.replace("{stream}", stream.name)
    if stream == RecordStream() or (has_pid and stream.index == 0):
        return path
    suffixes = _RECORD_SUFFIXES.search(path)
    assert suffixes is not None  # the pattern matches the empty end of any string
    return f"{path[: suffixes.start()]}.{stream.name}{suffixes.group(0)}"


def api_request_id(engine_core_request_id: str) -> str:
    """The API server's id of a request (what the stat-logger plugin, OTLP spans and clients see) from the
    engine core's (what the mirror hook sees): vLLM appends `-` and 8 random characters to make it unique."""
    return _ENGINE_CORE_SUFFIX.sub("", engine_core_request_id)


@dataclass(frozen=True, slots=True)
class ShadowEnv:
    address: str | None = None
    token: str | None = None
    record: str | None = None
    ray_actor: str | None = None
    ray_namespace: str | None = None
    queue_capacity: int = DEFAULT_QUEUE_CAPACITY
    engine: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> ShadowEnv:
        def get(name: str) -> str | None:
            return environ.get(name) or None

        capacity = get("SHADOW_QUEUE_CAPACITY")
        return cls(
            address=get("SHADOW_ADDRESS"),
            token=get("SHADOW_TOKEN"),
            record=get("SHADOW_RECORD"),
            ray_actor=get("SHADOW_RAY_ACTOR"),
            ray_namespace=get("SHADOW_RAY_NAMESPACE"),
            queue_capacity=int(capacity) if capacity else DEFAULT_QUEUE_CAPACITY,
            engine=get("SHADOW_ENGINE"),
        )

    def engine_label(self, rank: int, data_parallel_size: int = 1) -> str:
        """The label that keys this engine in the shadow: unique per data-parallel rank, or one shadow would
        take the ranks for one engine restarting over and over."""
        if not self.engine:
            return str(rank)
        return self.engine if data_parallel_size <= 1 else f"{self.engine}-{rank}"

    @property
    def enabled(self) -> bool:
        return bool(self.address or self.record or self.ray_actor)

    def sinks(self, stream: RecordStream = RecordStream()) -> list[BatchSink]:
        """`stream` names the writer (see `record_path`); it only changes the recording's file name."""
        # Imported on demand: an engine that only records should not load grpc or ray.
        sinks: list[BatchSink] = []
        if self.record:
            from vllm_shadow.adapters.recorder import Recorder

            sinks.append(Recorder(record_path(self.record, stream)))
        if self.address:
            from vllm_shadow.adapters.grpc_ingest import GrpcSink

            sinks.append(GrpcSink(self.address, token=self.token))
        if self.ray_actor:
            from vllm_shadow.adapters.ray_transport import FleetSink, RayActorSink

            members = [m.strip() for m in self.ray_actor.split(",") if m.strip()]
            if len(members) > 1:  # a fleet of shadows: the engine places itself among them
                sinks.append(FleetSink(members, namespace=self.ray_namespace, token=self.token))
            else:
                sinks.append(RayActorSink(self.ray_actor, namespace=self.ray_namespace, token=self.token))
        return sinks

    def publisher(self, stream: RecordStream = RecordStream()) -> Publisher | None:
        if not self.enabled:
            return None
        return Publisher(self.sinks(stream), capacity=self.queue_capacity)
