"""`shadow status`: what a running shadow sees now, read from its actor through Ray."""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.live import Live

from vllm_shadow.cli.options import add_actor_options
from vllm_shadow.readout.console import status_view
from vllm_shadow.readout.snapshot import to_json
from vllm_shadow.runtime.actor import find_shadow_actor
from vllm_shadow.runtime.service import address_path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show what a running shadow sees: engines, fidelity, the last window, the recommendation",
        description="Connect to the Ray cluster of a running `shadow serve` (or `shadow demo`) and print its "
        "current state.",
    )
    add_actor_options(
        parser.add_argument_group("the shadow to ask"),
        ray_address_help="the cluster to join (default: the one `shadow serve` recorded, else auto)",
    )
    parser.add_argument("--json", action="store_true", help="print the full snapshot as JSON")
    parser.add_argument("--watch", action="store_true", help="refresh every second until interrupted")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ray

    address = args.ray_address
    recorded = address_path(args.namespace, args.name)
    if address is None:
        address = recorded.read_text().strip() if recorded.exists() else "auto"
    try:
        ray.init(address=address, namespace=args.namespace, log_to_driver=False)
    except ConnectionError as exc:
        raise ValueError(f"no Ray cluster at {address!r}: is `shadow serve` running? ({exc})") from None
    try:
        try:
            handle = find_shadow_actor(args.name, args.namespace)
        except ValueError:
            raise ValueError(
                f"no shadow actor {args.name!r} in namespace {args.namespace!r}: start one with `shadow serve`"
            ) from None
        snapshot = ray.get(handle.snapshot.remote(), timeout=30)
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
                live.update(status_view(ray.get(handle.snapshot.remote(), timeout=30)))
    finally:
        ray.shutdown()
