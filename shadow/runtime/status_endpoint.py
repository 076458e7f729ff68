"""What a running shadow publishes for `shadow status`: its snapshot as JSON over loopback HTTP, and an address
record in the user's private directory saying where that endpoint is and which process serves it.

`shadow status` used to join the shadow's Ray cluster, which needs Ray's authentication token in the caller's
environment and, against a dead cluster, retries for minutes. Reading the address record and one HTTP request
with a short time-out answers in well under a second whether the shadow is alive or not; the process id in the
record tells a stale record (its process is gone) from a shadow that does not answer.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vllm_shadow.readout.snapshot import ShadowSnapshot, to_json
from vllm_shadow.runtime.user_files import read_own_file, user_dir, write_atomic

# A shadow's default Ray actor name and namespace; its address record is named after both.
DEFAULT_NAME = "vllm-shadow"
DEFAULT_NAMESPACE = "vllm-shadow"


def address_path(namespace: str, name: str) -> Path:
    """Where a running shadow says where `shadow status` finds it: in the user's private directory, so that
    no other user can plant one."""
    return user_dir() / f"{namespace}-{name}.address.json"


logger = logging.getLogger(__name__)

STATUS_PATH = "/status"


@dataclass(frozen=True, slots=True)
class AddressRecord:
    """Where `shadow status` finds a running shadow (the address file's content)."""

    pid: int  # the process that serves the shadow (the Ray actor's worker, or the service's own process)
    status_url: str  # GET: {"pid": ..., "snapshot": ...}
    addresses: dict[str, str]  # the service's other endpoints (gRPC, OTLP, /metrics), for the reader
    written_at: float

    def to_text(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_text(cls, text: str) -> AddressRecord:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        record = cls(
            pid=raw["pid"],
            status_url=raw["status_url"],
            addresses=dict(raw.get("addresses", {})),
            written_at=float(raw.get("written_at", 0.0)),
        )
        if not isinstance(record.pid, int) or not isinstance(record.status_url, str):
            raise ValueError("pid or status_url of the wrong type")
        return record


def publish_address(path: Path, record: AddressRecord) -> None:
    write_atomic(path, record.to_text())


def withdraw_address(path: Path) -> None:
    """Remove the address file if it is still this process's (a restarted shadow may have replaced it)."""
    try:
        if AddressRecord.from_text(read_own_file(path)).pid == os.getpid():
            path.unlink()
    except (OSError, ValueError, KeyError):
        pass


class StatusServer:
    """GET /status on loopback: {"pid": this process, "snapshot": the snapshot as `to_json` writes it}."""

    def __init__(self, snapshot: Callable[[], ShadowSnapshot], *, host: str = "127.0.0.1", port: int = 0):
        take_snapshot = snapshot

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != STATUS_PATH:
                    self.send_error(404)
                    return
                body = json.dumps({"pid": os.getpid(), "snapshot": to_json(take_snapshot())}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                logger.debug("status endpoint: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="shadow-status", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{STATUS_PATH}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
