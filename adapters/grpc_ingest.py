"""gRPC transport for event batches: the engine-side client sink and the shadow-side ingest server.

One unary `Publish(EventBatch) -> Ack` call per batch (service `shadow.v1.EventIngest`, see the .proto), so
each batch is accepted or refused on its own. The server binds loopback by default, limits message size,
optionally requires a shared-secret token in the `x-shadow-token` metadata, and answers every refusal with a
gRPC status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAUTHENTICATED, INTERNAL for a failing sink) that it also
counts. Decoded batches go to one sink callable, called from one thread at a time.
"""

from __future__ import annotations

import hmac
import logging
import threading
from dataclasses import dataclass, field
from typing import NoReturn

import grpc

from vllm_shadow.adapters.grpc_server import UnaryServer
from vllm_shadow.adapters.proto import shadow_events_pb2 as pb
from vllm_shadow.adapters.publisher import BatchSink, EventBatch
from vllm_shadow.adapters.wire import WireError, decode_batch, encode_batch

logger = logging.getLogger(__name__)

SERVICE = "shadow.v1.EventIngest"
PUBLISH_METHOD = f"/{SERVICE}/Publish"
TOKEN_METADATA_KEY = "x-shadow-token"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# gRPC itself refuses a message above its receive limit before our handler sees it, so nothing could count it.
# Its limit is therefore set above ours by this margin: messages between the two are refused and counted here;
# only a message beyond both is refused uncounted (still RESOURCE_EXHAUSTED, and memory stays bounded).
_TRANSPORT_HEADROOM = 2


@dataclass(slots=True)
class IngestStats:
    batches: int = 0
    events: int = 0
    refused_malformed: int = 0
    refused_oversized: int = 0
    refused_unauthenticated: int = 0
    sink_failures: int = 0
    dropped_by_source: dict[str, int] = field(default_factory=dict)  # the senders' own drop counters, latest
    # Batches a sender sent that never arrived (sequence gaps), e.g. while this server was down: a sender
    # cannot report those itself, since they were lost on the way here.
    lost_batches_by_source: dict[str, int] = field(default_factory=dict)


class IngestServer(UnaryServer):
    """Receives event batches over gRPC and hands them to `sink`. Refusals never stop the server."""

    def __init__(
        self,
        sink: BatchSink,
        *,
        address: str = "127.0.0.1:0",
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_workers: int = 4,
    ) -> None:
        self._sink = sink
        self._token = token.encode() if token else None
        self._max_message_bytes = max_message_bytes
        self.stats = IngestStats()
        self._last_sequence: dict[str, int] = {}  # per source, the highest batch sequence received
        self._stats_lock = threading.Lock()
        self._sink_lock = threading.Lock()
        super().__init__(
            SERVICE,
            "Publish",
            self._publish,
            pb.Ack.SerializeToString,
            address=address,
            max_receive_bytes=max_message_bytes * _TRANSPORT_HEADROOM,
            max_workers=max_workers,
            thread_name_prefix="shadow-ingest",
        )

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def _refuse(
        self, context: grpc.ServicerContext, counter: str, code: grpc.StatusCode, detail: str
    ) -> NoReturn:
        self._count(counter)
        context.abort(code, detail)  # raises, ending the call with this status
        raise AssertionError("unreachable: grpc's abort raises")

    def _publish(self, request: bytes, context: grpc.ServicerContext) -> pb.Ack:
        if self._token is not None:
            sent = dict(context.invocation_metadata()).get(TOKEN_METADATA_KEY, "")
            sent = sent.encode() if isinstance(sent, str) else sent
            if not hmac.compare_digest(sent, self._token):
                self._refuse(
                    context,
                    "refused_unauthenticated",
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"missing or wrong {TOKEN_METADATA_KEY} metadata",
                )
        if len(request) > self._max_message_bytes:
            self._refuse(
                context,
                "refused_oversized",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"batch of {len(request)} bytes exceeds the limit of {self._max_message_bytes}",
            )
        try:
            batch = decode_batch(request)
        except WireError as exc:
            self._refuse(context, "refused_malformed", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            with self._sink_lock:
                self._sink(batch)
        except Exception as exc:  # the sink is the shadow's code; its failure is the sender's INTERNAL error
            logger.exception("ingest sink failed")
            self._refuse(context, "sink_failures", grpc.StatusCode.INTERNAL, f"sink failed: {exc}")
        with self._stats_lock:
            stats = self.stats
            stats.batches += 1
            stats.events += len(batch.events)
            stats.dropped_by_source[batch.source] = batch.dropped
            last = self._last_sequence.get(batch.source, -1)
            if batch.sequence > last + 1:  # equal sequences are the parts of one split batch
                lost = stats.lost_batches_by_source.get(batch.source, 0)
                stats.lost_batches_by_source[batch.source] = lost + batch.sequence - last - 1
            self._last_sequence[batch.source] = max(last, batch.sequence)
        return pb.Ack(accepted=len(batch.events))


class GrpcSink:
    """Engine side: sends each batch with one `Publish` call. Raises on failure (the publisher backs off)."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        timeout: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.address = address
        self._metadata = ((TOKEN_METADATA_KEY, token),) if token else ()
        self._timeout = timeout
        self._max_message_bytes = max_message_bytes
        self._channel: grpc.Channel | None = None
        self._call: grpc.UnaryUnaryMultiCallable | None = None

    def __repr__(self) -> str:
        return f"GrpcSink({self.address!r})"

    def __call__(self, batch: EventBatch) -> None:
        if self._call is None:
            # Opened on first use, in the publisher's thread: no gRPC state exists before the engine forks.
            self._channel = grpc.insecure_channel(self.address)
            self._call = self._channel.unary_unary(
                PUBLISH_METHOD, request_serializer=None, response_deserializer=pb.Ack.FromString
            )
        self._send(batch)

    def _send(self, batch: EventBatch) -> None:
        data = encode_batch(batch)
        if len(data) > self._max_message_bytes and len(batch.events) > 1:
            # Split rather than be refused: both halves keep the batch's sequence number.
            half = len(batch.events) // 2
            for events in (batch.events[:half], batch.events[half:]):
                self._send(EventBatch(events, batch.source, batch.sequence, batch.dropped))
            return
        assert self._call is not None
        self._call(data, timeout=self._timeout, metadata=self._metadata)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
