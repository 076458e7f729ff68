"""`shadow replay TRACE`: replay a trace under several schedulers and compare them."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.traces import Trace, read_trace, resolve_trace
from vllm_shadow.costmodel.architecture import load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.costmodel.profile import load_profile
from vllm_shadow.costmodel.roofline import roofline_prior
from vllm_shadow.solver.policies import parse_policy, split_policies
from vllm_shadow.solver.records import SimResult
from vllm_shadow.solver.simulator import simulate

DEFAULT_POLICIES = "vllm,vllm-v0,sarathi,orca,lightllm,no-eviction,sjf"


@dataclass(frozen=True, slots=True)
class Setup:
    """Everything a replay needs besides the requests and the policy: the engine being modelled."""

    model: str
    gpu: str
    tp: int
    block_size: int
    num_kv_blocks: int
    cost: LinearCostModel
    cost_source: str


def add_trace_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "trace",
        help="a trace file (Azure, Mooncake, BurstGPT or Vidur format, detected from "
        "its header) or a bundled name: azure-conv, azure-code, mooncake-conv",
    )
    group = parser.add_argument_group("trace window")
    group.add_argument("--start", type=float, help="start of the time slice, seconds from the trace start")
    group.add_argument(
        "--end", type=float, help="end of the time slice (exclusive), seconds from the trace start"
    )
    group.add_argument("--limit", type=int, help="keep the first N requests (after slicing)")
    group.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="multiply the arrival rate (2 = arrivals twice as dense); default 1",
    )
    group.add_argument(
        "--max-prompt-tokens", type=int, help="cap prompt lengths (capped requests are counted)"
    )
    group.add_argument(
        "--max-output-tokens", type=int, help="cap output lengths (capped requests are counted)"
    )


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine being modelled")
    group.add_argument(
        "--model",
        default="llama-2-7b",
        help="a bundled model name or a path to a Hugging Face config.json (default llama-2-7b)",
    )
    group.add_argument(
        "--gpu", default="a100", help="hardware: a100, h100, h200, l40s, a10g, cpu (default a100)"
    )
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    group.add_argument("--block-size", type=int, default=16, help="KV block size in tokens (default 16)")
    group.add_argument(
        "--kv-blocks",
        type=int,
        help="KV blocks as vLLM counts them (num_gpu_blocks); default: computed from memory",
    )
    group.add_argument(
        "--memory-fraction",
        type=float,
        default=0.9,
        help="gpu_memory_utilization used to compute the KV blocks (default 0.9)",
    )
    group.add_argument("--cost-profile", help="a profile file from `shadow profile`; default: roofline prior")


def load_window(args: argparse.Namespace) -> Trace:
    return read_trace(
        resolve_trace(args.trace),
        start=args.start,
        end=args.end,
        limit=args.limit,
        rate_scale=args.rate_scale,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
    )


def engine_setup(args: argparse.Namespace) -> Setup:
    arch = load_model(args.model)
    hw = get_hardware(args.gpu)
    if args.cost_profile:
        profile = load_profile(args.cost_profile)
        cost, source = profile.cost, f"profile {args.cost_profile} ({profile.model} on {profile.hardware})"
    else:
        cost, source = (
            roofline_prior(arch, hw, args.tp),
            f"roofline prior ({arch.name} on {hw.name}, TP {args.tp})",
        )
    blocks = args.kv_blocks or kv_capacity_blocks(
        arch, hw, tp=args.tp, block_size=args.block_size, memory_fraction=args.memory_fraction
    )
    return Setup(arch.name, hw.name, args.tp, args.block_size, blocks, cost, source)


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
    if args.json:
        print(json.dumps([_json_safe(r) for r in rows], indent=2))
    else:
        console = Console()
        if not console.is_terminal:
            console.width = 150  # a piped table keeps its columns rather than wrapping them to 80
        print_table(rows, trace, setup, console)
    return 0
