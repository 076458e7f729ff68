"""How large a window CP-SAT solves to a proven gap, on 2 cores: the table behind the optimal scheduler's target.

Target (DESIGN.md): windows of 64 requests proven within 1% in 60 s on 2 cores.

The engine is Llama-2-7B on one A10G (24 GB): 933 KV blocks of 16 tokens as vLLM counts them (932 usable,
~14.9k tokens), from `vllm_shadow.costmodel.kv`, and the roofline prior refitted without its d term (so the
bound holds for
every schedule; see `vllm_shadow.solver.optimal`). That scale is chosen so that a window is a real packing problem: the
Azure code prompts (median ~1.5k tokens) and conversation requests (~1k + ~130) let about ten requests hold KV
at once, so a 64-request window needs several generations of requests and memory decides the batch count. On
an 80 GB A100 the same windows fit whole and the optimum is simply "run everything at once" (batches = the
longest output). Windows are consecutive requests from the trace start (`--start` moves them); the objective
is GPU cost; `evictions` is how many recompute preemptions per request the optimum may use.

Columns: batches (optimum's), the model's size, the solve time (the limit when not proven), the gap on the
total GPU cost and on its schedule-dependent part (a x batches + recompute: the constant b*T + c*K of the
requests' own tokens taken out), and how far vLLM's own schedule is above the optimum.

Windows too large for CP-SAT (1,000 requests) get the relaxation bound of `vllm_shadow.solver.bounds`, set
against the packing heuristic's schedule (an upper bound on the optimum) and vLLM's.

With `--slo default` every window is held to vLLM's own schedule (no request's first token or finish later
than there): the CP-SAT model gains its per-batch time layer (not built past `MAX_TIME_LAYER_CELLS`: the best
verified heuristic is then set against the relaxation) and the bounds their deadline intervals and the
time-capacity LP (`vllm_shadow.solver.bounds.time_capacity_batches`), which for 1,000-request windows keeps
`--lp-max-keys` key times and only intervals at most `--lp-keys-apart` of them long (a weaker bound, still
valid for every schedule meeting the deadlines). Each row records the load average when it started: the
machine is shared.

`--paused-kv-keys` instead sets, per window and busy period, the time-capacity LP against the paused-KV MIP
(`vllm_shadow.solver.paused_kv`: the blocks a started request holds while it sits out batches, or one
recompute) over that many key times (0: all of them), each solver given `--time-limit`.

    python benchmarks/optimal_scaling.py                 # prints markdown tables
    python benchmarks/optimal_scaling.py --slo default --gpu a100 --starts 600,1200,1800 --sizes 64 \
        --evictions 1 --bound-starts 1200           # the SLO table of RESULTS-optimal.md
    python benchmarks/optimal_scaling.py --sizes 16,64 --time-limit 20 --bound-sizes ""
    python benchmarks/optimal_scaling.py --slo default --gpu a10g --traces azure-conv,azure-code \
        --starts 600,1200,1800 --sizes 64 --bound-sizes "" --paused-kv-keys 20,0   # the paused-KV MIP
"""

from __future__ import annotations

import argparse
import json
import os
import time

from vllm_shadow.adapters.traces import read_trace, resolve_trace
from vllm_shadow.cli.optimal import roofline_without_attention_term
from vllm_shadow.costmodel.architecture import load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks
from vllm_shadow.solver.bounds import min_batches, relaxation_bound, time_capacity_batches
from vllm_shadow.solver.cpsat import baseline_seconds, schedule_from_runs
from vllm_shadow.solver.optimal import busy_periods, engine_deadlines, run_heuristics, solve_optimal
from vllm_shadow.solver.packing import best_packing
from vllm_shadow.solver.paused_kv import paused_kv_bound
from vllm_shadow.solver.problem import EngineLimits, Objective, Window
from vllm_shadow.solver.schedule import Deadlines, verify

GPU = Objective()


def engine(model: str, gpu: str) -> tuple[object, int]:
    arch, hw = load_model(model), get_hardware(gpu)
    return roofline_without_attention_term(arch, hw, 1), kv_capacity_blocks(arch, hw, block_size=16) - 1


