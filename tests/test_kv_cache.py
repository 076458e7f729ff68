"""The run-based prefix cache (solver.kv_cache) against vLLM's block pool written block by block: the same hits
(which block, inserted when, at every position), the same reference counts and the same eviction order, under
random admissions, chunked caching, frees and evictions over chained hashes with shared prefixes. Both builds of
the pool are held to it, and to each other: the compiled one (solver/kv_cache.py built by Cython, see setup.py)
gives the plain-Python one's every result and state on random operation sequences, and inside the simulator."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.compiled_support import current_build
from tests.test_compiled_core import COST, policies, view, workloads
from vllm_shadow.solver import kv_cache, simulator
from vllm_shadow.solver.kv_cache import BlockPool, CachedRun, num_blocks


def pools() -> tuple[ModuleType, ModuleType]:
    """(compiled, pure); skips only where the build was skipped on purpose, fails anywhere else."""
    compiled = current_build(
        kv_cache.compiled_pool(), kv_cache.COMPILED_MODULE, "prefix cache", kv_cache.stale_sources
    )
    return compiled, kv_cache.pure_pool()


@dataclass(eq=False)
class Block:
    block_hash: object
    stamp: int  # the insertion it came from
    ref_cnt: int = 1


@dataclass
class PerBlockPool:
    """vLLM's BlockPool and free queue over cached blocks, one block at a time (the reference)."""

    by_hash: dict[object, list[Block]] = field(default_factory=dict)  # insertion order: the first is taken
    free_queue: list[Block] = field(default_factory=list)

    def lookup(self, hashes: tuple, max_num_blocks: int) -> list[Block]:
        hit = []
        for block_hash in hashes[:max_num_blocks]:
            blocks = self.by_hash.get(block_hash)
            if not blocks:
                break
            hit.append(blocks[0])
        return hit

    def touch(self, blocks: list[Block]) -> None:
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache(self, hashes: tuple, stamp: int) -> list[Block]:
        blocks = [Block(h, stamp) for h in hashes]
        for block in blocks:
            self.by_hash.setdefault(block.block_hash, []).append(block)
        return blocks

    def free(self, blocks: list[Block]) -> None:
        for block in reversed(blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def evict_to(self, num_free_blocks: int) -> None:
        while len(self.free_queue) > num_free_blocks:
            block = self.free_queue.pop(0)
            self.by_hash[block.block_hash].remove(block)


def chain(family: int, branch: int, shared: int, request: int, length: int) -> tuple:
    """Chained hashes: a family's first blocks, a branch of it, then blocks of the request's own."""
    return tuple(
        (family, j) if j < 2 else (family, branch, j) if j < shared else (family, "own", request, j)
        for j in range(length)
    )


def stamps(entries) -> list[int]:
    return [run.stamp for run, lo, hi in entries for _ in range(lo, hi)]


def eviction_order(pool: BlockPool) -> list[tuple[object, int]]:
    """The queued blocks front first, as (hash, stamp): each run is evicted from its tail."""
    order = []
    for run in pool.queued():
        assert type(run).__name__ == CachedRun.__name__  # of either build
        order += [(run.block_hashes[i], run.stamp) for i in range(run.hi - 1, run.lo - 1, -1)]
    return order


@pytest.mark.parametrize("build", ["compiled", "pure"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False))
def test_runs_behave_as_vllm_s_blocks(build, rng):
    kv = dict(zip(("compiled", "pure"), pools(), strict=True))[build]
    # A few families of prompts sharing their first blocks, branching, then each request's own blocks; requests
    # admitted with a capped lookup (vLLM hits at most num_tokens - 1) and cached chunk by chunk, so that blocks
    # are cached twice (duplicates), hit in part, freed in part and evicted in part.
    hashes = [
        chain(rng.randrange(2), rng.randrange(3), rng.randrange(14), i, rng.randint(1, 14)) for i in range(8)
    ]
    operations = [
        (
            rng.choice(["admit", "admit", "cache", "cache", "free", "evict", "block"]),
            rng.randrange(8),
            rng.randint(0, 14),
        )
        for _ in range(120)
    ]
    pool, reference = kv.BlockPool(), PerBlockPool()
    held: dict[int, list] = {}  # running request -> its entries (runs) / its blocks (reference)
    reference_held: dict[int, list[Block]] = {}
    inserts = 0
    for kind, r, amount in operations:
        if kind == "admit" and r not in held:
            hit = pool.find_longest_cache_hit(hashes[r], amount)
            expected = reference.lookup(hashes[r], amount)
            assert stamps(hit) == [b.stamp for b in expected]  # the same block at every position
            assert kv.num_held_blocks(hit) == sum(b.ref_cnt > 0 for b in expected)
            taken = pool.touch(hit)
            assert taken == sum(b.ref_cnt == 0 for b in expected)
            reference.touch(expected)
            held[r], reference_held[r] = hit, expected
        elif kind == "cache" and r in held:
            end = min(kv.num_blocks(held[r]) + amount, len(hashes[r]))
            if end > kv.num_blocks(held[r]):
                inserts += 1
                start = kv.num_blocks(held[r])
                pool.cache_full_blocks(held[r], hashes[r], end)
                reference_held[r] += reference.cache(hashes[r][start:end], inserts)
        elif kind == "free" and r in held:
            freed = pool.free_blocks(held.pop(r))
            before = len(reference.free_queue)
            reference.free(reference_held.pop(r))
            assert freed == len(reference.free_queue) - before
        elif kind == "evict":
            target = max(pool.num_queued_blocks - amount, 0)
            pool.evict_to(target)
            reference.evict_to(target)
        elif kind == "block":  # a block cached alone (a cache rebuilt from a recording), at any position
            inserts += 1
            block_hash = hashes[r][amount % len(hashes[r])]
            pool.free_block(pool.cache_full_block(block_hash))
            reference.free(reference.cache((block_hash,), inserts))
        assert pool.num_queued_blocks == len(reference.free_queue)
        assert eviction_order(pool) == [(b.block_hash, b.stamp) for b in reference.free_queue]
        for request, entries in held.items():  # reference counts, run by run
            runs = kv.held_runs(entries)
            blocks = reference_held[request]
            assert [run.ref_cnt for run in runs for _ in range(run.lo, run.hi)] == [b.ref_cnt for b in blocks]
        assert pool.num_cached_blocks() == sum(len(blocks) for blocks in reference.by_hash.values())


def test_a_hit_takes_runs_starting_inside_it():
    # The lookup's shortcut (one run found from the start) must still see runs starting inside its match or at
    # its end: the next chunk of the same chain, a duplicate inserted later, and a cap that stops before a run.
    chain_a = tuple(range(10))
    pool = BlockPool()
    first: list = []
    pool.cache_full_blocks(first, chain_a, 4)  # blocks 0..3, stamp 1
    pool.cache_full_blocks(first, chain_a, 10)  # blocks 4..9, stamp 2: the next chunk, a run of its own
    hit = pool.find_longest_cache_hit(chain_a, 10)
    assert [(run.stamp, lo, hi) for run, lo, hi in hit] == [(1, 0, 4), (2, 4, 10)]
    assert num_blocks(pool.find_longest_cache_hit(chain_a, 4)) == 4  # capped at the run's end
    assert num_blocks(pool.find_longest_cache_hit(chain_a, 3)) == 3  # capped inside it
    assert pool.find_longest_cache_hit(chain_a, 0) == []
    # A second request computed blocks 2..7 again (it hit 0..1 only): duplicates, inserted later, so the hit
    # keeps the first inserted blocks at every position.
    second = [(first[0][0], 0, 2)]
    pool.touch(second)
    pool.cache_full_blocks(second, chain_a, 8)
    hit = pool.find_longest_cache_hit(chain_a, 10)
    assert stamps(hit) == [1] * 4 + [2] * 6
    # Once the first request's blocks are freed and the free queue evicts its tail run (4..9), the duplicate
    # run 2..7 (stamp 3) continues the hit past block 3.
    pool.free_blocks(first)
    pool.evict_to(pool.num_queued_blocks - 6)
    assert stamps(pool.find_longest_cache_hit(chain_a, 10)) == [1] * 4 + [3] * 4
    # A chain that shares only its first blocks stops where the hashes differ.
    chain_b = (*chain_a[:3], "b3", "b4")
    assert stamps(pool.find_longest_cache_hit(chain_b, 5)) == [1] * 3


@pytest.mark.parametrize("build", ["compiled", "pure"])
def test_a_hit_goes_on_through_blocks_cached_alone(build):
    # Blocks cached one by one (a recording's free queue) sit at positions the pool cannot know: a lookup must
    # still find them inside or after a run, at any position, not only where runs of known position start.
    kv = dict(zip(("compiled", "pure"), pools(), strict=True))[build]
    chain_a = tuple(range(10))
    pool = kv.BlockPool()
    held: list = []
    pool.cache_full_blocks(held, chain_a, 5)  # blocks 0..4, stamp 1
    for block_hash in chain_a[5:8]:  # blocks 5, 6, 7 alone, stamps 2..4
        pool.free_block(pool.cache_full_block(block_hash))
    assert stamps(pool.find_longest_cache_hit(chain_a, 10)) == [1] * 5 + [2, 3, 4]
    pool.free_blocks(held)
    pool.evict_to(pool.num_queued_blocks - 4)  # blocks 5, 6, 7 were freed first, then block 4 (tail first)
    assert stamps(pool.find_longest_cache_hit(chain_a, 10)) == [1] * 4
    assert pool.num_unplaced_runs == 0 and pool.start_positions == [0]


# ---- the compiled pool against the plain-Python one ----------------------------------------------------------


def pool_state(kv: ModuleType, pool, held: dict[int, list]) -> dict:
    """Everything observable of a pool, in terms that do not depend on the build: runs as (stamp, lo, hi)."""

    def run_view(run) -> tuple:
        return run.stamp, run.lo, run.hi, run.ref_cnt

    queue = [
        ("private", run.lo, run.hi) if type(run) is kv.PrivateRun else ("run", *run_view(run))
        for run in pool.queued()
    ]
    return {
        "index": [
            (key, [run_view(run) for run in runs]) for key, runs in pool.cached_block_hash_to_block.items()
        ],
        "queue": queue,
        "counts": (pool.num_queued_blocks, pool.num_evicted_blocks, pool.version, pool.num_cached_blocks()),
        "held": {r: [run_view(run) for run in kv.held_runs(entries)] for r, entries in held.items()},
        "entries": {r: [(run.stamp, lo, hi) for run, lo, hi in entries] for r, entries in held.items()},
    }


def drive(kv: ModuleType, hashes: list[tuple], operations: list[tuple[str, int, int]]) -> list:
    """One random operation sequence on a fresh pool of build `kv`: what every call returned and the pool's whole
    state after it, as the simulator calls it (lookups capped, hits taken, chunked caching, private runs of
    preempted requests freed and re-hit, single blocks from a recording, evictions to a free-block count)."""
    pool = kv.BlockPool()
    held: dict[int, list] = {}
    private: dict[int, object] = {}
    trace: list = []
    for kind, r, amount in operations:
        if kind == "admit" and r not in held:
            hit = pool.find_longest_cache_hit(hashes[r], amount)
            looked_up = [(run.stamp, lo, hi) for run, lo, hi in hit]
            trace.append((looked_up, kv.num_blocks(hit), kv.num_held_blocks(hit), pool.touch(hit)))
            held[r] = hit
            run = private.pop(r, None)
            if run is not None and run.hi > run.lo:
                pool.take_private(run, min(amount % 3, run.hi - run.lo))
        elif kind == "initial" and r not in held:
            held[r] = []
            trace.append(pool.hold_initial(held[r], hashes[r], amount))
        elif kind == "cache" and r in held:
            pool.cache_full_blocks(held[r], hashes[r], min(kv.num_blocks(held[r]) + amount, len(hashes[r])))
        elif kind == "free" and r in held:
            entries = held.pop(r)
            if amount % 2:  # a preempted request's private blocks past its shared ones
                start = kv.num_blocks(entries)
                private[r] = pool.free_private_run(start, start + amount)
            trace.append(pool.free_blocks(entries))
        elif kind == "block":  # the free queue rebuilt block by block from a recording
            trace.append(pool.free_block(pool.cache_full_block(hashes[r][amount % len(hashes[r])])))
        elif kind == "evict":
            pool.evict_to(max(pool.num_queued_blocks - amount, 0))
        trace.append(pool_state(kv, pool, held))
    return trace


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False))
def test_compiled_pool_equals_pure_python(rng):
    compiled, pure = pools()
    hashes = [
        chain(rng.randrange(2), rng.randrange(3), rng.randrange(14), i, rng.randint(1, 14)) for i in range(8)
    ]
    kinds = ["admit", "admit", "initial", "cache", "cache", "free", "free", "block", "evict"]
    operations = [(rng.choice(kinds), rng.randrange(8), rng.randint(0, 14)) for _ in range(120)]
    assert drive(compiled, hashes, operations) == drive(pure, hashes, operations)


