"""Issue 13, item 3: unauthenticated callers cannot make the gRPC ingest buffer their messages.

The server runs in its own process so that its memory is measured alone: its peak resident set (VmHWM) while
many concurrent unauthenticated calls, each carrying a message just under the receive limit, are refused.
Before the token was checked on the call's metadata, the server read every message whole first: 128 such calls
took it from 498 MiB to 1,983 MiB.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from vllm_shadow.adapters.grpc_ingest import DEFAULT_MAX_MESSAGE_BYTES, PUBLISH_METHOD, TOKEN_METADATA_KEY

SERVER = """
import sys
from vllm_shadow.adapters.grpc_ingest import IngestServer
server = IngestServer(lambda batch: None, token="s3cret").start()
print(server.address, flush=True)
sys.stdin.read()  # serve until the test closes our stdin
server.stop(0)
"""
CALLS = 32
MESSAGE = b"\x00" * (2 * DEFAULT_MAX_MESSAGE_BYTES - 1024 * 1024)  # 31 MiB: below gRPC's own receive limit
MIB = 1024 * 1024


def _memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _call(address: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as channel:
        call = channel.unary_unary(PUBLISH_METHOD, request_serializer=None, response_deserializer=None)
        try:
            call(MESSAGE, timeout=60, metadata=((TOKEN_METADATA_KEY, "guess"),))
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_concurrent_oversized_unauthenticated_calls_leave_the_server_memory_bounded() -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdin is not None
        address = server.stdout.readline().strip()
        assert address, "the server did not start"
        _call(address)  # one call first, so that gRPC's own lazily allocated state is in the baseline
        baseline = _memory_kib(server.pid, "VmRSS")
        with ThreadPoolExecutor(CALLS) as pool:
            codes = list(pool.map(_call, [address] * CALLS))
        peak = _memory_kib(server.pid, "VmHWM")
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(30)
    # Refused: for the token, or for the bound on concurrent calls; never taken.
    assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert grpc.StatusCode.UNAUTHENTICATED in codes
    # Read whole, the messages would take CALLS x 31 MiB (about 1 GiB; 413 MiB measured before the fix, in
    # gRPC's growing flow-control windows). Refused on their metadata with fixed 1 MiB windows, about 5 MiB
    # stays: the bound is generous, and still below two of the messages.
    grew_mib = (peak - baseline) * 1024 / MIB
    assert grew_mib < 2 * len(MESSAGE) / MIB, f"server peak RSS grew by {grew_mib:.0f} MiB"
