"""Replay speed against Microsoft's Vidur (MLSys'24) on the work Vidur was measured on.

Llama-2-7B on one A100, the first 1,000 and 10,000 requests of the Azure 2023 conversation trace (real arrival
times), the vLLM scheduler (batch cap 128, 4,096 tokens per batch) and Sarathi (chunk 512). Vidur's figures on a
2-core machine of this kind, warm, plots and metric files off (from the project's issue tracker):

    10,000 requests, vLLM: 33,035 batches, event loop 7.4-7.8 s, whole process 11.6-12.0 s, 1.6 GB
     1,000 requests, vLLM:  6,065 batches, event loop 0.92-0.99 s, whole process 4.7-5.2 s
    Sarathi: about the same. First run on a new model/GPU: ~20 minutes training its predictors.

Vidur itself cannot run here (PyPI vidur 0.0.26 downloads its profiles at run time and crashes at its first
preemption), so its figures are the published ones; ours are measured in this process (loop = the `simulate`
call, every per-request record produced) and in a fresh interpreter (whole process, peak RSS).

    python benchmarks/replay_speed.py            # prints a markdown table; --write updates RESULTS-replay.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vllm_shadow.adapters.traces import read_trace, resolve_trace
from vllm_shadow.costmodel.architecture import load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks
from vllm_shadow.costmodel.roofline import roofline_prior
from vllm_shadow.solver.simulator import simulate

VIDUR = {  # requests -> (batches, loop seconds (low, high), process seconds (low, high), peak memory GB)
    10_000: (33_035, (7.4, 7.8), (11.6, 12.0), 1.6),
    1_000: (6_065, (0.92, 0.99), (4.7, 5.2), None),
}
POLICIES = {
    "vLLM V1 (chunked)": "vllm(max_num_seqs=128,max_num_batched_tokens=4096)",
    "vLLM V0 (prefill-first, Vidur's)": "vllm-v0(max_num_seqs=128,max_num_batched_tokens=4096)",
    "Sarathi (chunk 512)": "sarathi(max_num_seqs=128,max_num_batched_tokens=512)",
}
CANDIDATES_20 = [
    f"vllm(max_num_seqs={seqs},max_num_batched_tokens={tokens})"
    for seqs in (64, 128, 256)
    for tokens in (2048, 4096, 8192)
] + [
    "vllm(long_prefill_token_threshold=512)",
    "vllm(policy=priority)",
    "vllm(eviction=false)",
    "vllm-v0",
    "sarathi",
    "sarathi(max_num_batched_tokens=1024)",
    "orca",
    "lightllm",
    "sjf",
    "sof",
    "fastertransformer",
]

PROCESS_SCRIPT = """
import json, resource, sys, time
t0 = time.perf_counter()
from vllm_shadow.adapters.traces import read_trace, resolve_trace
from vllm_shadow.costmodel.architecture import load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks
from vllm_shadow.costmodel.roofline import roofline_prior
from vllm_shadow.solver.simulator import simulate
arch, hw = load_model("llama-2-7b"), get_hardware("a100")
trace = read_trace(resolve_trace("azure-conv"), limit=int(sys.argv[1]))
res = simulate(trace.requests, sys.argv[2], roofline_prior(arch, hw, 1),
               num_kv_blocks=kv_capacity_blocks(arch, hw, block_size=16), block_size=16)
assert len(res.requests) == int(sys.argv[1]) and all(r.finish == r.finish for r in res.requests)
print(json.dumps({"process_s": time.perf_counter() - t0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def engine():
    arch, hw = load_model("llama-2-7b"), get_hardware("a100")
    return roofline_prior(arch, hw, 1), kv_capacity_blocks(arch, hw, block_size=16)


def time_loop(requests, policy, cost, blocks, repeats):
    """Warm loop time: the median of `repeats` runs of `simulate`, after one warm-up."""
    simulate(requests, policy, cost, num_kv_blocks=blocks, block_size=16)
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = simulate(requests, policy, cost, num_kv_blocks=blocks, block_size=16)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def time_process(n, policy):
    out = subprocess.run(
        [sys.executable, "-c", PROCESS_SCRIPT, str(n), policy],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="write benchmarks/RESULTS-replay.md")
    args = parser.parse_args()
    cost, blocks = engine()
    lines = [
        f"Llama-2-7B on A100-80GB (roofline prior: a={cost.a * 1e3:.2f} ms, b={cost.b * 1e6:.1f} us/token, "
        f"c={cost.c * 1e9:.0f} ns/KV token), {blocks:,} KV blocks of 16 tokens; Azure conv 2023, real arrival times.",
        "",
        "| requests | scheduler | batches (Vidur) | loop s (Vidur) | loop speed-up | us/request/batch | "
        "process s (Vidur) | process speed-up | peak RSS MB (Vidur) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in (1_000, 10_000):
        requests = read_trace(resolve_trace("azure-conv"), limit=n).requests
        v_batches, v_loop, v_proc, v_mem = VIDUR[n]
        for label, policy in POLICIES.items():
            loop_s, result = time_loop(requests, policy, cost, blocks, args.repeats)
            proc = time_process(n, policy)
            per = loop_s / n / result.num_steps * 1e6
            v_loop_mid, v_proc_mid = sum(v_loop) / 2, sum(v_proc) / 2
            lines.append(
                f"| {n:,} | {label} | {result.num_steps:,} ({v_batches:,}) | {loop_s:.3f} ({v_loop[0]}-{v_loop[1]}) | "
                f"{v_loop_mid / loop_s:.0f}x | {per:.4f} | {proc['process_s']:.2f} ({v_proc[0]}-{v_proc[1]}) | "
                f"{v_proc_mid / proc['process_s']:.1f}x | {proc['rss_mb']:.0f} ({v_mem * 1000 if v_mem else '-'}) |"
            )
            print(lines[-1], flush=True)
    whole = read_trace(resolve_trace("azure-conv")).requests
    started = time.perf_counter()
    steps = sum(
        simulate(whole, p, cost, num_kv_blocks=blocks, block_size=16).num_steps for p in CANDIDATES_20
    )
    hour = time.perf_counter() - started
    lines += [
        "",
        f"The whole hour ({len(whole):,} requests) under 20 candidate configurations, one core: "
        f"{hour:.2f} s ({steps:,} simulated steps).",
        "",
        "Candidates: " + ", ".join(CANDIDATES_20),
    ]
    print("\n".join(lines))
    if args.write:
        out = Path(__file__).with_name("RESULTS-replay.md")
        out.write_text(
            "# Replay speed against Vidur\n\nReproduce: `python benchmarks/replay_speed.py --write`\n\n"
            + "\n".join(lines)
            + "\n"
        )


if __name__ == "__main__":
    main()
