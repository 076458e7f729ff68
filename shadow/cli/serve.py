"""`shadow serve`: the production service. A named Ray actor with gRPC ingest and a /metrics endpoint.

Engines reach it through the mirror hook's environment (SHADOW_ADDRESS=host:port for gRPC, or
SHADOW_RAY_ACTOR=name with SHADOW_RAY_NAMESPACE for engines inside the same Ray cluster). Endpoints bind to
loopback unless `--host` says otherwise; ports are fixed so that a restarted actor is found where it was. So does
the local Ray cluster this command starts: Ray binds every interface of a node whose address is not loopback,
and its own `_node_ip_address` turns loopback into the machine's address unless Ray runs in single-machine mode.
A cluster joined with `--ray-address` binds what its own `ray start --node-ip-address` said.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live

from vllm_shadow.adapters.events import EngineInfo
from vllm_shadow.adapters.recorder import event_from_json
from vllm_shadow.cli.options import add_actor_options, add_shadow_options, shadow_config
from vllm_shadow.readout.console import status_view
from vllm_shadow.runtime.service import ServiceConfig, default_state_path
from vllm_shadow.runtime.status_endpoint import address_path

# Ray is imported when the command runs (so that `shadow status`, which shares the parser, never loads it),
# but its absence is known now: the command is then listed as not installed, with the extra that brings Ray.
if importlib.util.find_spec("ray") is None:
    raise ModuleNotFoundError("No module named 'ray'", name="ray")

DEFAULT_GRPC_PORT = 50151
DEFAULT_METRICS_PORT = 9400
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ALL_INTERFACES = ("0.0.0.0", "::", "")
# Ray's switch for single-machine mode: its node address stays loopback (read when Ray is imported, and at
# every look-up of the node address through ray._private.ray_constants).
RAY_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the shadow: a Ray actor with gRPC ingest and a Prometheus endpoint",
        description="Run the shadow as a named Ray actor: it ingests the mirror streams of vLLM engines, "
        "evaluates every window under the candidate configurations and the optimum as Ray tasks, and exports "
        "the gaps and its recommendation on /metrics.",
    )
    ray_group = parser.add_argument_group("Ray")
    add_actor_options(
        ray_group,
        ray_address_help="join an existing cluster ('auto' or host:port); default: start a local one",
    )
    ray_group.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all)")
    ray_group.add_argument(
        "--detached",
        action="store_true",
        help="leave the actor running after this command exits (needs --ray-address)",
    )
    ray_group.add_argument(
        "--ray-metrics", action="store_true", help="also export through Ray's metrics agent"
    )
    net = parser.add_argument_group("endpoints")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    net.add_argument(
        "--grpc-port",
        type=int,
        default=DEFAULT_GRPC_PORT,
        help=f"gRPC ingest port (default {DEFAULT_GRPC_PORT})",
    )
    net.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"/metrics port (default {DEFAULT_METRICS_PORT})",
    )
    net.add_argument("--otlp-port", type=int, help="also receive vLLM's OTLP spans on this port")
    net.add_argument(
        "--otlp-engine-info",
        help="JSON file with the EngineInfo of the engine whose spans arrive (spans do not carry its settings)",
    )
    net.add_argument(
        "--token-env", default="SHADOW_TOKEN", help="environment variable with the gRPC shared secret"
    )
    net.add_argument("--state-file", help="where engine announcements survive a restart (default: temp dir)")
    add_shadow_options(parser)
    parser.add_argument("--watch", action="store_true", help="show a live status view")
    parser.set_defaults(func=run)


def _engine_info(path: str | None) -> EngineInfo | None:
    if path is None:
        return None
    info = event_from_json(json.loads(Path(path).read_text()) | {"type": "info"})
    assert isinstance(info, EngineInfo)
    return info


def service_config(args: argparse.Namespace) -> ServiceConfig:
    config = shadow_config(args)
    assumed = _engine_info(args.otlp_engine_info)
    if assumed is not None:
        config = dataclasses.replace(config, assumed_engine=assumed)
    return ServiceConfig(
        shadow=config,
        grpc_address=f"{args.host}:{args.grpc_port}",
        grpc_token=os.environ.get(args.token_env) or None,
        otlp_address=f"{args.host}:{args.otlp_port}" if args.otlp_port is not None else None,
        metrics_host=args.host,
        metrics_port=args.metrics_port,
        state_path=args.state_file or default_state_path(args.name),
        ray_metrics=args.ray_metrics,
        address_path=str(address_path(args.namespace, args.name)),
    )


def token_warning(config: ServiceConfig, args: argparse.Namespace) -> str | None:
    """What to tell the operator when ingest takes any sender: no token in the environment."""
    if config.grpc_token is not None:
        return None
    endpoints = "gRPC" + (" and OTLP" if config.otlp_address is not None else "")
    return (
        f"warning: ${args.token_env} is unset: {endpoints} ingest on {args.host} takes batches from anyone "
        f"who can reach it; set {args.token_env} here and in the engines' environment"
    )


def ray_init_options(args: argparse.Namespace) -> dict[str, object]:
    """`ray.init`'s arguments: a local cluster binds `--host` (loopback by default), not every interface."""
    options: dict[str, object] = dict(
        address=args.ray_address,
        namespace=args.namespace,
        include_dashboard=False,
        log_to_driver=False,
    )
    if args.ray_address:
        return options  # an existing cluster: its nodes bind what they were started with
    options["num_cpus"] = args.num_cpus
    if args.host in LOOPBACK_HOSTS:
        ray_single_machine_mode()
        options["_node_ip_address"] = options["dashboard_host"] = "127.0.0.1"
    elif args.host not in ALL_INTERFACES:
        options["_node_ip_address"] = options["dashboard_host"] = args.host
    else:
        options["dashboard_host"] = args.host
    return options


def ray_single_machine_mode() -> None:
    """Keep Ray's node address on loopback, so that its processes (GCS, raylet, agents, workers) bind loopback:
    through the environment for the processes Ray starts, and in Ray's constants for this one, which may have
    imported Ray already."""
    import ray._private.ray_constants as ray_constants

    os.environ[RAY_SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def run(args: argparse.Namespace) -> int:
    import ray

    if args.detached and not args.ray_address:
        raise ValueError("--detached needs --ray-address: a local cluster ends with this command")
    from vllm_shadow.runtime.actor import start_shadow_actor

    config = service_config(args)
    console = Console(stderr=True)
    warning = token_warning(config, args)
    if warning is not None:
        console.print(f"[bold yellow]{warning}[/]")
    ray.init(**ray_init_options(args))
    # The actor publishes its address file itself (and again when Ray restarts it), for `shadow status`.
    handle = start_shadow_actor(config, name=args.name, namespace=args.namespace, detached=args.detached)
    snapshot = ray.get(handle.snapshot.remote())
    for what, where in sorted(snapshot.addresses.items()):
        console.print(f"[bold]{what}[/] {where}")
    console.print(
        f"engines: SHADOW_ADDRESS={snapshot.addresses.get('grpc')} (gRPC) or "
        f"SHADOW_RAY_ACTOR={args.name} SHADOW_RAY_NAMESPACE={args.namespace}, with "
        "--scheduler-cls vllm_shadow.MirrorScheduler"
    )
    if args.detached:
        return 0
    try:
        if args.watch:
            with Live(status_view(snapshot), console=console, refresh_per_second=2) as live:
                while True:
                    time.sleep(1.0)
                    live.update(status_view(ray.get(handle.snapshot.remote())))
        else:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        try:
            ray.get(handle.close.remote(), timeout=10)
        finally:
            ray.shutdown()
    return 0
