"""INFERMAX's headline, measured here: what recompute preemption buys in GPU cost, for heuristics and the optimum.

INFERMAX (arXiv 2411.07447) reports that preempting requests can cut GPU cost by about 30% against never
preempting, when requests are short and memory is highly utilised, and that preemption hurts when long requests
are preempted and recomputed. Here, on the same engine as `optimal_scaling.py` (Llama-2-7B on one A10G,
roofline prior refitted without d):

Part A, heuristics at scale: each scheduler with recompute preemption (vLLM's way: admit on current need,
preempt the newest request when KV runs out) against the same scheduler in no-eviction mode (INFERMAX's: reserve
prompt + output at admission, never preempt), on 1,000-request stretches of three workloads, arrivals compressed
so that the queue is long (high memory utilisation), at three KV sizes (the A10G's, a half, a quarter):
  short:  Azure conversation trace with prompts capped at 256 and outputs at 64 tokens,
  short-prompt: the same with prompts capped at 256 tokens and outputs as they are (median ~130, up to 1,000),
  code:   Azure code trace (long prompts, short outputs: median ~1.5k in, 13 out), prompts capped at 3,000 and
          outputs at 700 tokens so that each request fits the smallest cache alone,
  conv:   Azure conversation trace (median ~1k in, ~130 out, long tail), prompts capped at 2,048 (same reason).
Part B, the optimum: 64-request windows of the same workloads, on the quarter-size KV cache (memory binds), the
optimal schedule without eviction (proven) and with up to one recompute preemption per request (best found in
the time limit, with its bound), next to the heuristics' own numbers on the window.

    python benchmarks/preemption_study.py                       # both parts, markdown tables
    python benchmarks/preemption_study.py --part a --requests 500
"""

from __future__ import annotations

import argparse
import json

from vllm_shadow.adapters.traces import read_trace, resolve_trace
from vllm_shadow.cli.optimal import roofline_without_attention_term
from vllm_shadow.costmodel.architecture import load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks
from vllm_shadow.solver.optimal import run_heuristics, solve_optimal
from vllm_shadow.solver.problem import EngineLimits, Objective, Window
from vllm_shadow.solver.simulator import simulate

GPU = Objective()
WORKLOADS = {  # name -> (trace, read_trace options)
    "short": ("azure-conv", {"max_prompt_tokens": 256, "max_output_tokens": 64}),
    "short-prompt": ("azure-conv", {"max_prompt_tokens": 256}),
    # Caps only so that every request fits the quarter-size cache alone (233 blocks, 3,728 tokens).
    "code": ("azure-code", {"max_prompt_tokens": 3000, "max_output_tokens": 700}),
    "conv": ("azure-conv", {"max_prompt_tokens": 2048, "max_output_tokens": 1000}),
}
HEURISTICS = ("vllm", "vllm-v0", "sarathi", "lightllm", "sjf", "sof")


