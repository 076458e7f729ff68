"""gRPC transport for event batches: the engine-side client sink and the shadow-side ingest server.

One unary `Publish(EventBatch) -> Ack` call per batch (service `shadow.v1.EventIngest`, see the .proto), so
each batch is accepted or refused on its own. The server binds loopback by default, limits message size and
concurrent calls, optionally requires a shared-secret token in the `x-shadow-token` metadata (checked before the
message is read, see `grpc_server`), and answers every refusal with a gRPC status that it also counts:
INVALID_ARGUMENT for bytes that are not a batch or a batch with an impossible number (refused whole, see
`adapters.validation`), RESOURCE_EXHAUSTED, UNAUTHENTICATED, INTERNAL for a failing sink. Decoded batches go to
one sink callable, called from one thread at a time; the `Ack` counts the events the sink took, which excludes
any it dropped (a late or duplicate batch).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import grpc

from vllm_shadow.adapters.events import Event
from vllm_shadow.adapters.grpc_server import TOKEN_METADATA_KEY, UnaryServer
from vllm_shadow.adapters.proto import shadow_events_pb2 as pb
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.validation import MAX_PARTS, InvalidBatch
from vllm_shadow.adapters.wire import WireError, decode_batch, encode_batch

logger = logging.getLogger(__name__)

SERVICE = "shadow.v1.EventIngest"
PUBLISH_METHOD = f"/{SERVICE}/Publish"
__all__ = ["TOKEN_METADATA_KEY", "GrpcSink", "IngestServer", "IngestStats"]
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Calls held at once, waiting or served: with the receive limit below, what senders can make the server buffer
# (an unauthenticated call is refused on its metadata, before its body is read). Each sender has one call in
# flight, but gRPC still counts a finished call for a moment after its sender has made the next one: at 16,
# sixteen engines (the shadow's default engine bound) were refused RESOURCE_EXHAUSTED now and then
# (benchmarks/ingest_load.py). Four times the engine bound leaves that lag room.
DEFAULT_MAX_CONCURRENT_RPCS = 64
# gRPC itself refuses a message above its receive limit before our handler sees it, so nothing could count it.
# Its limit is therefore set above ours by this margin: messages between the two are refused and counted here;
# only a message beyond both is refused uncounted (still RESOURCE_EXHAUSTED, and memory stays bounded).
_TRANSPORT_HEADROOM = 2


@dataclass(slots=True)
class IngestStats:
    batches: int = 0
    events: int = 0
    refused_malformed: int = 0  # not an event batch
    refused_invalid: int = 0  # an event batch with an impossible number
    refused_oversized: int = 0
    refused_unauthenticated: int = 0
    sink_failures: int = 0
    # Sequence gaps, late batches and the senders' own loss counts are the sink's: the shadow's sequencer is
    # their one home, per source and bounded.


# Takes a batch and says how many of its events it took (None: all of them).
IngestSink = Callable[[EventBatch], int | None]


class IngestServer(UnaryServer):
    """Receives event batches over gRPC and hands them to `sink`. Refusals never stop the server."""

    def __init__(
        self,
        sink: IngestSink,
        *,
        address: str = "127.0.0.1:0",
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_workers: int = 4,
        max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    ) -> None:
        self._sink = sink
        self._max_message_bytes = max_message_bytes
        self.stats = IngestStats()
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
            max_concurrent_rpcs=max_concurrent_rpcs,
            token=token,
            on_unauthenticated=lambda: self._count("refused_unauthenticated"),
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
        # The token was checked before the message was read (grpc_server's gate).
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
            counter = "refused_invalid" if isinstance(exc, InvalidBatch) else "refused_malformed"
            self._refuse(context, counter, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            with self._sink_lock:
                taken = self._sink(batch)
        except Exception as exc:  # the sink is the shadow's code; its failure is the sender's INTERNAL error
            logger.exception("ingest sink failed")
            self._refuse(context, "sink_failures", grpc.StatusCode.INTERNAL, f"sink failed: {exc}")
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.events += len(batch.events)
        return pb.Ack(accepted=len(batch.events) if taken is None else taken)


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
        if len(data) <= self._max_message_bytes or len(batch.events) < 2:
            parts = [batch.events]
        else:
            # Split rather than be refused. Each part keeps the batch's sequence number and says which part of
            # how many it is; sized with the largest part numbers, so that numbering them cannot overflow.
            sizing = dataclasses.replace(batch, part=MAX_PARTS - 1, parts=MAX_PARTS)
            parts = self._split(batch.events, sizing)
        assert self._call is not None
        for i, events in enumerate(parts):
            if len(parts) > 1:
                data = encode_batch(dataclasses.replace(batch, events=events, part=i, parts=len(parts)))
            self._call(data, timeout=self._timeout, metadata=self._metadata)

    def _split(self, events: list[Event], sizing: EventBatch) -> list[list[Event]]:
        """`events` in halves, and halves of halves, until each fits a message (or is one event)."""
        if (
            len(events) < 2
            or len(encode_batch(dataclasses.replace(sizing, events=events))) <= self._max_message_bytes
        ):
            return [events]
        half = len(events) // 2
        return self._split(events[:half], sizing) + self._split(events[half:], sizing)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
