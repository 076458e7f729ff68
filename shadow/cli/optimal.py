"""`shadow optimal TRACE`: the optimal schedule of a trace window, its proven bound, and the heuristics' gaps."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import numpy as np
from rich.console import Console
from rich.table import Table

from vllm_shadow.cli.options import Setup, add_engine_options, add_trace_options, engine_setup, load_window
from vllm_shadow.costmodel.architecture import load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks
from vllm_shadow.costmodel.linear import LinearCostModel, batch_features, fit_linear
from vllm_shadow.costmodel.roofline import representative_batches, roofline_batch_time
from vllm_shadow.report.schedule_plot import plot_schedules
from vllm_shadow.solver.optimal import (
    DEFAULT_HEURISTICS,
    HeuristicRun,
    OptimalResult,
    run_heuristics,
    solve_optimal,
)
from vllm_shadow.solver.policies import split_policies
from vllm_shadow.solver.problem import EngineLimits, Window, parse_objective
from vllm_shadow.solver.schedule import Replay


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "optimal",
        help="the optimal schedule of a trace window (CP-SAT), with a proven bound and the heuristics' gaps",
        description="Solve a window of a trace to optimality with CP-SAT (warm-started from the best "
        "heuristic), check the schedule with an independent verifier, and report its objective, the proven "
        "lower bound, the gap, and every heuristic's objective on the same window.",
    )
    add_trace_options(parser)
    add_engine_options(parser)
    parser.set_defaults(limit=64)
    group = parser.add_argument_group("optimisation")
    group.add_argument(
        "--objective",
        default="gpu",
        help="gpu (sum of batch times), e2e or ttft (means, seconds), or mix:gpu=W,e2e=W,ttft=W (default gpu)",
    )
    group.add_argument(
        "--time-limit", type=float, default=60.0, help="CP-SAT time limit in seconds (default 60)"
    )
    group.add_argument("--workers", type=int, default=2, help="CP-SAT worker threads (default 2)")
    group.add_argument("--seed", type=int, default=0, help="CP-SAT random seed (default 0)")
    group.add_argument(
        "--no-eviction", action="store_true", help="forbid recompute preemption in the optimal schedule"
    )
    group.add_argument(
        "--max-evictions", type=int, default=1, help="recompute preemptions allowed per request (default 1)"
    )
    group.add_argument(
        "--keep-attention-term",
        action="store_true",
        help="keep the roofline fit's d term; by default the roofline is refitted without it, which keeps the "
        "bound exact (see solver.optimal); a --cost-profile is always used as it is",
    )
    group.add_argument(
        "--policies",
        default=",".join(DEFAULT_HEURISTICS),
        help=f"heuristics to compare (default {','.join(DEFAULT_HEURISTICS)})",
    )
    group.add_argument(
        "--max-num-seqs", type=int, help="the engine's max_num_seqs, applied to every heuristic"
    )
    group.add_argument(
        "--max-num-batched-tokens", type=int, help="the engine's token budget, applied to every heuristic"
    )
    group.add_argument(
        "--optimum-obeys-settings",
        action="store_true",
        help="hold the optimum to --max-num-seqs and --max-num-batched-tokens too (default: only KV memory "
        "binds it, so that it bounds every configuration)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the optimal schedule against vLLM's")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    objective = parse_objective(args.objective)
    setup = _setup(args)
    trace = load_window(args)
    if not trace.requests:
        raise ValueError("the window holds no requests")
    settings = {
        key: value
        for key, value in (
            ("max_num_seqs", args.max_num_seqs),
            ("max_num_batched_tokens", args.max_num_batched_tokens),
        )
        if value is not None
    }
    limits = EngineLimits(
        kv_blocks=setup.num_kv_blocks - 1, block_size=setup.block_size
    )  # minus the null block
    if args.optimum_obeys_settings:
        limits = dataclasses.replace(limits, **settings)
    window = Window.from_arrivals(trace.requests, limits)
    heuristics = run_heuristics(
        window, setup.cost, objective, split_policies(args.policies), settings=settings
    )
    result = solve_optimal(
        window,
        setup.cost,
        objective,
        max_evictions=0 if args.no_eviction else args.max_evictions,
        time_limit=args.time_limit,
        workers=args.workers,
        seed=args.seed,
        hints={h.policy: h.schedule for h in heuristics if h.replay.feasible},
    )
    report = _report(args, setup, window, result, heuristics)
    if args.plot:
        vllm = next((h for h in heuristics if h.policy.startswith("vllm") and h.replay.feasible), None)
        if vllm is None:
            raise ValueError("--plot compares with vLLM: include a vllm policy in --policies")
        plot_schedules(
            args.plot,
            window,
            [(f"{vllm.policy}", vllm.schedule, vllm.replay), ("optimal", result.schedule, result.replay)],
            report["title"],
        )
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=_json_value)
        print()
    else:
        _print_tables(report)
    return 0


def _setup(args: argparse.Namespace) -> Setup:
    setup = engine_setup(args)
    if args.cost_profile or args.keep_attention_term or (setup.cost.d == 0 and setup.cost.e == 0):
        return setup
    arch, hw = load_model(args.model), get_hardware(args.gpu)
    return dataclasses.replace(
        setup,
        cost=roofline_without_attention_term(arch, hw, args.tp),
        cost_source=setup.cost_source.replace("roofline prior", "roofline prior refitted without d"),
    )


def roofline_without_attention_term(arch, hw, tp: int) -> LinearCostModel:
    """The roofline prior's fit (same batches) with d = 0 and e = 0: prefill chunking then never lowers GPU cost,
    so the CP-SAT bound holds for every schedule, CP-SAT prices every term, and the heuristics are replayed on
    this same model."""
    capacity = kv_capacity_blocks(arch, hw, tp=tp, block_size=1)
    batches = representative_batches(arch.max_position_embeddings, capacity, 8192)
    features = np.array([batch_features(new, ctx) for new, ctx in batches], dtype=float)
    times = np.array([roofline_batch_time(arch, hw, new, ctx, tp=tp) for new, ctx in batches])
    return fit_linear(features, times, with_attention_term=False, with_request_term=False)


def _report(
    args: argparse.Namespace,
    setup: Setup,
    window: Window,
    result: OptimalResult,
    heuristics: list[HeuristicRun],
) -> dict:
    span = max(r.arrival for r in window.requests) - window.start
    return {
        "trace": args.trace,
        "title": f"{args.trace}: {len(window.requests)} requests over {span:.1f} s | {setup.model} on {setup.gpu} "
        f"x{setup.tp}, {window.limits.kv_blocks} KV blocks | objective {result.objective_name}",
        "requests": len(window.requests),
        "window_start_s": args.start or 0.0,
        "window_span_s": span,
        "kv_blocks": window.limits.kv_blocks,
        "block_size": window.limits.block_size,
        "cost_model": setup.cost.to_dict() | {"source": setup.cost_source},
        **result.summary(),
        "heuristics": {h.policy: h.objective for h in heuristics if h.replay.feasible},
        "heuristics_detail": {h.policy: _replay_row(h.replay, h.objective) for h in heuristics},
    }


def _replay_row(replay: Replay, objective: float) -> dict:
    return {
        "objective": objective,
        "gpu_seconds": replay.gpu_seconds,
        "mean_e2e_s": replay.mean_e2e,
        "mean_ttft_s": replay.mean_ttft,
        "batches": len(replay.batches),
        "preemptions": sum(replay.evictions.values()),
        "violations": list(replay.violations),
    }


def _json_value(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def _print_tables(report: dict) -> None:
    console = Console()
    console.print(f"[bold]{report['title']}[/]")
    console.print(f"cost model: {report['cost_model']['source']}")
    optimum = Table(title="optimal schedule")
    for column in ("status", "objective", "bound", "gap", "batches", "preemptions", "solve s", "variables"):
        optimum.add_column(column, justify="right")
    optimum.add_row(
        report["status"],
        f"{report['objective']:.4f}",
        f"{report['bound']:.4f}",
        f"{100 * report['gap']:.2f}%",
        str(report["batches"]),
        str(report["preemptions"]),
        f"{report['solve_seconds']:.1f}",
        str(report["variables"]),
    )
    console.print(optimum)
    console.print(
        f"bound holds for {report['bound_scope']}; relaxation bound {report['relaxation_bound']:.4f}",
        soft_wrap=True,  # one line whatever the terminal's width: scripts grep for the scope
    )
    table = Table(title="heuristics on the same window")
    for column in (
        "policy",
        "objective",
        "above optimum",
        "above bound",
        "GPU s",
        "mean E2E s",
        "preemptions",
    ):
        table.add_column(column, justify="right")
    for policy, row in sorted(report["heuristics_detail"].items(), key=lambda item: item[1]["objective"]):
        value = row["objective"]
        table.add_row(
            policy,
            f"{value:.4f}",
            f"{100 * (value / report['objective'] - 1):.1f}%",
            f"{100 * (value / report['bound'] - 1):.1f}%",
            f"{row['gpu_seconds']:.3f}",
            f"{row['mean_e2e_s']:.2f}",
            str(row["preemptions"]),
        )
    console.print(table)