def part_a(cost, full_blocks: int, requests: int, rate_scale: float) -> list[dict]:
    rows = []
    for workload, (trace, options) in WORKLOADS.items():
        arrivals = read_trace(resolve_trace(trace), limit=requests, rate_scale=rate_scale, **options).requests
        for fraction in (1.0, 0.5, 0.25):
            blocks = int(full_blocks * fraction)
            for policy in HEURISTICS:
                runs = {
                    mode: simulate(
                        arrivals,
                        f"{policy}(preemption={mode})",
                        cost,
                        num_kv_blocks=blocks + 1,
                        block_size=16,
                    ).summary()
                    for mode in ("recompute", "none")
                }
                rows.append(
                    {
                        "workload": workload,
                        "kv_blocks": blocks,
                        "policy": policy,
                        "gpu_s_preempt": runs["recompute"]["gpu_seconds"],
                        "gpu_s_no_evict": runs["none"]["gpu_seconds"],
                        "saving": 1 - runs["recompute"]["gpu_seconds"] / runs["none"]["gpu_seconds"],
                        "preemptions": runs["recompute"]["preemptions"],
                        "recomputed_tokens": runs["recompute"]["recomputed_tokens"],
                        "e2e_p50_preempt": runs["recompute"]["e2e_p50_s"],
                        "e2e_p50_no_evict": runs["none"]["e2e_p50_s"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def part_b(cost, blocks: int, size: int, windows: int, rate_scale: float, time_limit: float) -> list[dict]:
    rows = []
    for workload, (trace, options) in WORKLOADS.items():
        arrivals = read_trace(
            resolve_trace(trace), limit=size * windows, rate_scale=rate_scale, **options
        ).requests
        for index in range(windows):
            chunk = arrivals[index * size : (index + 1) * size]
            window = Window.from_arrivals(chunk, EngineLimits(kv_blocks=blocks, block_size=16))
            heuristics = run_heuristics(
                window,
                cost,
                GPU,
                [f"{p}(preemption={m})" for p in ("vllm", "sjf") for m in ("recompute", "none")],
            )
            hints = {h.policy: h.schedule for h in heuristics}
            no_evict = solve_optimal(
                window, cost, GPU, max_evictions=0, time_limit=time_limit, workers=2, hints=hints
            )
            # Every no-eviction schedule is a schedule with evictions: the eviction solve starts from it.
            hints["no-eviction optimum"] = no_evict.schedule
            evict = solve_optimal(
                window, cost, GPU, max_evictions=1, time_limit=time_limit, workers=2, hints=hints
            )
            solved = {0: no_evict, 1: evict}
            row = {
                "workload": workload,
                "window": index,
                "kv_blocks": blocks,
                **{f"{h.policy}": h.objective for h in heuristics},
                **{f"{h.policy} preemptions": h.preemptions for h in heuristics},
                "opt_no_evict": solved[0].objective,
                "opt_no_evict_status": solved[0].status,
                "opt_no_evict_gap": solved[0].gap,
                "opt_evict": solved[1].objective,
                "opt_evict_bound": solved[1].bound,
                "opt_evict_status": solved[1].status,
                "opt_evict_preemptions": solved[1].summary()["preemptions"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown_a(rows: list[dict]) -> str:
    lines = [
        "| workload | KV blocks | policy | GPU s, preemption | GPU s, no eviction | saving | preemptions "
        "| p50 E2E s, preemption / no eviction |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['kv_blocks']} | {r['policy']} | {r['gpu_s_preempt']:.1f} "
            f"| {r['gpu_s_no_evict']:.1f} | {100 * r['saving']:+.1f}% | {r['preemptions']} "
            f"| {r['e2e_p50_preempt']:.1f} / {r['e2e_p50_no_evict']:.1f} |"
        )
    return "\n".join(lines)


def markdown_b(rows: list[dict]) -> str:
    """The optimum's side: what its eviction solve found, and the most preemption could save it (the best
    schedule without preemption against the proven bound with it)."""
    lines = [
        "| workload | window | vLLM | vLLM no-evict | SJF | SJF no-evict | optimum no-evict (gap) "
        "| optimum with eviction [bound] | its preemptions | preemption could save the optimum at most |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        best_without = (
            min(r["opt_no_evict"], r["opt_evict"]) if r["opt_evict_preemptions"] == 0 else r["opt_no_evict"]
        )
        lines.append(
            f"| {r['workload']} | {r['window']} | {r['vllm(preemption=recompute)']:.2f} "
            f"| {r['vllm(preemption=none)']:.2f} | {r['sjf(preemption=recompute)']:.2f} "
            f"| {r['sjf(preemption=none)']:.2f} | {r['opt_no_evict']:.2f} ({100 * r['opt_no_evict_gap']:.2f}%) "
            f"| {r['opt_evict']:.2f} [{r['opt_evict_bound']:.2f}] | {r['opt_evict_preemptions']} "
            f"| {100 * (1 - r['opt_evict_bound'] / best_without):.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("a", "b", "both"), default="both")
    parser.add_argument("--requests", type=int, default=1000, help="requests per workload in part A")
    parser.add_argument("--rate-scale", type=float, default=8.0, help="arrival-rate multiplier (default 8)")
    parser.add_argument("--window", type=int, default=64, help="requests per window in part B")
    parser.add_argument("--windows", type=int, default=2, help="windows per workload in part B")
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    arch, hw = load_model("llama-2-7b"), get_hardware("a10g")
    cost = roofline_without_attention_term(arch, hw, 1)
    blocks = kv_capacity_blocks(arch, hw, block_size=16) - 1
    print(f"llama-2-7b on a10g: {blocks} usable KV blocks; cost {cost}")
    out = {}
    if args.part in ("a", "both"):
        out["a"] = part_a(cost, blocks, args.requests, args.rate_scale)
        print(markdown_a(out["a"]))
    if args.part in ("b", "both"):
        out["b"] = part_b(cost, blocks // 4, args.window, args.windows, args.rate_scale, args.time_limit)
        print(markdown_b(out["b"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
