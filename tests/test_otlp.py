"""The OTLP span receiver, fed by the real OpenTelemetry SDK exporter over loopback gRPC."""

from __future__ import annotations

import threading

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk", reason="the OpenTelemetry SDK comes with vLLM")

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from vllm_shadow.adapters.events import RequestArrival, RequestFinish
from vllm_shadow.adapters.otlp import OtlpSpanReceiver
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig
from vllm_shadow.runtime.service import ServiceConfig, ShadowService
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.tracking.reasons import RefusalReason

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class _Collect:
    def __init__(self) -> None:
        self.batches: list[EventBatch] = []

    def __call__(self, batch: EventBatch) -> None:
        self.batches.append(batch)


def _tracer(address: str):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=address, insecure=True)))
    return provider, provider.get_tracer("vllm.test")


def test_llm_request_spans_become_arrivals_and_finishes() -> None:
    sink = _Collect()
    with OtlpSpanReceiver(sink) as receiver:
        provider, tracer = _tracer(receiver.address)
        # As vLLM's output processor does: start = arrival, attributes with the request's usage and latency.
        span = tracer.start_span("llm_request", start_time=1_700_000_000_000_000_000)
        span.set_attributes(
            {
                "gen_ai.request.id": "chat-42",
                "gen_ai.usage.prompt_tokens": 300,
                "gen_ai.usage.completion_tokens": 57,
                "gen_ai.request.max_tokens": 64,
                "gen_ai.latency.e2e": 2.5,
            }
        )
        span.end(end_time=1_700_000_002_600_000_000)
        tracer.start_span("http_get").end()  # not ours: ignored
        incomplete = tracer.start_span("llm_request")
        incomplete.set_attribute("gen_ai.request.id", "no-usage")
        incomplete.end()
        provider.shutdown()
    events = [e for b in sink.batches for e in b.events]
    assert events == [
        RequestArrival("chat-42", 1_700_000_000.0, 300, output_tokens=57, max_tokens=64),
        RequestFinish("chat-42", 1_700_000_002.5, 57, reason="unknown"),
    ]
    assert receiver.stats.requests == 1
    assert receiver.stats.ignored_spans == 1 and receiver.stats.incomplete_spans == 1


