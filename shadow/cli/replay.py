"""`shadow replay TRACE`: replay a trace under several schedulers and compare them."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.traces import Trace, with_block_hashes
from vllm_shadow.cli.options import (
    PREFIX_CACHING_HELP,
    Admitted,
    Rejection,
    Setup,
    add_engine_options,
    add_trace_options,
    admit_like_vllm,
    engine_setup,
    load_window,
    prefix_caching_on,
)
from vllm_shadow.solver.policies import Policy, parse_policy, split_policies
from vllm_shadow.solver.records import SchedulerThrashes, SimResult
from vllm_shadow.solver.simulator import simulate

DEFAULT_POLICIES = "vllm,vllm-v0,sarathi,orca,lightllm,no-eviction,sjf"


def replay_one(requests: list[RequestArrival], policy: str, setup: Setup) -> SimResult:
    return simulate(
        requests, policy, setup.cost, num_kv_blocks=setup.num_kv_blocks, block_size=setup.block_size
    )


def prefix_cache_counts(result: SimResult) -> dict[str, int]:
    """vLLM's `vllm:prefix_cache_queries` and `vllm:prefix_cache_hits` over the replay, in tokens: each request
    counts once, at its first admission (vLLM records at admission, and a resumed request under separate
    preempted_* counters), its prompt as the query and what it found cached as the hits."""
    admitted = [r for r in result.requests if r.first_scheduled == r.first_scheduled]  # not NaN
    return {
        "prefix_cache_queries": sum(r.prompt_tokens for r in admitted),
        "prefix_cache_hits": sum(r.num_cached_tokens for r in admitted),
    }


def _replay_task(task: tuple[list[RequestArrival], str, Setup]) -> tuple[dict, float]:
    """A policy's summary with its prefix-cache counts (when it caches) and `simulate_seconds`, the wall time
    of the simulator's loop alone (no trace parsing, no summary), comparable with another simulator's loop."""
    started = time.perf_counter()
    try:
        result = replay_one(*task)
    except SchedulerThrashes as exc:  # that policy never finishes this trace: said in its row, not a crash
        return {"policy": task[1], "error": str(exc)}, time.perf_counter() - started
    simulated = time.perf_counter()
    summary = result.summary() | {"simulate_seconds": simulated - started}
    caching = parse_policy(task[1]).enable_prefix_caching
    counts = prefix_cache_counts(result) if caching else {"prefix_cache_queries": 0, "prefix_cache_hits": 0}
    queries, hits = counts["prefix_cache_queries"], counts["prefix_cache_hits"]
    summary |= {
        "prefix_caching": caching,
        **counts,
        "prefix_cache_hit_rate": hits / queries if queries else None,
    }
    return summary, time.perf_counter() - started


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
    failed = [row for row in rows if "error" in row]  # policies that never finish the trace: named below
    rows = [row for row in rows if "error" not in row]
    console.print(
        f"[bold]{trace.source.name if trace.source else 'trace'}[/]: {rows[0]['requests'] if rows else 0:,} "
        f"requests over "
        f"{trace.span:,.0f} s  |  {setup.model} on {setup.gpu} x{setup.tp}  |  "
        f"{setup.num_kv_blocks:,} KV blocks of {setup.block_size} tokens  |  cost: {setup.cost_source}"
    )
    account = rows[0] if rows else {}
    changed = {**trace.excluded, **account.get("modified", trace.modified)}
    if changed:
        console.print("[yellow]trace adjustments:[/] " + ", ".join(f"{k}: {v}" for k, v in changed.items()))
    rejected = {k: v for k, v in account.get("rejected", {}).items() if v}
    if rejected:
        console.print(
            f"[yellow]rejected as vLLM would (max_model_len {setup.max_model_len:,}):[/] "
            + ", ".join(f"{k}: {v}" for k, v in rejected.items())
        )
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
        "prefix hits",
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
            _hit_rate(row),
            f"{row['steps']:,}",
        )
    console.print(table)
    console.print(
        "[dim]GPU s: engine busy time; TTFT/E2E in seconds; 'vs first': GPU time relative to the first "
        "policy; prefix hits: prompt tokens found in the prefix cache at admission, of those looked up (vLLM's "
        "prefix_cache_hits / prefix_cache_queries).[/]"
    )
    for row in failed:
        console.print(f"[bold red]{row['policy']}: not replayed:[/] {row['error']}")


def _hit_rate(row: dict) -> str:
    if not row.get("prefix_caching"):
        return "off"
    rate = row["prefix_cache_hit_rate"]
    return "-" if rate is None else f"{rate * 100:.1f}%"


def overload_note(rows: list[dict], trace: Trace, rate_scale: float = 1.0) -> str | None:
    """A plain warning when a policy needs more engine time than the trace spans: arrivals then exceed what
    the engine can serve, a queue builds up, and latencies measure the backlog."""
    if trace.span <= 0:
        return None
    loads = {row["policy"]: row["gpu_seconds"] / trace.span for row in rows if "error" not in row}
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
    parser.add_argument(
        "--prefix-caching",
        choices=("on", "off"),
        help=PREFIX_CACHING_HELP + "; applies to every policy that evicts and does not set it itself",
    )
    parser.add_argument("--jobs", type=int, default=1, help="simulate policies in N processes (default 1)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list, one object per policy (with the trace's exclusions, caps and vLLM's "
        "rejections in each; a policy that never finishes the trace has `error` instead of figures)",
    )
    parser.set_defaults(func=run)


def with_prefix_caching(spec: str, caching: bool) -> Policy:
    """The policy `spec` under --prefix-caching: a spec that names prefix caching keeps its own setting, and
    a policy that reserves KV at admission (no eviction: orca, no-eviction, fastertransformer) cannot cache."""
    policy = parse_policy(spec)
    if "prefix_caching" in spec or not policy.eviction:
        return policy
    return replace(policy, enable_prefix_caching=caching)


def accounting(trace: Trace, setup: Setup, admitted: Admitted) -> dict:
    """Every request of the trace that is not replayed as it is in the file, by reason: the reader's
    exclusions and changes (time slice, limit, caps), and what vLLM would reject or cut short."""
    return {
        "max_model_len": setup.max_model_len,
        "trace_requests": len(trace.requests),
        "excluded": dict(trace.excluded),
        "modified": {**trace.modified, **admitted.capped},
        "rejected": {str(reason): admitted.rejected.get(reason, 0) for reason in Rejection},
    }


def rejection_note(setup: Setup, admitted: Admitted) -> str | None:
    if not admitted.rejected.get(Rejection.NEVER_FITS_KV_CACHE):
        return None
    capacity = (setup.num_kv_blocks - 1) * setup.block_size
    return (
        f"{admitted.rejected[Rejection.NEVER_FITS_KV_CACHE]:,} requests can never fit the {capacity:,} tokens "
        f"of KV cache and were left out; vLLM itself would refuse to start with max_model_len "
        f"{setup.max_model_len:,} on this cache (give --max-model-len {capacity:,} or less, or more KV: "
        "--kv-blocks, --gpu, --tp)"
    )


def run(args: argparse.Namespace) -> int:
    given = split_policies(args.policies)
    specs = [str(parse_policy(p)) for p in given]
    if not specs:
        raise ValueError("--policies is empty")
    trace = load_window(args)
    if not trace.requests:
        raise ValueError(f"{args.trace}: the selected window holds no requests")
    setup = engine_setup(args)
    caching = prefix_caching_on(args, trace)
    admitted = admit_like_vllm(
        with_block_hashes(trace, setup.block_size) if caching else trace.requests, setup
    )
    if not admitted.requests:
        raise ValueError(
            f"{args.trace}: vLLM would reject every request of the window ({admitted.rejected}; "
            f"max_model_len {setup.max_model_len:,}, {setup.num_kv_blocks:,} KV blocks of {setup.block_size})"
        )
    policies = [str(with_prefix_caching(spec, caching)) for spec in given]
    rows = replay_all(admitted.requests, policies, setup, jobs=args.jobs, progress=sys.stderr.isatty())
    account = accounting(trace, setup, admitted)
    # Each row keeps the policy's name as given; whether it cached is its own key.
    rows = [row | {"policy": spec} | account for row, spec in zip(rows, specs, strict=True)]
    if all("error" in row for row in rows):
        raise ValueError("no policy could replay the trace: " + "; ".join(row["error"] for row in rows))
    notes = [n for n in (rejection_note(setup, admitted), overload_note(rows, trace, args.rate_scale)) if n]
    if args.json:
        print(json.dumps([_json_safe(r) for r in rows], indent=2))
        for note in notes:
            print(f"shadow: note: {note}", file=sys.stderr)
    else:
        console = Console()
        if not console.is_terminal:
            console.width = 165  # a piped table keeps its columns rather than wrapping them to 80
        print_table(rows, trace, setup, console)
        for note in notes:
            console.print(f"[bold yellow]note:[/] {note}")
    return 0
