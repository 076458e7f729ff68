"""The service with its real endpoints: gRPC ingest (good, malformed, oversized, unauthenticated batches),
/metrics over HTTP, and engine announcements that survive a restart of the shadow."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest

from tests import shadow_support as support
from tests.waiting import wait_until
from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.grpc_ingest import PUBLISH_METHOD, TOKEN_METADATA_KEY, GrpcSink
from vllm_shadow.adapters.proto import shadow_events_pb2 as pb
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.wire import encode_batch
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig
from vllm_shadow.runtime.service import ServiceConfig, ShadowService
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.tracking.reasons import SkipReason, UnattributedReason
from vllm_shadow.tracking.windows import WindowRules

SHADOW = ShadowConfig(
    windows=WindowRules(seconds=0.5), hardware="cpu", evaluation=EvaluationSettings(optimal=False)
)


def service(tmp_path: Path | None = None, **overrides) -> ShadowService:
    config = ServiceConfig(
        shadow=SHADOW,
        tick_seconds=0.05,
        state_path=str(tmp_path / "engines.json") if tmp_path else None,
        **overrides,
    )
    return ShadowService(config, LocalTasks())


def wait_evaluated(s: ShadowService, timeout: float = 30.0) -> None:
    s.flush()
    wait_until(lambda: s.idle() and s.snapshot().engines, timeout, "the service to evaluate every window")


def raw_publish(address: str, data: bytes, token: str | None = None) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            PUBLISH_METHOD, request_serializer=None, response_deserializer=pb.Ack.FromString
        )
        try:
            call(data, timeout=5, metadata=((TOKEN_METADATA_KEY, token),) if token else ())
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_batches_over_grpc_are_evaluated_and_exported_on_http() -> None:
    s = service()
    try:
        sink = GrpcSink(s.addresses()["grpc"])
        for batch in support.batches("fcfs-kv12"):
            sink(batch)
        sink.close()
        wait_evaluated(s)
        snapshot = s.snapshot()
        (engine,) = snapshot.engines
        assert engine.windows_evaluated >= 5 and snapshot.events["grpc"] == sum(
            len(b.events) for b in support.batches("fcfs-kv12")
        )
        with urllib.request.urlopen(snapshot.addresses["metrics"], timeout=5) as response:
            text = response.read().decode()
        assert f'vllm_shadow_windows_evaluated_total{{engine="0",model_name="{engine.model_name}"}}' in text
        assert snapshot.addresses["metrics"].startswith("http://127.0.0.1:")
        assert snapshot.addresses["grpc"].startswith("127.0.0.1:")
    finally:
        s.close()


def test_bad_and_oversized_messages_are_refused_counted_and_survived() -> None:
    s = service(max_message_bytes=64 * 1024)
    try:
        address = s.addresses()["grpc"]
        assert raw_publish(address, b"\xff\xfe not a protobuf") == grpc.StatusCode.INVALID_ARGUMENT
        too_big = encode_batch(EventBatch([RequestArrival("r" * 100_000, 0.0, 1)], "x"))
        assert raw_publish(address, too_big) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Still serving: a well-formed stream afterwards is evaluated.
        sink = GrpcSink(address, max_message_bytes=64 * 1024)
        for batch in support.batches("priority-kv16"):
            sink(batch)
        sink.close()
        wait_evaluated(s)
        snapshot = s.snapshot()
        assert snapshot.refused["grpc"]["malformed"] == 1 and snapshot.refused["grpc"]["oversized"] == 1
        assert snapshot.engines[0].windows_evaluated >= 3
    finally:
        s.close()


def test_a_shadow_with_a_token_refuses_senders_without_it() -> None:
    s = service(grpc_token="s3cret")
    try:
        batch = support.batches("fcfs-kv12")[0]
        with pytest.raises(grpc.RpcError) as refused:
            GrpcSink(s.addresses()["grpc"], token="wrong")(batch)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        GrpcSink(s.addresses()["grpc"], token="s3cret")(batch)
        snapshot = s.snapshot()
        assert snapshot.refused["grpc"]["unauthenticated"] == 1 and snapshot.batches["grpc"] == 1
    finally:
        s.close()


def test_engine_announcements_survive_a_restart_of_the_shadow(tmp_path: Path) -> None:
    """An engine announces itself once. A shadow restarted mid-stream still knows it from its state file,
    distrusts what it missed, and evaluates again once the requests it never saw arrive are gone."""
    batches = support.batches("fcfs-kv12")
    first = service(tmp_path)
    try:
        for batch in batches[:10]:
            first.ingest(batch)
        wait_until((tmp_path / "engines.json").exists, 5, "the service to write its state file")
    finally:
        first.close()
    second = service(tmp_path)
    try:
        for batch in batches[len(batches) // 3 :]:
            second.ingest(batch)
        wait_evaluated(second)
        snapshot = second.snapshot()
        assert UnattributedReason.NO_ENGINE_INFO not in snapshot.unattributed_drops
        (engine,) = snapshot.engines
        assert engine.tracker.unknown_requests > 0 and engine.windows_evaluated >= 1
        assert engine.last.fidelity.step_match_ratio == 1.0
        assert engine.windows_skipped.get(SkipReason.LOST_EVENTS, 0) + engine.windows_evaluated >= 1
    finally:
        second.close()
    without_state = service()
    try:
        for batch in batches[len(batches) // 3 :]:
            without_state.ingest(batch)
        assert without_state.snapshot().unattributed_drops[UnattributedReason.NO_ENGINE_INFO] > 0
    finally:
        without_state.close()


def test_with_a_token_the_ray_entry_refuses_calls_without_it_and_counts_them() -> None:
    s = service(grpc_token="s3cret", metrics_port=None)
    try:
        batch = support.batches("fcfs-kv12")[0]
        with pytest.raises(PermissionError, match="token"):
            s.ingest(batch)
        with pytest.raises(PermissionError, match="token"):
            s.ingest(batch, token="wrong")
        assert s.ingest(batch, token="s3cret") == len(batch.events)
        snapshot = s.snapshot()
        assert snapshot.refused["ray"]["unauthenticated"] == 2 and snapshot.batches == {"ray": 1}
    finally:
        s.close()
