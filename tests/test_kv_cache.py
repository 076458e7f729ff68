"""The run-based prefix cache (solver.kv_cache) against vLLM's block pool written block by block: the same hits
(which block, inserted when, at every position), the same reference counts and the same eviction order, under
random admissions, chunked caching, frees and evictions over chained hashes with shared prefixes."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_shadow.solver.kv_cache import BlockPool, CachedRun, held_runs, num_blocks, num_held_blocks


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
        assert isinstance(run, CachedRun)
        order += [(run.block_hashes[i], run.stamp) for i in range(run.hi - 1, run.lo - 1, -1)]
    return order


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_runs_behave_as_vllm_s_blocks(rng):
    # A few families of prompts sharing their first blocks, branching, then each request's own blocks; requests
    # admitted with a capped lookup (vLLM hits at most num_tokens - 1) and cached chunk by chunk, so that blocks
    # are cached twice (duplicates), hit in part, freed in part and evicted in part.
    hashes = [
        chain(rng.randrange(2), rng.randrange(3), rng.randrange(14), i, rng.randint(1, 14)) for i in range(8)
    ]
    operations = [
        (
            rng.choice(["admit", "admit", "cache", "cache", "free", "evict"]),
            rng.randrange(8),
            rng.randint(0, 14),
        )
        for _ in range(120)
    ]
    pool, reference = BlockPool(), PerBlockPool()
    held: dict[int, list] = {}  # running request -> its entries (runs) / its blocks (reference)
    reference_held: dict[int, list[Block]] = {}
    inserts = 0
    for kind, r, amount in operations:
        if kind == "admit" and r not in held:
            hit = pool.find_longest_cache_hit(hashes[r], amount)
            expected = reference.lookup(hashes[r], amount)
            assert stamps(hit) == [b.stamp for b in expected]  # the same block at every position
            assert num_held_blocks(hit) == sum(b.ref_cnt > 0 for b in expected)
            taken = pool.touch(hit)
            assert taken == sum(b.ref_cnt == 0 for b in expected)
            reference.touch(expected)
            held[r], reference_held[r] = hit, expected
        elif kind == "cache" and r in held:
            end = min(num_blocks(held[r]) + amount, len(hashes[r]))
            if end > num_blocks(held[r]):
                inserts += 1
                start = num_blocks(held[r])
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
        assert pool.num_queued_blocks == len(reference.free_queue)
        assert eviction_order(pool) == [(b.block_hash, b.stamp) for b in reference.free_queue]
        for request, entries in held.items():  # reference counts, run by run
            runs = held_runs(entries)
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
