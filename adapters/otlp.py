"""An OTLP/gRPC trace receiver that turns vLLM's `llm_request` spans into arrivals and finishes.

For engines that cannot be restarted with a hook: point `--otlp-traces-endpoint` at this receiver. vLLM sends
one span per finished request (start = arrival, `gen_ai.latency.e2e` to the finish), so the shadow learns of a
request only when it is done, with its external id and token counts; no steps, batches or preemptions. Events
reach the sink in export order, not arrival order: consumers sort by time. Other spans are ignored (counted).

With a token, an export must carry it in the `x-shadow-token` gRPC metadata, as gRPC ingest requires: set
`OTEL_EXPORTER_OTLP_TRACES_HEADERS=x-shadow-token=<token>` in the engine's environment. An export without it is
refused with UNAUTHENTICATED and counted before its message is read (`grpc_server`'s metadata gate), and calls
held at once are bounded, so unauthenticated exporters cannot make the receiver buffer their messages. The
events of an export are checked as gRPC ingest checks a batch (`adapters.validation`): an export with an
impossible number (a negative token count, an infinite latency) is refused whole with INVALID_ARGUMENT and
counted, never half-applied.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from vllm_shadow.adapters.events import Event, RequestArrival, RequestFinish
from vllm_shadow.adapters.grpc_server import UnaryServer
from vllm_shadow.adapters.publisher import BatchSink, EventBatch
from vllm_shadow.adapters.validation import InvalidBatch, validate_batch

logger = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
SPAN_NAME = "llm_request"
REQUEST_ID = "gen_ai.request.id"
PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
MAX_TOKENS = "gen_ai.request.max_tokens"
E2E = "gen_ai.latency.e2e"
# Exports held at once, waiting or served. An engine's exporter sends one export at a time (its batch span
# processor's one worker), so this is far above honest use; the rest are RESOURCE_EXHAUSTED before being read.
DEFAULT_MAX_CONCURRENT_RPCS = 16


@dataclass(slots=True)
class OtlpStats:
    exports: int = 0
    requests: int = 0  # llm_request spans turned into events
    ignored_spans: int = 0  # other span names
    incomplete_spans: int = 0  # llm_request spans without the attributes we need
    refused_malformed: int = 0
    refused_invalid: int = 0  # exports whose spans carry an impossible number (adapters.validation)
    refused_unauthenticated: int = 0  # exports without the token, or with another
    sink_failures: int = 0


def _attributes(span: Any) -> dict[str, Any]:
    out = {}
    for kv in span.attributes:
        value = kv.value
        kind = value.WhichOneof("value")
        if kind is not None:
            out[kv.key] = getattr(value, kind)
    return out


def span_events(span: Any) -> list[Event] | None:
    """Arrival and finish of an `llm_request` span; None if an attribute we need is missing. Raises
    `InvalidBatch` for a span that ends before it starts; other impossible numbers are `validate_batch`'s."""
    attrs = _attributes(span)
    try:
        request_id = str(attrs[REQUEST_ID])
        prompt = int(attrs[PROMPT_TOKENS])
        output = int(attrs[COMPLETION_TOKENS])
        max_tokens = int(attrs[MAX_TOKENS]) if MAX_TOKENS in attrs else None
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: an infinite count
        return None
    arrival = span.start_time_unix_nano / 1e9
    e2e = attrs.get(E2E)
    finish = arrival + float(e2e) if isinstance(e2e, int | float) else span.end_time_unix_nano / 1e9
    if finish < arrival:  # a negative latency: no engine finishes a request before it arrives
        raise InvalidBatch(f"span {request_id!r} ends {arrival - finish:g}s before it starts")
    return [
        RequestArrival(request_id, arrival, prompt, output, max_tokens),
        RequestFinish(request_id, finish, output, reason="unknown"),  # spans do not carry the finish reason
    ]


class OtlpSpanReceiver(UnaryServer):
    """Serves OTLP/gRPC `TraceService/Export` on loopback by default; hands converted events to `sink`."""

    def __init__(
        self,
        sink: BatchSink,
        *,
        address: str = "127.0.0.1:0",
        max_message_bytes: int = 16 * 1024 * 1024,
        source: str = "otlp",
        token: str | None = None,
        max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    ) -> None:
        self._sink = sink
        self._source = source
        self._sequence = 0
        self._lock = threading.Lock()
        self.stats = OtlpStats()
        super().__init__(
            SERVICE,
            "Export",
            self._export,
            ExportTraceServiceResponse.SerializeToString,
            address=address,
            max_receive_bytes=max_message_bytes,
            max_workers=2,
            thread_name_prefix="shadow-otlp",
            max_concurrent_rpcs=max_concurrent_rpcs,
            token=token,
            on_unauthenticated=self._count_unauthenticated,
        )

    def _count_unauthenticated(self) -> None:
        with self._lock:
            self.stats.refused_unauthenticated += 1

    def _export(self, data: bytes, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        # The token was checked before the message was read (grpc_server's gate).
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(data)
        except DecodeError as exc:
            with self._lock:
                self.stats.refused_malformed += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not an ExportTraceServiceRequest: {exc}")
        events: list[Event] = []
        ignored = incomplete = 0
        try:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        if span.name != SPAN_NAME:
                            ignored += 1
                            continue
                        converted = span_events(span)
                        if converted is None:
                            incomplete += 1
                        else:
                            events.extend(converted)
            batch = EventBatch(events, self._source)
            validate_batch(batch)  # the whole export, before any of it reaches the shadow
        except InvalidBatch as exc:
            with self._lock:
                self.stats.refused_invalid += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._lock:
            self.stats.exports += 1
            self.stats.ignored_spans += ignored
            self.stats.incomplete_spans += incomplete
            if events:
                try:
                    batch.sequence = self._sequence
                    self._sink(batch)
                except Exception as exc:  # the shadow's sink failing is this export's INTERNAL error
                    self.stats.sink_failures += 1
                    logger.exception("OTLP sink failed")
                    context.abort(grpc.StatusCode.INTERNAL, f"sink failed: {exc}")
                self._sequence += 1
                self.stats.requests += len(events) // 2
        return ExportTraceServiceResponse()