def test_malformed_exports_are_refused_and_counted() -> None:
    with OtlpSpanReceiver(_Collect()) as receiver, grpc.insecure_channel(receiver.address) as channel:
        export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as refused:
            export(b"\xff\xff\xff\xff", timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert receiver.stats.refused_malformed == 1


def _export_request(address: str, request_id: str, headers: dict[str, str] | None) -> None:
    """One finished request's span, exported by the SDK with these gRPC headers (what OTEL_EXPORTER_OTLP_
    TRACES_HEADERS sets in an engine's environment); a refused export is the exporter's logged failure."""
    provider = TracerProvider()
    exporter = OTLPSpanExporter(endpoint=address, insecure=True, headers=headers, timeout=5)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = provider.get_tracer("vllm.test").start_span("llm_request")
    span.set_attributes(
        {
            "gen_ai.request.id": request_id,
            "gen_ai.usage.prompt_tokens": 1,
            "gen_ai.usage.completion_tokens": 1,
        }
    )
    span.end()
    provider.shutdown()


def test_a_receiver_with_a_token_refuses_exports_without_it_and_counts_them() -> None:
    sink = _Collect()
    with OtlpSpanReceiver(sink, token="s3cret") as receiver:
        _export_request(receiver.address, "none", None)
        _export_request(receiver.address, "wrong", {"x-shadow-token": "wrong"})
        assert sink.batches == [] and receiver.stats.refused_unauthenticated == 2
        assert receiver.stats.exports == 0
        _export_request(receiver.address, "right", {"x-shadow-token": "s3cret"})
    assert [e.request_id for b in sink.batches for e in b.events] == ["right", "right"]
    assert receiver.stats.refused_unauthenticated == 2 and receiver.stats.exports == 1


def test_a_raw_export_without_the_token_is_unauthenticated_not_malformed() -> None:
    with (
        OtlpSpanReceiver(_Collect(), token="s3cret") as receiver,
        grpc.insecure_channel(receiver.address) as channel,
    ):
        export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as refused:
            export(b"\xff\xff\xff\xff", timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert receiver.stats.refused_unauthenticated == 1 and receiver.stats.refused_malformed == 0


def _span_request(spans: list[dict[str, int | float | str]]) -> bytes:
    """An OTLP export of `llm_request` spans with these attributes, as raw bytes (what an exporter sends)."""
    request = ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for i, attributes in enumerate(spans):
        span = scope.spans.add(name="llm_request", start_time_unix_nano=(1_700_000_000 + i) * 10**9)
        span.end_time_unix_nano = span.start_time_unix_nano + 10**9
        for key, value in attributes.items():
            kv = span.attributes.add(key=key)
            if isinstance(value, str):
                kv.value.string_value = value
            elif isinstance(value, int):
                kv.value.int_value = value
            else:
                kv.value.double_value = value
    return request.SerializeToString()


def _usage(request_id: str, **overrides: int | float) -> dict[str, int | float | str]:
    return {
        "gen_ai.request.id": request_id,
        "gen_ai.usage.prompt_tokens": 10,
        "gen_ai.usage.completion_tokens": 5,
        "gen_ai.latency.e2e": 0.5,
    } | overrides


def _raw_export(address: str, data: bytes, token: str | None = None) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        export = channel.unary_unary(EXPORT_METHOD, request_serializer=None, response_deserializer=None)
        try:
            export(data, timeout=5, metadata=(("x-shadow-token", token),) if token else ())
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_an_unauthenticated_export_is_refused_before_its_message_is_read() -> None:
    # Far beyond the receive limit: had the receiver read the message before checking the token (as it once
    # did, in the handler), the answer would be RESOURCE_EXHAUSTED, uncounted, after buffering the message.
    with OtlpSpanReceiver(_Collect(), token="s3cret", max_message_bytes=1024) as receiver:
        assert _raw_export(receiver.address, b"\x00" * (1 << 20)) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            _raw_export(receiver.address, b"\x00" * (1 << 20), "s3cret") == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
    assert receiver.stats.refused_unauthenticated == 1 and receiver.stats.refused_malformed == 0


@pytest.mark.parametrize(
    ("poison", "problem"),
    [
        ({"gen_ai.latency.e2e": float("inf")}, "time is inf"),
        ({"gen_ai.latency.e2e": float("nan")}, "time is nan"),
        ({"gen_ai.usage.prompt_tokens": -3}, "prompt_tokens -3 is below 0"),
        ({"gen_ai.usage.completion_tokens": -1}, "output_tokens -1 is below 0"),
        ({"gen_ai.request.max_tokens": -8}, "max_tokens -8 is below 0"),
        ({"gen_ai.latency.e2e": -1.5}, "ends 1.5s before it starts"),
    ],
)
def test_an_export_with_an_impossible_number_is_refused_whole_and_counted(
    poison: dict[str, int | float], problem: str
) -> None:
    sink = _Collect()
    with OtlpSpanReceiver(sink) as receiver, grpc.insecure_channel(receiver.address) as channel:
        export = channel.unary_unary(EXPORT_METHOD, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as refused:
            export(_span_request([_usage("good"), _usage("bad", **poison)]), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert problem in (refused.value.details() or "")
        export(_span_request([_usage("next")]), timeout=5)  # still serving
    assert receiver.stats.refused_invalid == 1 and receiver.stats.refused_malformed == 0
    # Nothing of the refused export (not even its good span), the next one whole.
    assert [e.request_id for b in sink.batches for e in b.events] == ["next", "next"]
    assert receiver.stats.exports == 1 and receiver.stats.requests == 1


def test_an_infinite_token_count_is_an_incomplete_span_not_a_crash() -> None:
    sink = _Collect()
    with OtlpSpanReceiver(sink) as receiver:
        data = _span_request([_usage("inf", **{"gen_ai.usage.prompt_tokens": float("inf")}), _usage("ok")])
        assert _raw_export(receiver.address, data) == grpc.StatusCode.OK
    assert [e.request_id for b in sink.batches for e in b.events] == ["ok", "ok"]
    assert receiver.stats.incomplete_spans == 1


def test_concurrent_exports_beyond_the_bound_are_refused_not_queued() -> None:
    entered = threading.Semaphore(0)
    release = threading.Event()

    def slow(batch: EventBatch) -> None:
        entered.release()
        release.wait(10)

    data = _span_request([_usage("held")])
    with OtlpSpanReceiver(slow, max_concurrent_rpcs=1) as receiver:
        held = threading.Thread(target=_raw_export, args=(receiver.address, data))
        held.start()
        try:
            assert entered.acquire(timeout=10), "the first export never reached the sink"
            refused = _raw_export(receiver.address, data)  # a second export while the first is served
        finally:
            release.set()
            held.join(10)
    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_service_refuses_invalid_exports_before_the_core_and_exports_the_count() -> None:
    config = ServiceConfig(
        shadow=ShadowConfig(hardware="cpu", evaluation=EvaluationSettings(optimal=False)),
        grpc_address=None,
        otlp_address="127.0.0.1:0",
        metrics_port=None,
    )
    s = ShadowService(config, LocalTasks())
    try:
        address = s.addresses()["otlp"]
        poisoned = _span_request([_usage("a"), _usage("b", **{"gen_ai.latency.e2e": float("nan")})])
        assert _raw_export(address, poisoned) == grpc.StatusCode.INVALID_ARGUMENT
        snapshot = s.snapshot()
        assert snapshot.refused["otlp"][RefusalReason.INVALID] == 1
        assert snapshot.batches.get("otlp", 0) == 0 and snapshot.events.get("otlp", 0) == 0
        assert _raw_export(address, _span_request([_usage("c")])) == grpc.StatusCode.OK
        assert s.snapshot().batches["otlp"] == 1
    finally:
        s.close()