def row(
    trace: str,
    size: int,
    evictions: int,
    start: float,
    cost,
    kv_blocks: int,
    time_limit: float,
    slo: bool = False,
) -> dict:
    load = os.getloadavg()[0]
    requests = read_trace(resolve_trace(trace), start=start, limit=size).requests
    window = Window.from_arrivals(requests, EngineLimits(kv_blocks=kv_blocks, block_size=16))
    heuristics = run_heuristics(window, cost, GPU)
    vllm = next(h for h in heuristics if h.policy == "vllm")
    deadlines = engine_deadlines(vllm.replay) if slo else None
    started = time.perf_counter()
    result = solve_optimal(
        window,
        cost,
        GPU,
        max_evictions=evictions,
        time_limit=time_limit,
        workers=2,
        hints={h.policy: h.schedule for h in heuristics},
        deadlines=deadlines,
    )
    wall = time.perf_counter() - started
    constant = sum(baseline_seconds(r, cost) for r in window.requests)
    return {
        "trace": trace,
        "start": start,
        "slo": "vllm" if slo else "none",
        "periods": result.periods,
        "relaxation_s": result.relaxation_bound,
        "requests": size,
        "evictions": evictions,
        "batches": len(result.schedule),
        "horizon": result.horizon,
        "variables": result.variables,
        "constraints": result.constraints,
        "status": result.status,
        "solve_s": result.solve_seconds,
        "wall_s": wall,
        "gpu_s": result.objective,
        "bound_s": result.bound,
        "gap": result.gap,
        "dependent_gap": (result.objective - result.bound) / (result.objective - constant),
        "vllm_above": vllm.objective / result.objective - 1,
        "preemptions": result.summary()["preemptions"],
        "source": result.source,
        "bound_method": result.bound_method,
        "load": load,
    }


def capacity_batches(
    window: Window, cost, deadlines: Deadlines, keys_apart: int, max_keys: int
) -> tuple[int, int]:
    """The time-capacity LP's batches summed over the window's busy periods (no batch spans two), each at
    least its deadline intervals' count; and the LP's variables."""
    total = variables = 0
    for period in busy_periods(window, deadlines):
        ids = {r.request_id for r in period.requests}
        due = Deadlines(
            {k: v for k, v in deadlines.first_token.items() if k in ids},
            {k: v for k, v in deadlines.finish.items() if k in ids},
            deadlines.source,
        )
        lp = time_capacity_batches(
            period, cost, due, time_limit=900, max_keys_apart=keys_apart, max_keys=max_keys
        )
        total += max(lp.batches, min_batches(period, due))
        variables += lp.variables
    return total, variables


def bound_row(
    trace: str,
    size: int,
    start: float,
    cost,
    kv_blocks: int,
    slo: bool = False,
    keys_apart: int = 20,
    max_keys: int = 250,
) -> dict:
    """A window too large for CP-SAT: the relaxation bound against the packing heuristic and vLLM (with
    `slo`, the bound under vLLM's own times, raised by the time-capacity LP, against vLLM, which meets them)."""
    load = os.getloadavg()[0]
    requests = read_trace(resolve_trace(trace), start=start, limit=size).requests
    window = Window.from_arrivals(requests, EngineLimits(kv_blocks=kv_blocks, block_size=16))
    deadlines = None
    if slo:
        deadlines = engine_deadlines(run_heuristics(window, cost, GPU, ["vllm"])[0].replay)
    started = time.perf_counter()
    intervals = lp_batches = lp_variables = 0
    if deadlines is not None:
        intervals = min_batches(window, deadlines)
        if max_keys > 0:
            lp_batches, lp_variables = capacity_batches(window, cost, deadlines, keys_apart, max_keys)
    bound = relaxation_bound(window, cost, deadlines, lp_batches)
    bound_s = time.perf_counter() - started
    started = time.perf_counter()
    order, runs = best_packing(window)
    packed = verify(schedule_from_runs(window, runs), window, cost)
    packing_s = time.perf_counter() - started
    vllm = run_heuristics(window, cost, GPU, ["vllm"])[0]
    return {
        "trace": trace,
        "start": start,
        "slo": "vllm" if slo else "none",
        "requests": size,
        "bound_gpu_s": bound.gpu_seconds,
        "bound_batches": bound.batches,
        "bound_s": bound_s,
        "packing_gpu_s": packed.gpu_seconds,
        "packing_batches": len(packed.batches),
        "packing_order": order,
        "packing_s": packing_s,
        "vllm_gpu_s": vllm.objective,
        "vllm_batches": len(vllm.schedule),
        "interval_batches": intervals,
        "lp_batches": lp_batches,
        "lp_variables": lp_variables,
        "load": load,
    }


