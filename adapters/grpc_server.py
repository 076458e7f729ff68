"""One unary gRPC method served on raw bytes: what the gRPC ingest server and the OTLP receiver share.

The handler receives the request undecoded, so that a malformed message gets the handler's own status and is
counted by it rather than refused by gRPC unseen. The server binds loopback by default and starts on `start()`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from typing import Any, Self

import grpc


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
    ) -> None:
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_name_prefix),
            options=[("grpc.max_receive_message_length", max_receive_bytes)],
        )
        rpc = grpc.unary_unary_rpc_method_handler(
            handler, request_deserializer=None, response_serializer=response_serializer
        )
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: rpc}),))
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
