"""The compiled simulator core against the plain-Python one, in one process, alternating.

The same `simulate` calls through both cores (solver/simulator.py as Cython compiled it, with the prefix cache
solver/kv_cache.py as Cython compiled it, and the same two files run as Python): the first 10,000 requests of the
bundled Azure conversation trace under vLLM (cap 128, 4,096 tokens) and Sarathi (chunk 512) on the replay
benchmark's engine (Llama-2-70B TP 2 on A100, roofline prior, the trace
clipped as for Vidur), prefix caching off and on; then the whole Azure hour under the replay benchmark's 20
candidates (Llama-2-7B on one A100, the trace unclipped). Each figure is the median over the repetitions of CPU
seconds (and wall seconds) for one `simulate` call, results checked equal between the cores.

    python benchmarks/compiled_core_speed.py [--repeats 5] [--hour-repeats 1]

`--hour-only` times only the compiled core on the whole hour, candidate by candidate (median CPU seconds of
`--hour-repeats` passes, each pass the 20 candidates in turn), without the plain-Python core:

    python benchmarks/compiled_core_speed.py --hour-only --hour-repeats 3

`--one ROW` runs only one `simulate` call of the compiled core: row ROW (0-4) of benchmarks/replay_speed.py's
ROWS on its first 10,000 requests, untimed, for an instruction count that does not depend on the machine's load:

    valgrind --tool=callgrind --toggle-collect='__pyx_pw_*_simulator_compiled_*simulate' \
        python benchmarks/compiled_core_speed.py --one 3

`--hour-one N` runs only the compiled core on the whole hour under candidate N (0-19 of replay_speed.py's
CANDIDATES_20; -1: all 20 in turn), untimed, for the same kind of instruction count:

    valgrind --tool=callgrind --toggle-collect='__pyx_pw_*_simulator_compiled_*simulate' \
        python benchmarks/compiled_core_speed.py --hour-one 11
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.replay_speed import (
    BLOCK_SIZE,
    CANDIDATES_20,
    HARDWARE,
    MODEL,
    ROWS,
    TP,
    load_slice,
    project_cost,
)
from vllm_shadow.adapters.traces import read_trace, resolve_trace
from vllm_shadow.costmodel.architecture import load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.costmodel.roofline import roofline_prior
from vllm_shadow.solver import kv_cache, simulator

POLICIES = {
    "vLLM (cap 128, 4,096 tokens)": "vllm(max_num_seqs=128,max_num_batched_tokens=4096)",
    "Sarathi (chunk 512)": "sarathi(max_num_seqs=128,max_num_batched_tokens=512)",
}


def timed(call: Callable[[], object]) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return time.process_time() - cpu, time.perf_counter() - wall, result


def alternate(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float, object]]:
    """Median CPU and wall seconds of each call, the calls interleaved so that load on the machine hits all."""
    samples: dict[str, list[tuple[float, float, object]]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            samples[name].append(timed(call))
    return {
        name: (
            statistics.median(s[0] for s in runs),
            statistics.median(s[1] for s in runs),
            runs[-1][2],
        )
        for name, runs in samples.items()
    }


VIDUR_KV_BLOCKS = 3_328  # see benchmarks/RESULTS-replay.md


def one_call(row: int) -> None:
    """One `simulate` call of the compiled core on the replay benchmark's row `row` (see --one)."""
    compiled = simulator.compiled_core()
    if compiled is None or simulator.stale_sources(compiled):
        sys.exit("the compiled core is not built or is older than its source: `pip install -e .` first")
    # The replay benchmark's KV: Vidur's memory planner's 3,328 blocks for this engine, plus vLLM's null block.
    blocks = VIDUR_KV_BLOCKS + 1
    requests, policy = load_slice(10_000), ROWS[row].policy
    result = compiled.simulate(requests, policy, project_cost(), num_kv_blocks=blocks, block_size=BLOCK_SIZE)
    print(f"{ROWS[row].label}: {policy}, {len(requests):,} requests, {result.num_steps:,} steps")


def _hour_setup() -> tuple[ModuleType, list, LinearCostModel, int]:
    """The compiled core (exits if it is not built and current), the whole Azure hour, and Llama-2-7B's cost
    model and KV blocks on one A100: what --hour-one and --hour-only run."""
    compiled = simulator.compiled_core()
    if compiled is None or simulator.stale_sources(compiled):
        sys.exit("the compiled core is not built or is older than its source: `pip install -e .` first")
    arch, hw = load_model("llama-2-7b"), get_hardware("a100")
    hour = read_trace(resolve_trace("azure-conv")).requests
    return compiled, hour, roofline_prior(arch, hw, 1), kv_capacity_blocks(arch, hw, block_size=BLOCK_SIZE)


def hour_one(candidate: int) -> None:
    """One candidate's (or, -1, every candidate's) compiled `simulate` call on the whole hour (see --hour-one)."""
    compiled, hour, cost, blocks = _hour_setup()
    for p in CANDIDATES_20 if candidate == -1 else [CANDIDATES_20[candidate]]:
        result = compiled.simulate(hour, p, cost, num_kv_blocks=blocks, block_size=BLOCK_SIZE)
        print(f"{p}: {len(hour):,} requests, {result.num_steps:,} steps")


