"""`shadow replay TRACE`: replay a trace under several schedulers and compare them."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.traces import Trace
from vllm_shadow.cli.options import Setup, add_engine_options, add_trace_options, engine_setup, load_window
from vllm_shadow.solver.policies import parse_policy, split_policies
from vllm_shadow.solver.records import SimResult
from vllm_shadow.solver.simulator import simulate

DEFAULT_POLICIES = "vllm,vllm-v0,sarathi,orca,lightllm,no-eviction,sjf"


def replay_one(requests: list[RequestArrival], policy: str, setup: Setup) -> SimResult:
    return simulate(
        requests, policy, setup.cost, num_kv_blocks=setup.num_kv_blocks, block_size=setup.block_size
    )


def _replay_task(task: tuple[list[RequestArrival], str, Setup]) -> tuple[dict, float]:
    started = time.perf_counter()
    result = replay_one(*task)
    return result.summary(), time.perf_counter() - started


def replay_all(
    requests: list[RequestArrival],
    policies: list[str],
    setup: Setup,
    *,
    jobs: int = 1,
    progress: bool = False,
) -> list[dict]:
    """Simulate every policy; returns their summaries in the given order, each with its wall time."""
    tasks = [(requests, p, setup) for p in policies]
    rows: list[dict | None] = [None] * len(tasks)
    with Progress(
        TextColumn("[bold]replaying[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not progress,
        transient=True,
    ) as bar:
        task_id = bar.add_task("", total=len(tasks))
        if jobs > 1:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                for i, (summary, seconds) in enumerate(pool.map(_replay_task, tasks)):
                    rows[i] = summary | {"wall_s": seconds}
                    bar.advance(task_id)
        else:
            for i, task in enumerate(tasks):
                bar.update(task_id, description=task[1])
                summary, seconds = _replay_task(task)
                rows[i] = summary | {"wall_s": seconds}
                bar.advance(task_id)
    return [r for r in rows if r is not None]


def _fmt(value: float, scale: float = 1.0, digits: int = 2) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value * scale:.{digits}f}"
    )


def print_table(rows: list[dict], trace: Trace, setup: Setup, console: Console) -> None:
    console.print(
        f"[bold]{trace.source.name if trace.source else 'trace'}[/]: {len(trace.requests):,} requests over "
        f"{trace.span:,.0f} s  |  {setup.model} on {setup.gpu} x{setup.tp}  |  "
        f"{setup.num_kv_blocks:,} KV blocks of {setup.block_size} tokens  |  cost: {setup.cost_source}"
    )
    changed = {**trace.excluded, **trace.modified}
    if changed:
        console.print("[yellow]trace adjustments:[/] " + ", ".join(f"{k}: {v}" for k, v in changed.items()))
    base = rows[0]["gpu_seconds"] if rows else 0.0
    table = Table(header_style="bold", show_lines=False)
    for column in (
        "policy",
        "GPU s",
        "vs first",
        "makespan s",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50 ms",
        "TPOT p99 ms",
        "E2E p99",
        "preempt",
        "recomputed",
        "steps",
    ):
        table.add_column(
            column,
            justify="left" if column == "policy" else "right",
            no_wrap=True,
            min_width=min(len(column), 12),
        )
    for row in rows:
        gap = (row["gpu_seconds"] - base) / base * 100 if base else 0.0
        table.add_row(
            row["policy"],
            _fmt(row["gpu_seconds"], digits=1),
            f"{gap:+.1f}%",
            _fmt(row["makespan_s"], digits=1),
            _fmt(row["ttft_p50_s"]),
            _fmt(row["ttft_p99_s"]),
            _fmt(row["tpot_p50_s"], 1e3, 1),
            _fmt(row["tpot_p99_s"], 1e3, 1),
            _fmt(row["e2e_p99_s"], digits=1),
            f"{row['preemptions']:,}",
            f"{row['recomputed_tokens']:,}",
            f"{row['steps']:,}",
        )
    console.print(table)
    console.print(
        "[dim]GPU s: engine busy time; TTFT/E2E in seconds; 'vs first': GPU time relative to the first "
        "policy.[/]"
    )


def overload_note(rows: list[dict], trace: Trace, rate_scale: float = 1.0) -> str | None:
    """A plain warning when a policy needs more engine time than the trace spans: arrivals then exceed what
    the engine can serve, a queue builds up, and latencies measure the backlog."""
    if trace.span <= 0:
        return None
    loads = {row["policy"]: row["gpu_seconds"] / trace.span for row in rows}
    over = [policy for policy, load in loads.items() if load > 1.0]
    if not over:
        return None
    worst = max(over, key=loads.__getitem__)
    # Busy longer than the arrivals span proves the backlog. Under overload batches are as large as they get, so
    # at a lower rate each request costs at least as much: rate_scale / load is an upper bound, not a target.
    return (
        f"arrivals exceed what this engine can serve under {', '.join(over)}: {worst} needs "
        f"{loads[worst] * trace.span:,.0f} s of engine time for {trace.span:,.0f} s of arrivals "
        f"(load {loads[worst]:.2f}), so a queue builds up and TTFT measures the backlog, not the scheduler. "
        f"Keeping up needs --rate-scale under {rate_scale / loads[worst]:.2f} at the very least (smaller "
        "batches cost more per request, so go lower), or more capacity (--gpu, --tp)."
    )


def _json_safe(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="replay a trace under several schedulers and compare GPU time and latency",
        description="Replay a request trace through the cost-model simulator under each policy and print a "
        "comparison. A policy is a preset with optional settings, e.g. "
        "'vllm(max_num_seqs=64,max_num_batched_tokens=2048)'.",
    )
    add_trace_options(parser)
    add_engine_options(parser)
    parser.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help=f"comma-separated policies (default: {DEFAULT_POLICIES}); presets: vllm, vllm-v0, "
        "sarathi, orca, fastertransformer, lightllm, no-eviction, sjf, sof",
    )
    parser.add_argument("--jobs", type=int, default=1, help="simulate policies in N processes (default 1)")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per policy")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    policies = [str(parse_policy(p)) for p in split_policies(args.policies)]
    if not policies:
        raise ValueError("--policies is empty")
    trace = load_window(args)
    if not trace.requests:
        raise ValueError(f"{args.trace}: the selected window holds no requests")
    setup = engine_setup(args)
    rows = replay_all(trace.requests, policies, setup, jobs=args.jobs, progress=sys.stderr.isatty())
    note = overload_note(rows, trace, args.rate_scale)
    if args.json:
        print(json.dumps([_json_safe(r) for r in rows], indent=2))
        if note:
            print(f"shadow: note: {note}", file=sys.stderr)
    else:
        console = Console()
        if not console.is_terminal:
            console.width = 150  # a piped table keeps its columns rather than wrapping them to 80
        print_table(rows, trace, setup, console)
        if note:
            console.print(f"[bold yellow]overloaded:[/] {note}")
    return 0
