"""One unary gRPC method served on raw bytes: what the gRPC ingest server and the OTLP receiver share.

The handler receives the request undecoded, so that a malformed message gets the handler's own status and is
counted by it rather than refused by gRPC unseen. The server binds loopback by default and starts on `start()`.

What a caller can make the server hold is bounded before anything of the caller is trusted: at most
`max_concurrent_rpcs` calls at once (gRPC answers the rest RESOURCE_EXHAUSTED before reading them), messages up to
`max_receive_bytes`, and with a token the call's metadata is checked before its message is read: a call without
the token is answered UNAUTHENTICATED while its message still sits in HTTP/2 flow control, so unauthenticated
callers cannot make the server buffer their messages (each call's HTTP/2 window is fixed, see below).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any, Self

import grpc

TOKEN_METADATA_KEY = "x-shadow-token"
_STREAM_WINDOW_BYTES = 1 << 20


def token_matches(metadata: Sequence[tuple[str, str | bytes]] | None, token: bytes) -> bool:
    """Whether the call's metadata carries `token` under `x-shadow-token` (compared in constant time)."""
    sent = dict(metadata or ()).get(TOKEN_METADATA_KEY, "")
    return hmac.compare_digest(sent.encode() if isinstance(sent, str) else sent, token)


class _TokenGate(grpc.GenericRpcHandler):
    """Routes the one method; with a token, a call without it gets a handler that refuses it unread."""

    def __init__(
        self,
        path: str,
        rpc: grpc.RpcMethodHandler,
        token: bytes | None,
        on_unauthenticated: Callable[[], None],
    ) -> None:
        self._path = path
        self._rpc = rpc
        self._token = token
        self._on_unauthenticated = on_unauthenticated
        # A stream handler: gRPC reads a unary call's message before calling its handler, but a stream's
        # messages only as the handler iterates them, and this one never does. The wire does not tell the two
        # apart, so a unary caller gets its status as usual.
        self._refuse = grpc.stream_unary_rpc_method_handler(self._refuse_unread)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method != self._path:
            return None
        if self._token is None or token_matches(handler_call_details.invocation_metadata, self._token):
            return self._rpc
        return self._refuse

    def _refuse_unread(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> None:
        self._on_unauthenticated()
        context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong {TOKEN_METADATA_KEY} metadata")


class UnaryServer:
    """Serves `/{service}/{method}` with `handler(request_bytes, context)`; `address` is where it is bound."""

    def __init__(
        self,
        service: str,
        method: str,
        handler: Callable[[bytes, grpc.ServicerContext], Any],
        response_serializer: Callable[[Any], bytes],
        *,
        address: str,
        max_receive_bytes: int,
        max_workers: int,
        thread_name_prefix: str,
        max_concurrent_rpcs: int | None = None,
        token: str | None = None,
        on_unauthenticated: Callable[[], None] = lambda: None,
    ) -> None:
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_name_prefix),
            options=[
                ("grpc.max_receive_message_length", max_receive_bytes),
                # What a call's message may put in the server's buffers before anything reads it: one fixed
                # HTTP/2 window. gRPC's bandwidth probing would grow the windows (to tens of MiB), so that
                # calls refused unread, or waiting for a worker, still filled memory; on loopback a fixed 1 MiB
                # window costs no measurable throughput.
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", _STREAM_WINDOW_BYTES),
            ],
            maximum_concurrent_rpcs=max_concurrent_rpcs,
        )
        rpc = grpc.unary_unary_rpc_method_handler(
            handler, request_deserializer=None, response_serializer=response_serializer
        )
        gate = _TokenGate(f"/{service}/{method}", rpc, token.encode() if token else None, on_unauthenticated)
        self._server.add_generic_rpc_handlers((gate,))
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {service} to {address}")
        self.address = f"{address.rsplit(':', 1)[0]}:{self.port}"

    def start(self) -> Self:
        self._server.start()
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        self._server.stop(grace).wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