def hour_only(repeats: int) -> None:
    """The compiled core on the whole Azure hour under each of the 20 candidates (see --hour-only)."""
    compiled, hour, cost, blocks = _hour_setup()
    per_candidate: dict[str, list[float]] = {p: [] for p in CANDIDATES_20}
    passes = []
    for _ in range(repeats):
        start = time.process_time()
        for p in CANDIDATES_20:
            cpu, _, _ = timed(
                lambda p=p: compiled.simulate(hour, p, cost, num_kv_blocks=blocks, block_size=BLOCK_SIZE)
            )
            per_candidate[p].append(cpu)
        passes.append(time.process_time() - start)
    for p, cpus in per_candidate.items():
        print(f"{p}: {statistics.median(cpus):.3f} s CPU")
    print(
        f"The whole hour ({len(hour):,} requests) under the 20 candidates, compiled core: median "
        f"{statistics.median(passes):.2f} s CPU over {repeats} passes ({', '.join(f'{c:.2f}' for c in passes)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hour-repeats", type=int, default=1)
    parser.add_argument("--one", type=int, metavar="ROW", help="one compiled simulate call of a replay row")
    parser.add_argument("--hour-only", action="store_true", help="only the compiled core on the whole hour")
    parser.add_argument("--hour-one", type=int, metavar="N", help="one compiled simulate call on the hour")
    args = parser.parse_args()
    if args.one is not None:
        one_call(args.one)
        return
    if args.hour_one is not None:
        hour_one(args.hour_one)
        return
    if args.hour_only:
        hour_only(args.hour_repeats)
        return
    compiled, pool = simulator.compiled_core(), kv_cache.compiled_pool()
    if compiled is None or simulator.stale_sources(compiled) or pool is None or kv_cache.stale_sources(pool):
        sys.exit(
            "the compiled core or pool is not built or is older than its source: `pip install -e .` first"
        )
    if not kv_cache.COMPILED:
        sys.exit("the compiled pool is not in use (VLLM_SHADOW_PURE_PYTHON is set?)")
    # pure_core(): solver/simulator.py as plain Python over the plain-Python prefix cache.
    cores = {"pure": simulator.pure_core(), "compiled": compiled}

    cost = project_cost()
    blocks = kv_capacity_blocks(load_model(MODEL), get_hardware(HARDWARE), tp=TP, block_size=BLOCK_SIZE)
    requests = load_slice(10_000)
    print(
        f"{len(requests):,} requests, {MODEL} TP {TP} on {HARDWARE}, {blocks:,} KV blocks; median of {args.repeats}"
    )
    print(
        "| scheduler | prefix caching | steps | pure CPU s | compiled CPU s | speed-up "
        "| pure wall s | compiled wall s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, spec in POLICIES.items():
        for caching in (False, True):
            policy = spec.replace(")", ",enable_prefix_caching=true)") if caching else spec
            runs = alternate(
                {
                    name: lambda core=core, policy=policy: core.simulate(
                        requests, policy, cost, num_kv_blocks=blocks, block_size=BLOCK_SIZE
                    )
                    for name, core in cores.items()
                },
                args.repeats,
            )
            (p_cpu, p_wall, p_res), (c_cpu, c_wall, c_res) = runs["pure"], runs["compiled"]
            assert c_res.requests == p_res.requests and c_res.gpu_seconds == p_res.gpu_seconds  # type: ignore[attr-defined]
            print(
                f"| {label} | {'on' if caching else 'off'} | {c_res.num_steps:,} | {p_cpu:.3f} | {c_cpu:.3f} | "  # type: ignore[attr-defined]
                f"{p_cpu / c_cpu:.1f}x | {p_wall:.3f} | {c_wall:.3f} |",
                flush=True,
            )

    arch, hw = load_model("llama-2-7b"), get_hardware("a100")
    hour = read_trace(resolve_trace("azure-conv")).requests
    hour_cost, hour_blocks = roofline_prior(arch, hw, 1), kv_capacity_blocks(arch, hw, block_size=BLOCK_SIZE)

    def all_candidates(core) -> int:
        return sum(
            core.simulate(hour, p, hour_cost, num_kv_blocks=hour_blocks, block_size=BLOCK_SIZE).num_steps
            for p in CANDIDATES_20
        )

    runs = alternate(
        {name: lambda core=core: all_candidates(core) for name, core in cores.items()}, args.hour_repeats
    )
    (p_cpu, p_wall, p_steps), (c_cpu, c_wall, c_steps) = runs["pure"], runs["compiled"]
    assert p_steps == c_steps
    print(
        f"\nThe whole hour ({len(hour):,} requests, Llama-2-7B on one A100) under the 20 candidates of "
        f"benchmarks/replay_speed.py, {c_steps:,} steps: pure {p_cpu:.2f} s CPU ({p_wall:.2f} s wall), "
        f"compiled {c_cpu:.2f} s CPU ({c_wall:.2f} s wall), {p_cpu / c_cpu:.1f}x"
    )


if __name__ == "__main__":
    main()
