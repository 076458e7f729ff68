"""Replay speed with prefix caching modelled, against the simulator before it (issue 11, item 8).

The Azure conversation hour and the bundled Mooncake conversation trace are replayed under vLLM's defaults
(Llama-2-7B on an A100, roofline prior, KV blocks of 16 tokens computed from memory) by the simulator as it was
before prefix caching (`--before`, a commit; loaded from git into this process) and by today's, with prefix
caching off and on, in one process, alternating, timing CPU seconds (the machine is shared and loaded). Mooncake's
hash ids (one per 512 prompt tokens) become per-16-token block hashes as `shadow replay` makes them
(`vllm_shadow.adapters.traces.block_hashes_for`: an engine block takes the id of the trace block holding its last
token, with its position; a trace block the prompt covers in part is not shared). The target: caching on within
1.5x of caching off. Which core and which prefix cache run (compiled or plain Python, VLLM_SHADOW_PURE_PYTHON=1
for both) is printed. `--pool-before COMMIT` adds caching on with solver/kv_cache.py as it was at COMMIT (the pool's
names are swapped in the module of the simulator core in use), to time a change to the prefix cache in the same
process; `--pool-before pure` adds caching on with today's plain-Python pool (under the compiled core: the compiled
pool against the plain one, the same hits checked).

    python benchmarks/prefix_caching_speed.py [--rounds 5] [--before 907565e] [--pool-before COMMIT|pure]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_shadow.adapters.traces import read_trace, resolve_trace, with_block_hashes
from vllm_shadow.costmodel.architecture import load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks
from vllm_shadow.costmodel.roofline import roofline_prior
from vllm_shadow.solver import kv_cache
from vllm_shadow.solver import simulator as current

BLOCK_SIZE = 16
POLICY = "vllm"


def load_module_at(commit: str, source_path: str, name: str):
    """A source file as it was at `commit`, as a module of its own (`name`) beside today's."""
    source = subprocess.run(
        ["git", "show", f"{commit}:{source_path}"],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def load_simulator_at(commit: str):
    """solver/simulator.py as it was at `commit`, as a module of its own beside today's."""
    return load_module_at(commit, "solver/simulator.py", "simulator_before")


# The names simulator.py takes from solver.kv_cache (swapped to time another version of the pool).
POOL_NAMES = ("BlockPool", "PrivateRun", "num_blocks", "num_held_blocks")


def simulate_with_pool(pool_module):
    """current.simulate with the prefix cache of `pool_module`; today's pool is put back afterwards. The names are
    swapped in the module `simulate` comes from: the compiled core looks them up in its own module's globals."""
    core = sys.modules[current.simulate.__module__]

    def simulate(*args, **kwargs):
        today = {name: getattr(core, name) for name in POOL_NAMES}
        for name in POOL_NAMES:
            setattr(core, name, getattr(pool_module, name))
        try:
            return current.simulate(*args, **kwargs)
        finally:
            for name, value in today.items():
                setattr(core, name, value)

    return simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", default="907565e", help="the commit before prefix caching was modelled")
    parser.add_argument("--azure-only", action="store_true")
    parser.add_argument(
        "--pool-before",
        help="also time caching on with solver/kv_cache.py at this commit (or 'pure': today's .py)",
    )
    args = parser.parse_args()
    arch, hw = load_model("llama-2-7b"), get_hardware("a100")
    cost, blocks = roofline_prior(arch, hw, 1), kv_capacity_blocks(arch, hw, block_size=BLOCK_SIZE)
    before = load_simulator_at(args.before)
    azure = read_trace(resolve_trace("azure-conv")).requests
    mooncake_trace = read_trace(
        resolve_trace("mooncake-conv"), max_prompt_tokens=(blocks - 1) * BLOCK_SIZE // 2
    )
    mooncake = with_block_hashes(mooncake_trace, BLOCK_SIZE)
    variants = {
        "before": (before.simulate, POLICY),
        "caching off": (current.simulate, POLICY),
        "caching on": (current.simulate, f"{POLICY}(enable_prefix_caching=true)"),
    }
    if args.pool_before:
        pool_before = (
            kv_cache.pure_pool()
            if args.pool_before == "pure"
            else load_module_at(args.pool_before, "solver/kv_cache.py", "kv_cache_before")
        )
        variants["pool before"] = (simulate_with_pool(pool_before), f"{POLICY}(enable_prefix_caching=true)")
    core = "compiled" if getattr(current, "COMPILED", False) else "plain Python"
    pool = "compiled" if getattr(kv_cache, "COMPILED", False) else "plain Python"
    print(
        f"{blocks:,} KV blocks of {BLOCK_SIZE}; {core} core, {pool} prefix cache; {args.rounds} rounds, alternating; "
        "CPU time per request"
    )
    pool_columns = f" caching on, pool at {args.pool_before} | its on / off |" if args.pool_before else ""
    print(
        "| trace | requests | before (us/request) | caching off | caching on | on / off | on / before | hit tokens |"
        + pool_columns
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.pool_before else ""))
    traces = [("Azure conversation hour", azure), ("Mooncake conversation", mooncake)]
    for name, requests in traces[:1] if args.azure_only else traces:
        times: dict[str, list[float]] = {v: [] for v in variants}
        hits = hits_before = 0
        for _ in range(args.rounds):
            for label, (simulate, policy) in variants.items():
                started = time.process_time()
                result = simulate(requests, policy, cost, num_kv_blocks=blocks, block_size=BLOCK_SIZE)
                times[label].append(time.process_time() - started)
                if label == "caching on":
                    hits = sum(r.num_cached_tokens for r in result.requests)
                elif label == "pool before":
                    hits_before = sum(r.num_cached_tokens for r in result.requests)
        per_request = {label: statistics.median(t) / len(requests) * 1e6 for label, t in times.items()}
        print(
            f"| {name} | {len(requests):,} | {per_request['before']:.2f} | {per_request['caching off']:.2f} "
            f"| {per_request['caching on']:.2f} | {per_request['caching on'] / per_request['caching off']:.2f}x "
            f"| {per_request['caching on'] / per_request['before']:.2f}x "
            f"| {hits:,} |"
            + (
                f" {per_request['pool before']:.2f} | {per_request['pool before'] / per_request['caching off']:.2f}x |"
                if args.pool_before
                else ""
            ),
            flush=True,
        )
        if args.pool_before and hits_before != hits:
            raise SystemExit(f"the pool at {args.pool_before} hit {hits_before:,} tokens, today's {hits:,}")


if __name__ == "__main__":
    sys.exit(main())
