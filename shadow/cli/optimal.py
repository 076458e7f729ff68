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

from vllm_shadow.adapters.traces import Trace
from vllm_shadow.cli.options import (
    Admitted,
    Rejection,
    Setup,
    add_engine_options,
    add_trace_options,
    admit_like_vllm,
    engine_setup,
    load_window,
)
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
    engine_deadlines,
    run_heuristics,
    scaled_deadlines,
    slo_deadlines,
    solve_optimal,
)
from vllm_shadow.solver.policies import split_policies
from vllm_shadow.solver.problem import EngineLimits, Objective, Window, parse_objective
from vllm_shadow.solver.schedule import Deadlines, Replay, Schedule


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
        "--slo",
        metavar="default|ttft=S,tpot=S",
        help="latency constraints on the optimum: 'default' = no request's first token or finish later than in "
        "vLLM's own schedule of the window; or per-request limits in seconds (first token within ttft of "
        "arrival, finish by arrival + ttft + tpot x (output - 1))",
    )
    group.add_argument(
        "--pareto",
        metavar="LEVELS",
        nargs="?",
        const="1,1.5,2,4",
        help="GPU time at several latency levels: each request's allowance under --slo (default: vLLM's) "
        "times each factor, solved tightest first, each solve warm-started from the last (default 1,1.5,2,4)",
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
    group.add_argument(
        "--prefix-caching",
        choices=("on", "off"),
        default="off",
        help="off (the default, whatever the trace carries): the optimum's model has no prefix cache yet, so "
        "'on' is refused rather than compared unlike with like; `shadow replay` models it",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the optimal schedule against vLLM's")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    objective = parse_objective(args.objective)
    if args.prefix_caching == "on":
        raise ValueError(
            "--prefix-caching on: the optimum does not model prefix caching yet (its problem has no cached "
            "tokens); use `shadow replay --prefix-caching on` to compare schedulers with it"
        )
    setup = _setup(args)
    trace = load_window(args)
    if not trace.requests:
        raise ValueError("the window holds no requests")
    admitted = admit_like_vllm(trace.requests, setup)
    if not admitted.requests:
        raise ValueError(
            f"vLLM would reject every request of the window ({admitted.rejected}; max_model_len "
            f"{setup.max_model_len:,}, {setup.num_kv_blocks:,} KV blocks of {setup.block_size})"
        )
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
    window = Window.from_arrivals(admitted.requests, limits)
    engine = run_heuristics(window, setup.cost, objective, ["vllm"], settings=settings)[0]
    deadlines = _deadlines(args.slo, window, engine.replay) if args.slo or args.pareto else None
    heuristics = run_heuristics(
        window, setup.cost, objective, split_policies(args.policies), settings=settings, deadlines=deadlines
    )
    hints = {h.policy: h.schedule for h in heuristics if h.replay.feasible}
    hints.setdefault("vllm", engine.schedule)
    options = {
        "max_evictions": 0 if args.no_eviction else args.max_evictions,
        "time_limit": args.time_limit,
        "workers": args.workers,
        "seed": args.seed,
    }
    frontier: list[dict] = []
    if args.pareto and deadlines is not None:
        frontier, hints = _pareto(args.pareto, window, setup.cost, objective, deadlines, hints, options)
    result = solve_optimal(window, setup.cost, objective, hints=hints, deadlines=deadlines, **options)
    report = _report(args, setup, window, result, heuristics) | _accounting(trace, setup, admitted)
    if args.pareto:
        report["pareto"] = frontier
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
        if frontier:
            add_frontier(args.plot, frontier, vllm.replay)
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=_json_value)
        print()
    else:
        _print_tables(report)
    return 0


def _deadlines(slo: str | None, window: Window, engine: Replay) -> Deadlines:
    """`default` (or no --slo): vLLM's own times; otherwise `ttft=S,tpot=S` limits in seconds."""
    if slo is None or slo.strip().lower() == "default":
        return engine_deadlines(engine)
    limits: dict[str, float] = {}
    for item in filter(None, slo.split(",")):
        name, _, value = item.partition("=")
        name = name.strip().lower()
        if name not in ("ttft", "tpot") or not value:
            raise ValueError(f"bad SLO term {item!r}: expected default, or ttft=SECONDS and/or tpot=SECONDS")
        limits[name] = float(value)
    return slo_deadlines(window, limits.get("ttft"), limits.get("tpot"))


def _pareto(
    levels: str,
    window: Window,
    cost: LinearCostModel,
    objective: Objective,
    deadlines: Deadlines,
    hints: dict[str, Schedule],
    options: dict,
) -> tuple[list[dict], dict[str, Schedule]]:
    """The optimum at each latency level, tightest first: a schedule meeting tighter deadlines meets looser
    ones, so each solve starts from the last one's schedule. Returns the frontier and the hints it grew."""
    hints = dict(hints)
    frontier: list[dict] = []
    for factor in sorted(float(x) for x in levels.split(",") if x.strip()):
        level = scaled_deadlines(deadlines, window, factor)
        try:
            point = solve_optimal(window, cost, objective, hints=hints, deadlines=level, **options)
        except ValueError as error:  # no schedule meets this level, or none was found in time
            frontier.append(
                {"factor": factor, "slo": level.source, "status": "NO_SCHEDULE", "error": str(error)}
            )
            continue
        hints[f"pareto {factor:g}"] = point.schedule
        frontier.append(
            {
                "factor": factor,
                "slo": level.source,
                "status": point.status,
                "objective": point.objective,
                "bound": point.bound,
                "gap": point.gap,
                "gpu_seconds": point.replay.gpu_seconds,
                "mean_ttft_s": point.replay.mean_ttft,
                "mean_e2e_s": point.replay.mean_e2e,
            }
        )
    return frontier, hints


def add_frontier(path: str, frontier: list[dict], engine: Replay) -> None:
    """Redraw the schedules figure at `path` with the Pareto frontier beside it: GPU seconds (optimum and
    proven bound) against mean TTFT at each latency level, vLLM's own schedule as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules = plt.imread(path)
    solved = [p for p in frontier if "objective" in p]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(18, schedules.shape[0] / 110), gridspec_kw={"width_ratios": [2, 1]}
    )
    left.imshow(schedules)
    left.axis("off")
    ttft = [p["mean_ttft_s"] for p in solved]
    right.plot(ttft, [p["gpu_seconds"] for p in solved], "o-", color="tab:blue", label="optimum")
    right.plot(ttft, [p["bound"] for p in solved], "v--", color="tab:gray", label="proven bound")
    for p, x in zip(solved, ttft, strict=True):
        right.annotate(f"{p['factor']:g}x", (x, p["gpu_seconds"]), textcoords="offset points", xytext=(4, 4))
    right.plot([engine.mean_ttft], [engine.gpu_seconds], "s", color="tab:orange", label="vLLM")
    right.set_xlabel("mean TTFT (s) at each latency level")
    right.set_ylabel("GPU seconds")
    right.set_title("GPU time against latency (Pareto view)", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _setup(args: argparse.Namespace) -> Setup:
    setup = engine_setup(args)
    if args.cost_profile or args.keep_attention_term or setup.cost.d == 0:
        return setup
    arch, hw = load_model(args.model), get_hardware(args.gpu)
    return dataclasses.replace(
        setup,
        cost=roofline_without_attention_term(arch, hw, args.tp),
        cost_source=setup.cost_source.replace("roofline prior", "roofline prior refitted without d"),
    )


def roofline_without_attention_term(arch, hw, tp: int) -> LinearCostModel:
    """The roofline prior's fit (same batches) with d = 0: prefill chunking then never lowers GPU cost, so the
    CP-SAT bound holds for every schedule; the per-request term e is kept where the fit wants it (CP-SAT prices
    it: see `vllm_shadow.solver.cpsat`). The heuristics are replayed on this same model."""
    capacity = kv_capacity_blocks(arch, hw, tp=tp, block_size=1)
    batches = representative_batches(arch.max_position_embeddings, capacity, 8192)
    features = np.array([batch_features(new, ctx) for new, ctx in batches], dtype=float)
    times = np.array([roofline_batch_time(arch, hw, new, ctx, tp=tp) for new, ctx in batches])
    return fit_linear(features, times, with_attention_term=False)


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
        "heuristics_detail": {h.policy: _heuristic_row(h) for h in heuristics},
    }


def _accounting(trace: Trace, setup: Setup, admitted: Admitted) -> dict:
    """The window's requests that are not solved as they are in the file, by reason: the reader's exclusions
    and changes, and what vLLM would reject or cut short (the keys of `shadow replay --json`)."""
    return {
        "max_model_len": setup.max_model_len,
        "prefix_caching": False,
        "trace_requests": len(trace.requests),
        "excluded": dict(trace.excluded),
        "modified": {**trace.modified, **admitted.capped},
        "rejected": {str(reason): admitted.rejected.get(reason, 0) for reason in Rejection},
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


def _heuristic_row(h: HeuristicRun) -> dict:
    return _replay_row(h.replay, h.objective) | {"missed_deadlines": h.missed_deadlines}


def _json_value(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def _print_tables(report: dict) -> None:
    console = Console()
    console.print(f"[bold]{report['title']}[/]")
    console.print(f"cost model: {report['cost_model']['source']}")
    changed = {**report["excluded"], **report["modified"]}
    if changed:
        console.print("[yellow]trace adjustments:[/] " + ", ".join(f"{k}: {v}" for k, v in changed.items()))
    rejected = {k: v for k, v in report["rejected"].items() if v}
    if rejected:
        console.print(
            f"[yellow]rejected as vLLM would (max_model_len {report['max_model_len']:,}):[/] "
            + ", ".join(f"{k}: {v}" for k, v in rejected.items())
        )
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
