"""The OTLP span receiver, fed by the real OpenTelemetry SDK exporter over loopback gRPC."""

from __future__ import annotations

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk", reason="the OpenTelemetry SDK comes with vLLM")

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from vllm_shadow.adapters.events import RequestArrival, RequestFinish
from vllm_shadow.adapters.otlp import OtlpSpanReceiver
from vllm_shadow.adapters.publisher import EventBatch


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
