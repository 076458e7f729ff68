"""The gRPC ingest on real loopback sockets: delivery, and each refusal answered, counted and survived."""

from __future__ import annotations

import threading

import grpc
import pytest

from tests.waiting import wait_until
from vllm_shadow.adapters.events import EngineInfo, EngineStep, RequestArrival, RequestFinish
from vllm_shadow.adapters.grpc_ingest import PUBLISH_METHOD, TOKEN_METADATA_KEY, GrpcSink, IngestServer
from vllm_shadow.adapters.publisher import EventBatch, Publisher
from vllm_shadow.adapters.wire import encode_batch

EVENTS = [
    EngineInfo("tiny", 128, 64),
    RequestArrival("r1-0a1b2c3d", 100.0, 300, max_tokens=50),
    EngineStep(0, 100.01, 0.004, {"r1-0a1b2c3d": 300}, kv_blocks_used=3),
    RequestFinish("r1-0a1b2c3d", 100.5, 50),
]


class _Collect:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[EventBatch] = []

    def __call__(self, batch: EventBatch) -> None:
        with self.lock:
            self.batches.append(batch)


def _raw_call(server: IngestServer, data: bytes, token: str | None = None) -> grpc.RpcError | None:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(PUBLISH_METHOD, request_serializer=None, response_deserializer=None)
        metadata = ((TOKEN_METADATA_KEY, token),) if token else ()
        try:
            call(data, timeout=5, metadata=metadata)
        except grpc.RpcError as exc:
            return exc
    return None


def test_batches_arrive_intact_on_loopback() -> None:
    sink = _Collect()
    with IngestServer(sink) as server:
        assert server.address.startswith("127.0.0.1:")
        GrpcSink(server.address)(EventBatch(EVENTS, "engine-a", 7, 2))
    assert sink.batches == [EventBatch(EVENTS, "engine-a", 7, 2)]
    assert server.stats.batches == 1 and server.stats.events == 4
    assert server.stats.dropped_by_source == {"engine-a": 2}
    assert server.stats.lost_batches_by_source == {"engine-a": 7}  # sequences 0..6 never arrived


def test_sequence_gaps_count_batches_lost_on_the_way() -> None:
    with IngestServer(_Collect()) as server:
        sink = GrpcSink(server.address)
        for sequence in (0, 1, 1, 4, 5, 9):  # 1 twice: the halves of a split batch
            sink(EventBatch(EVENTS[:1], "engine-b", sequence))
    assert server.stats.lost_batches_by_source == {"engine-b": 2 + 3}


def test_token_is_required_when_configured() -> None:
    sink = _Collect()
    with IngestServer(sink, token="s3cret") as server:
        data = encode_batch(EventBatch(EVENTS))
        missing = _raw_call(server, data)
        wrong = _raw_call(server, data, token="guess")
        assert missing is not None and missing.code() == grpc.StatusCode.UNAUTHENTICATED
        assert wrong is not None and wrong.code() == grpc.StatusCode.UNAUTHENTICATED
        GrpcSink(server.address, token="s3cret")(EventBatch(EVENTS))
    assert server.stats.refused_unauthenticated == 2
    assert len(sink.batches) == 1


def test_malformed_bytes_are_refused_and_the_server_keeps_serving() -> None:
    sink = _Collect()
    with IngestServer(sink) as server:
        refused = _raw_call(server, b"\xff\x00garbage")
        assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "EventBatch" in (refused.details() or "")
        GrpcSink(server.address)(EventBatch(EVENTS))
    assert server.stats.refused_malformed == 1
    assert len(sink.batches) == 1


def test_oversized_batches_are_refused_and_counted_but_the_client_splits_its_own() -> None:
    sink = _Collect()
    big = EventBatch([EngineStep(i, 0.0, 0.0, {f"req-{j}": 1 for j in range(40)}) for i in range(100)])
    size = len(encode_batch(big))
    with IngestServer(sink, max_message_bytes=size // 4) as server:
        refused = _raw_call(server, encode_batch(EventBatch(big.events[:40])))
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        GrpcSink(server.address, max_message_bytes=size // 4)(big)
    assert server.stats.refused_oversized == 1
    assert [e for b in sink.batches for e in b.events] == big.events
    assert len(sink.batches) > 1


def test_a_failing_sink_is_an_internal_error_for_that_batch_only() -> None:
    calls = 0

    def flaky(batch: EventBatch) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("shadow window full")

    with IngestServer(flaky) as server:
        failed = _raw_call(server, encode_batch(EventBatch(EVENTS)))
        assert failed is not None and failed.code() == grpc.StatusCode.INTERNAL
        GrpcSink(server.address)(EventBatch(EVENTS))
    assert server.stats.sink_failures == 1 and server.stats.batches == 1


def test_publisher_to_a_dead_address_counts_failures_without_blocking() -> None:
    with IngestServer(_Collect()) as server:
        address = server.address  # a port that was just ours, now closed
    publisher = Publisher([GrpcSink(address, timeout=0.2)], flush_interval=0.005, max_backoff=0.05)
    for i in range(1000):
        publisher.publish(EngineStep(i, 0.0, 0.0, {"r": 1}))
    # Every event taken at once: publish queues and returns, the dead address is the delivery thread's problem
    # (what that costs an engine is measured by benchmarks/hook_overhead.py, with a hook aimed at a closed port).
    assert publisher.accepted == 1000 and publisher.dropped == 0
    (stats,) = publisher.sink_stats()
    wait_until(lambda: stats.lost_events == 1000, 10, "the publisher to count every event as lost")
    publisher.close()
    assert stats.failures >= 1 and stats.sent_events == 0 and stats.lost_events == 1000


@pytest.mark.parametrize("address", ["127.0.0.1:0", "localhost:0"])
def test_server_binds_only_where_told(address: str) -> None:
    with IngestServer(_Collect(), address=address) as server:
        assert server.port > 0
