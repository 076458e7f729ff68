"""Where the in-engine hooks send events, from environment variables (vLLM instantiates the hooks itself).

    SHADOW_ADDRESS=host:port        gRPC ingest of a shadow (adapters.grpc_ingest.IngestServer)
    SHADOW_TOKEN=secret             shared secret sent with every gRPC batch
    SHADOW_RECORD=path[.gz]         record the stream to a file; `{pid}` in the path becomes the process id
    SHADOW_RAY_ACTOR=name           a named Ray actor with an `ingest(batch)` method
    SHADOW_RAY_NAMESPACE=ns         its Ray namespace
    SHADOW_QUEUE_CAPACITY=100000    events buffered in the engine before new ones are dropped (and counted)
    SHADOW_ENGINE=label             the engine's label in EngineInfo (default: its data-parallel rank)

With none of the destinations set, no publisher is created and the hooks only pass calls through.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from vllm_shadow.adapters.publisher import BatchSink, Publisher

DEFAULT_QUEUE_CAPACITY = 100_000


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

    @property
    def enabled(self) -> bool:
        return bool(self.address or self.record or self.ray_actor)

    def sinks(self) -> list[BatchSink]:
        # Imported on demand: an engine that only records should not load grpc or ray.
        sinks: list[BatchSink] = []
        if self.record:
            from vllm_shadow.adapters.recorder import Recorder

            sinks.append(Recorder(self.record.replace("{pid}", str(os.getpid()))))
        if self.address:
            from vllm_shadow.adapters.grpc_ingest import GrpcSink

            sinks.append(GrpcSink(self.address, token=self.token))
        if self.ray_actor:
            from vllm_shadow.adapters.ray_transport import RayActorSink

            sinks.append(RayActorSink(self.ray_actor, namespace=self.ray_namespace))
        return sinks

    def publisher(self) -> Publisher | None:
        if not self.enabled:
            return None
        return Publisher(self.sinks(), capacity=self.queue_capacity)