def period_deadlines(period: Window, deadlines: Deadlines) -> Deadlines:
    ids = {r.request_id for r in period.requests}
    return Deadlines(
        {k: v for k, v in deadlines.first_token.items() if k in ids},
        {k: v for k, v in deadlines.finish.items() if k in ids},
        deadlines.source,
    )


def paused_kv_row(
    trace: str, size: int, start: float, cost, kv_blocks: int, keys: int, time_limit: float, solver: str
) -> dict:
    """The paused-KV MIP (`vllm_shadow.solver.paused_kv`) against the time-capacity LP on one window under
    vLLM's own times, busy period by busy period (`keys` key times kept per period, 0: all of them), each bound
    the best of the two; the gap is against vLLM's schedule (the best verified one on the A10G windows)."""
    load = os.getloadavg()[0]
    requests = read_trace(resolve_trace(trace), start=start, limit=size).requests
    window = Window.from_arrivals(requests, EngineLimits(kv_blocks=kv_blocks, block_size=16))
    vllm = run_heuristics(window, cost, GPU, ["vllm"])[0]
    deadlines = engine_deadlines(vllm.replay)
    max_keys = keys or None
    lp_batches = mip_equivalents = bound = lp_s = mip_s = 0.0
    variables = constraints = 0
    statuses = []
    periods = busy_periods(window, deadlines)
    for period in periods:
        due = period_deadlines(period, deadlines)
        lp = time_capacity_batches(period, cost, due, time_limit=time_limit, max_keys=max_keys)
        mip = paused_kv_bound(
            period, cost, due, lp, time_limit=time_limit, max_keys=max_keys, solver_name=solver
        )
        lp_batches += lp.batches
        mip_equivalents += max(mip.batch_equivalents, lp.batches)
        bound += relaxation_bound(period, cost, due, lp.batches, mip.schedule_seconds(cost)).gpu_seconds
        lp_s, mip_s = lp_s + lp.seconds, mip_s + mip.seconds
        variables, constraints = variables + mip.variables, constraints + mip.constraints
        statuses.append(mip.status)
    return {
        "trace": trace,
        "start": start,
        "requests": size,
        "periods": len(periods),
        "keys": keys,
        "lp_batches": lp_batches,
        "mip_batch_equivalents": mip_equivalents,
        "mip_status": "+".join(sorted(set(statuses))),
        "mip_variables": variables,
        "mip_constraints": constraints,
        "lp_s": lp_s,
        "mip_s": mip_s,
        "bound_gpu_s": bound,
        "vllm_gpu_s": vllm.objective,
        "vllm_batches": len(vllm.schedule),
        "gap": (vllm.objective - bound) / vllm.objective,
        "load": load,
    }


def markdown_paused(rows: list[dict]) -> str:
    lines = [
        "| trace | start s | periods | keys | LP batches | MIP batch equivalents | MIP status | MIP variables "
        "| MIP constraints | LP s | MIP s | bound GPU s | vLLM GPU s (batches) | gap | load avg |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trace']} | {r['start']:g} | {r['periods']} | {r['keys'] or 'all'} | {r['lp_batches']:.0f} "
            f"| {r['mip_batch_equivalents']:.2f} | {r['mip_status']} | {r['mip_variables']:,} "
            f"| {r['mip_constraints']:,} | {r['lp_s']:.1f} | {r['mip_s']:.1f} | {r['bound_gpu_s']:.3f} "
            f"| {r['vllm_gpu_s']:.3f} ({r['vllm_batches']}) | {100 * r['gap']:.2f}% | {r['load']:.1f} |"
        )
    return "\n".join(lines)