def simulator_on_pure_pool() -> ModuleType:
    """solver/simulator.py as plain Python over the plain-Python pool: the whole oracle. (The simulator takes its
    pool from solver.kv_cache when it is imported, which hands out the compiled pool where one is built.)"""
    name = "vllm_shadow.solver._simulator_on_pure_pool"
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, simulator.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    in_use = sys.modules["vllm_shadow.solver.kv_cache"]
    sys.modules["vllm_shadow.solver.kv_cache"] = kv_cache.pure_pool()
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        sys.modules["vllm_shadow.solver.kv_cache"] = in_use
    return module


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), policies())
def test_the_simulator_gives_the_same_results_on_either_pool(workload, policy):
    compiled, pure = pools()
    oracle = simulator_on_pure_pool()
    assert oracle.BlockPool is pure.BlockPool and simulator.BlockPool is compiled.BlockPool
    requests, initial, block_size, blocks = workload
    # The pool only runs with prefix caching, which only evicting presets take.
    policy = dataclasses.replace(policy, enable_prefix_caching=policy.eviction)

    def outcome(core: ModuleType) -> dict:
        try:
            return view(
                core.simulate(
                    requests,
                    policy,
                    COST,
                    initial_running=initial,
                    start_time=0.0 if initial else None,
                    num_kv_blocks=blocks,
                    block_size=block_size,
                    record_steps=True,
                )
            )
        except ValueError as exc:
            return {"refused": str(exc)}

    assert outcome(simulator) == outcome(oracle)


def _pool_in_a_fresh_interpreter(pure_python: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_SHADOW_PURE_PYTHON"}
    if pure_python is not None:
        env["VLLM_SHADOW_PURE_PYTHON"] = pure_python
    code = (
        "import warnings; warnings.simplefilter('ignore'); "
        "from vllm_shadow.solver import kv_cache as k, simulator as s; "
        "print(k.COMPILED, k.BlockPool.__module__, s.BlockPool.__module__, s.num_blocks is k.num_blocks)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_environment_selects_the_pool():
    pools()  # skips or fails where the compiled pool is absent
    compiled = kv_cache.COMPILED_MODULE
    assert _pool_in_a_fresh_interpreter(None) == f"True {compiled} {compiled} True"
    # The fallback truly runs the .py source: the module's own classes, not the build's.
    pure = "False vllm_shadow.solver.kv_cache vllm_shadow.solver.kv_cache True"
    assert _pool_in_a_fresh_interpreter("1") == pure
    assert _pool_in_a_fresh_interpreter("0").startswith("True ")
