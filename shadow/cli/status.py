"""`shadow status`: what a running shadow sees now, read from the status endpoint it publishes.

The shadow (`shadow serve`, `shadow demo`) leaves an address record in the user's private directory: its
process id and the loopback URL of its status endpoint. Reading it takes no Ray: no cluster to join, no Ray
token to hold, no retries against a dead cluster. Every outcome is an answer within `--timeout`: the snapshot,
or why there is none (no shadow, a stale record left by a killed one, a shadow that does not answer).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.live import Live

from vllm_shadow.readout.console import status_view
from vllm_shadow.readout.snapshot import ShadowSnapshot, to_json
from vllm_shadow.readout.snapshot_json import SnapshotFormatError, snapshot_from_json
from vllm_shadow.runtime.status_endpoint import DEFAULT_NAME, DEFAULT_NAMESPACE, AddressRecord, address_path
from vllm_shadow.runtime.user_files import read_own_file

DEFAULT_TIMEOUT = 1.5  # seconds: the answer, whatever it is, comes within about this


class ShadowUnavailable(ValueError):
    """No snapshot: the message says why, in the user's terms."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show what a running shadow sees: engines, fidelity, the last window, the recommendation",
        description="Ask a running `shadow serve` (or `shadow demo`) of this user for its current state, "
        "through the status endpoint it publishes on loopback.",
    )
    which = parser.add_argument_group("the shadow to ask")
    which.add_argument("--name", default=DEFAULT_NAME, help=f"actor name (default {DEFAULT_NAME})")
    which.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help=f"its Ray namespace (default {DEFAULT_NAMESPACE})"
    )
    which.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for its answer (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the full snapshot as JSON")
    parser.add_argument("--watch", action="store_true", help="refresh every second until interrupted")
    parser.set_defaults(func=run)


def read_record(path: Path) -> AddressRecord:
    """The address record at `path`, checked: the user's own file, and its process alive."""
    try:
        text = read_own_file(path)
    except FileNotFoundError:
        raise ShadowUnavailable(
            f"no shadow is running for you under that name: no address file at {path} "
            "(start one with `shadow serve`)"
        ) from None
    try:
        record = AddressRecord.from_text(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise ShadowUnavailable(f"unreadable address file {path} ({exc}): remove it") from None
    if not _alive(record.pid):
        raise ShadowUnavailable(
            f"the shadow is not running: its process {record.pid} is gone, and the address file {path} "
            "is stale (left by a process that was killed): remove it, or start `shadow serve` again"
        )
    return record


def fetch(record: AddressRecord, timeout: float) -> ShadowSnapshot:
    """The snapshot the shadow serves, within `timeout` seconds, or why not."""
    try:
        with urllib.request.urlopen(record.status_url, timeout=timeout) as response:
            reply = json.loads(response.read())
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            raise ShadowUnavailable(
                f"the shadow's process {record.pid} is alive but nothing listens on {record.status_url}: "
                "the address file is stale (the process id was reused, or the shadow is shutting down)"
            ) from None
        if isinstance(reason, TimeoutError):
            raise _no_answer(record, timeout) from None
        raise ShadowUnavailable(f"cannot reach the shadow at {record.status_url}: {reason}") from None
    except TimeoutError:
        raise _no_answer(record, timeout) from None
    except (OSError, ValueError) as exc:
        raise ShadowUnavailable(f"bad answer from {record.status_url}: {exc}") from None
    if not isinstance(reply, dict) or reply.get("pid") != record.pid:
        raise ShadowUnavailable(
            f"the process answering on {record.status_url} is not the shadow the address file names "
            f"(pid {record.pid}): the file is stale"
        )
    try:
        return snapshot_from_json(reply["snapshot"])
    except (SnapshotFormatError, KeyError, TypeError, ValueError) as exc:
        raise ShadowUnavailable(f"the shadow's snapshot could not be read: {exc}") from None


def _no_answer(record: AddressRecord, timeout: float) -> ShadowUnavailable:
    return ShadowUnavailable(
        f"the shadow (process {record.pid}) did not answer on {record.status_url} within {timeout:g}s: "
        "it is alive but stuck or overloaded"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: the existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, and the status endpoint will tell whose
    return pid > 0


def run(args: argparse.Namespace) -> int:
    record = read_record(address_path(args.namespace, args.name))
    snapshot = fetch(record, args.timeout)
    if args.json:
        print(json.dumps(to_json(snapshot), indent=2))
        return 0
    console = Console()
    if not args.watch:
        console.print(status_view(snapshot))
        return 0
    with Live(status_view(snapshot), console=console, refresh_per_second=2) as live:
        while True:
            time.sleep(1.0)
            live.update(
                status_view(fetch(read_record(address_path(args.namespace, args.name)), args.timeout))
            )