def markdown_bounds(rows: list[dict]) -> str:
    lines = [
        "| trace | start s | SLO | requests | bound GPU s (batches) | interval / LP batches | LP variables "
        "| bound time s | packing GPU s (batches) | packing time s | packing above bound | vLLM GPU s (batches) "
        "| vLLM above bound | load avg |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trace']} | {r['start']:g} | {r['slo']} | {r['requests']} "
            f"| {r['bound_gpu_s']:.1f} ({r['bound_batches']}) | {r['interval_batches']} / {r['lp_batches']} "
            f"| {r['lp_variables']} | {r['bound_s']:.1f} "
            f"| {r['packing_gpu_s']:.1f} ({r['packing_batches']}) | {r['packing_s']:.1f} "
            f"| {100 * (r['packing_gpu_s'] / r['bound_gpu_s'] - 1):.2f}% | {r['vllm_gpu_s']:.1f} ({r['vllm_batches']}) "
            f"| {100 * (r['vllm_gpu_s'] / r['bound_gpu_s'] - 1):.1f}% | {r['load']:.1f} |"
        )
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| trace | start s | SLO | requests | evictions | batches | variables | constraints | status | solve s "
        "| wall s | GPU s | bound s | bound from | gap | gap (schedule-dependent part) | vLLM above optimum "
        "| load avg |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trace']} | {r['start']:g} | {r['slo']} | {r['requests']} | {r['evictions']} | {r['batches']} "
            f"| {r['variables']} "
            f"| {r['constraints']} | {r['status']} | {r['solve_s']:.1f} | {r['wall_s']:.1f} | {r['gpu_s']:.3f} "
            f"| {r['bound_s']:.3f} | {r['bound_method']} "
            f"| {100 * r['gap']:.2f}% | {100 * r['dependent_gap']:.1f}% | {100 * r['vllm_above']:.1f}% "
            f"| {r['load']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--traces", default="azure-code,azure-conv")
    parser.add_argument("--sizes", default="16,32,64,128")
    parser.add_argument("--evictions", default="0,1", help="eviction limits to solve each window with")
    parser.add_argument("--starts", default="0", help="window starts, seconds into the trace (comma list)")
    parser.add_argument(
        "--slo",
        choices=("none", "default"),
        default="none",
        help="default: hold every window to vLLM's times",
    )
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--gpu", default="a10g")
    parser.add_argument(
        "--bound-sizes", default="1000", help="window sizes for the relaxation bound against packing"
    )
    parser.add_argument("--bound-starts", help="window starts for the relaxation rows (default: --starts)")
    parser.add_argument(
        "--lp-keys-apart",
        type=int,
        default=20,
        help="with --slo default, the relaxation rows' time-capacity LP keeps intervals at most this many key "
        "times long (default 20)",
    )
    parser.add_argument(
        "--lp-max-keys",
        type=int,
        default=250,
        help="with --slo default, the relaxation rows' time-capacity LP keeps this many key times, arrivals "
        "moved back and deadlines forward to them (default 250; 0: no LP, the deadline intervals only)",
    )
    parser.add_argument(
        "--paused-kv-keys",
        default="",
        help="also bound each window with the paused-KV MIP over this many key times per busy period (comma "
        "list; 0: all of them), under vLLM's own times, in place of the CP-SAT rows' --sizes windows",
    )
    parser.add_argument("--paused-kv-solver", default="HIGHS", help="the MIP solver: HIGHS or SCIP")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    cost, kv_blocks = engine(args.model, args.gpu)
    print(f"{args.model} on {args.gpu}: {kv_blocks} usable KV blocks; cost {cost}")
    slo = args.slo == "default"
    starts = [float(x) for x in args.starts.split(",")]
    bound_starts = [float(x) for x in args.bound_starts.split(",")] if args.bound_starts else starts
    bounds = []
    for trace in args.traces.split(","):
        for start in bound_starts:
            for size in map(int, filter(None, args.bound_sizes.split(","))):
                bounds.append(
                    bound_row(trace, size, start, cost, kv_blocks, slo, args.lp_keys_apart, args.lp_max_keys)
                )
                print(json.dumps(bounds[-1]), flush=True)
    if bounds:
        print(markdown_bounds(bounds), flush=True)
    if args.paused_kv_keys:
        paused = []
        for trace in args.traces.split(","):
            for start in starts:
                for size in map(int, filter(None, args.sizes.split(","))):
                    for keys in map(int, args.paused_kv_keys.split(",")):
                        paused.append(
                            paused_kv_row(
                                trace,
                                size,
                                start,
                                cost,
                                kv_blocks,
                                keys,
                                args.time_limit,
                                args.paused_kv_solver,
                            )
                        )
                        print(json.dumps(paused[-1]), flush=True)
        print(markdown_paused(paused))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"paused_kv": paused}, handle, indent=1)
        return
    rows = []
    for trace in args.traces.split(","):
        for start in starts:
            for size in map(int, filter(None, args.sizes.split(","))):
                for evictions in map(int, args.evictions.split(",")):
                    rows.append(row(trace, size, evictions, start, cost, kv_blocks, args.time_limit, slo))
                    print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"cp_sat": rows, "bounds": bounds}, handle, indent=1)


if __name__ == "__main__":
    main()
