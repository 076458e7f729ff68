"""The gRPC ingest on real loopback sockets: delivery, and each refusal answered, counted and survived."""

from __future__ import annotations

import threading

import grpc
import pytest

from tests.waiting import wait_until
from vllm_shadow.adapters.events import EngineInfo, EngineStep, RequestArrival, RequestFinish
from vllm_shadow.adapters.grpc_ingest import PUBLISH_METHOD, TOKEN_METADATA_KEY, GrpcSink, IngestServer
from vllm_shadow.adapters.proto import shadow_events_pb2 as pb
from vllm_shadow.adapters.publisher import EventBatch, Publisher
from vllm_shadow.adapters.wire import encode_batch
from vllm_shadow.tracking.sequencing import Sequencer

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


def _raw_call(server: IngestServer, data: bytes, token: str | None = None) -> grpc.RpcError | pb.Ack:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(
            PUBLISH_METHOD, request_serializer=None, response_deserializer=pb.Ack.FromString
        )
        metadata = ((TOKEN_METADATA_KEY, token),) if token else ()
        try:
            return call(data, timeout=5, metadata=metadata)
        except grpc.RpcError as exc:
            return exc


def test_batches_arrive_intact_on_loopback() -> None:
    sink = _Collect()
    sent = EventBatch(EVENTS, "engine-a", 7, 2, incarnation=2**64 - 1, lost_batches=3)
    with IngestServer(sink) as server:
        assert server.address.startswith("127.0.0.1:")
        GrpcSink(server.address)(sent)
    assert sink.batches == [sent]
    assert server.stats.batches == 1 and server.stats.events == 4


class _Sequenced:
    """The shadow's side of ordering: a sequencer behind the server, as in the core."""

    def __init__(self) -> None:
        self.sequencer = Sequencer(max_held=1)
        self.delivered: list[EventBatch] = []

    def __call__(self, batch: EventBatch) -> int:
        pushed = self.sequencer.push(batch)
        self.delivered += [d.batch for d in pushed.deliveries]
        return len(batch.events) if pushed.accepted else 0


def test_gaps_and_the_parts_of_split_batches_reach_the_sequencer_as_sent() -> None:
    sequenced = _Sequenced()
    big = [EngineStep(i, 0.0, 0.0, {f"req-{j}": 1 for j in range(40)}) for i in range(100)]
    limit = len(encode_batch(EventBatch(big))) // 4
    with IngestServer(sequenced, max_message_bytes=limit) as server:
        sink = GrpcSink(server.address, max_message_bytes=limit)
        for sequence in (0, 1, 4, 5, 9):
            sink(EventBatch(big if sequence == 1 else EVENTS[:1], "engine-b", sequence, incarnation=5))
        sink(EventBatch(EVENTS[:1], "engine-b", 10, incarnation=5))
    stats = sequenced.sequencer.stats
    assert stats.lost_batches == 2 + 3 and stats.late_batches == 0
    # Before parts, the second half of a split batch was dropped as a duplicate of its sequence number.
    split = [b for b in sequenced.delivered if b.sequence == 1]
    assert len(split) > 1 and [e for b in split for e in b.events] == big
    assert all(len(encode_batch(b)) <= limit for b in split)


def test_token_is_required_when_configured() -> None:
    sink = _Collect()
    with IngestServer(sink, token="s3cret") as server:
        data = encode_batch(EventBatch(EVENTS))
        missing = _raw_call(server, data)
        wrong = _raw_call(server, data, token="guess")
        assert isinstance(missing, grpc.RpcError) and missing.code() == grpc.StatusCode.UNAUTHENTICATED
        assert isinstance(wrong, grpc.RpcError) and wrong.code() == grpc.StatusCode.UNAUTHENTICATED
        GrpcSink(server.address, token="s3cret")(EventBatch(EVENTS))
    assert server.stats.refused_unauthenticated == 2
    assert len(sink.batches) == 1


def test_malformed_bytes_are_refused_and_the_server_keeps_serving() -> None:
    sink = _Collect()
    with IngestServer(sink) as server:
        refused = _raw_call(server, b"\xff\x00garbage")
        assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
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
        assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
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
        assert isinstance(failed, grpc.RpcError) and failed.code() == grpc.StatusCode.INTERNAL
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


# ---- issue 13: acknowledgements, numeric validation, memory before authentication -----------------------------


def test_the_ack_counts_only_the_events_the_sink_took() -> None:
    taken = iter([None, 0])  # all of them; then none (a late batch the shadow dropped)
    with IngestServer(lambda batch: next(taken)) as server:
        data = encode_batch(EventBatch(EVENTS))
        first, second = _raw_call(server, data), _raw_call(server, data)
    assert isinstance(first, pb.Ack) and first.accepted == len(EVENTS)
    assert isinstance(second, pb.Ack) and second.accepted == 0


def test_a_batch_with_an_impossible_number_is_refused_whole_as_invalid_argument() -> None:
    sink = _Collect()
    poisoned = EventBatch([EVENTS[1], EngineStep(1, 100.0, float("inf"), {"r1-0a1b2c3d": 1})])
    with IngestServer(sink) as server:
        refused = _raw_call(server, encode_batch(poisoned))
        assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "duration is inf" in (refused.details() or "")
        GrpcSink(server.address)(EventBatch(EVENTS))
    assert server.stats.refused_invalid == 1 and server.stats.refused_malformed == 0
    assert sink.batches == [EventBatch(EVENTS)]  # nothing of the poisoned batch, the next one whole


def test_an_unauthenticated_call_is_refused_before_its_message_is_read() -> None:
    with IngestServer(_Collect(), token="s3cret", max_message_bytes=1024) as server:
        # Far beyond the receive limit: had the server read the message, the answer would be RESOURCE_EXHAUSTED.
        refused = _raw_call(server, b"\x00" * (1 << 20))
    assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.stats.refused_unauthenticated == 1


def test_concurrent_calls_beyond_the_bound_are_refused_not_queued() -> None:
    entered = threading.Semaphore(0)
    release = threading.Event()

    def slow(batch: EventBatch) -> None:
        entered.release()
        release.wait(10)

    with IngestServer(slow, max_workers=4, max_concurrent_rpcs=1) as server:
        data = encode_batch(EventBatch(EVENTS))
        held = threading.Thread(target=_raw_call, args=(server, data))
        held.start()
        try:
            assert entered.acquire(timeout=10), "the first call never reached the sink"
            refused = _raw_call(server, data)  # a second call while the first is served
        finally:
            release.set()
            held.join(10)
    assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
