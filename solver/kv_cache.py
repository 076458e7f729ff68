"""vLLM's prefix cache, for the simulator: its block pool's cached blocks, their reference counts and its free
queue's eviction order (vllm/v1/core/block_pool.py and kv_cache_utils.py, 0.32), with vLLM's names.

What is replicated:
  * `BlockPool.cached_block_hash_to_block`: a block hash leads to the cached block(s) holding it; duplicates are
    kept, and a lookup takes the first inserted, as vLLM's `BlockHashToBlockMap`.
  * vLLM's `FreeKVCacheBlockQueue` holds, front to back, the free blocks without a hash (freed blocks without a
    hash are prepended) and then the cached blocks nobody uses, in the order they were freed (appended; a request
    frees its blocks in reverse, so its tail is evicted first). A free block without a hash is indistinguishable
    from another, so that front part is a count kept by the simulator (its free blocks minus this queue's
    length), and only the cached part is a queue here: `free_block_queue`, least recently freed first.
  * Allocation takes from the front: free blocks without a hash first, then the least recently freed cached
    block, whose hash is evicted. The simulator counts allocations and calls `evict_to(num_free_blocks)` before
    anything that depends on the queue's order (a lookup, a free): only pops happen in between, so evicting
    the surplus at once is exact.

How it is kept cheap: by runs of blocks, never block by block.
  * vLLM's block hashes are chained (a block's hash covers its whole prefix), so equal hashes at one position
    mean equal hashes at every earlier one. A `CachedRun` is blocks lo..hi-1 of one chain (its `block_hashes`
    tuple, shared with the request that computed them, never copied), all with one reference count and one
    insertion stamp; the pool indexes a run by the hash of its first block only. A request's prompt of 750
    blocks computed in two chunks is two runs: caching, freeing and evicting it costs a few dictionary and
    queue operations, not 750 of each.
  * A lookup walks the request's hashes from the start: a run found by its first hash matches for as long as
    its last matching hash says (a binary search on the chain), and only the positions the hit covers are
    looked up for runs starting there (a duplicate or a longer chain), and of those only the ones at which
    some run starts at all (`start_positions`, kept sorted, with a count per position in `run_starts`: a
    run's blocks sit at the same positions in every chain holding its hashes, so a run starting at a position
    of this chain has that `lo`). At each position the hit takes
    the run inserted first among those covering it: vLLM's choice among duplicates.
  * A hit on part of a run splits it where the hit starts and ends (each part keeps the stamp and the
    reference count; the part hit gains a reference), so reference counts stay uniform within a run. A held
    run split keeps its first part as the same object and links the next (`next`), so each holder walks its
    runs as they were when it took them. A free run split by a hit leaves its two remaining parts in its place
    in the free queue, in vLLM's order (its tail part, then its head part).
  * A request's held blocks are a list of (run, lo, hi) entries, in the order of its block table: the blocks
    lo..hi-1 of that run's chain at the time it took them (the run and its `next` successors cover them).
  * A block whose tokens no other request can share (generated tokens, or a prompt without published hashes)
    can only ever be hit by its own request once resumed: while its request holds it, it is only counted; when
    its request frees it, its request's private blocks enter the queue as one `PrivateRun` (evicted tail first).
  * One case is not literal: a priority victim preempted after its blocks for the step were cached may leave a
    cached block its resume cannot hit (vLLM caps a hit at num_tokens - 1); vLLM keeps it as a duplicate that a
    later lookup prefers, here it stays in the queue unreferenced. The queue's order and counts are the same.

This file is also the compiled pool: setup.py compiles it with Cython beside the simulator core, under its own name
(`vllm_shadow.solver._kv_cache_compiled`, with the C types of _kv_cache_compiled.pxd), and this module hands out
that build's classes and functions (see the end of the file), so that both simulator cores use it; `COMPILED` says
which pool runs. The plain Python stays the oracle (`pure_pool()`) and the fallback: VLLM_SHADOW_PURE_PYTHON=1
selects it, as it selects the plain-Python simulator core.
"""

from __future__ import annotations

import sys
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from itertools import compress, pairwise
from pathlib import Path
from types import ModuleType

from vllm_shadow.solver import compiled_build

# A request's held (or hit) blocks: (run, lo, hi), blocks lo..hi-1 of the run's chain, in block-table order.
HeldEntry = tuple["CachedRun", int, int]


class CachedRun:
    """Cached blocks lo..hi-1 of a chain of block hashes, with one reference count (vLLM's `ref_cnt`: the running
    requests holding them) and one insertion stamp (vLLM's order among blocks with the same hash)."""

    __slots__ = ("block_hashes", "entry", "hi", "lo", "next", "placed", "ref_cnt", "stamp")

    def __init__(self, block_hashes: Sequence[Hashable], lo: int, hi: int, ref_cnt: int, stamp: int) -> None:
        self.block_hashes = block_hashes
        self.lo = lo
        self.hi = hi
        self.ref_cnt = ref_cnt
        self.stamp = stamp
        self.next: CachedRun | None = None  # the run that took over hi.. when this one was split
        self.entry: FreeEntry | None = None  # its place in the free queue while nobody holds it
        # Whether lo is the blocks' position in every chain holding their hashes; not for a block cached alone
        # (`BlockPool.cache_full_block`), whose position is not known.
        self.placed = True

    def __repr__(self) -> str:
        return f"CachedRun({self.lo}..{self.hi}, ref_cnt={self.ref_cnt}, stamp={self.stamp})"


class FreeEntry:
    """Runs freed together, in the free queue's order: each is evicted from its tail, then the next."""

    __slots__ = ("runs",)

    def __init__(self, runs: list[CachedRun]) -> None:
        self.runs = runs


class PrivateRun:
    """A freed request's private cached blocks: positions lo..hi-1 of its block table, freed tail first, so the
    queue evicts hi-1 first. Its request hits lo.. on resume."""

    __slots__ = ("hi", "lo")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo = lo
        self.hi = hi


def num_blocks(entries: list[HeldEntry]) -> int:
    """The blocks a request holds (or a lookup hit)."""
    if len(entries) == 1:  # the common case: called several times a request
        entry = entries[0]
        return entry[2] - entry[1]
    total = 0  # a loop, not sum() over a list: C integers in the compiled build
    for entry in entries:
        total += entry[2] - entry[1]
    return total


def held_runs(entries: list[HeldEntry]) -> list[CachedRun]:
    """The runs that hold a request's entries now (runs split since it took them included), in block order."""
    runs = []
    for run, _lo, hi in entries:
        runs.append(run)
        while run.hi < hi:
            run = run.next  # type: ignore[assignment]  # a held run's successors cover it to hi
            runs.append(run)
    return runs


def num_held_blocks(entries: list[HeldEntry]) -> int:
    """The blocks of a lookup's hit that another running request holds (they cost no free block)."""
    if len(entries) == 1:
        run, lo, hi = entries[0]
        return hi - lo if run.ref_cnt else 0
    total = 0
    for run, lo, hi in entries:
        if run.ref_cnt:
            total += hi - lo
    return total


class BlockPool:
    """The cached blocks of one engine and the eviction order of those nobody holds."""

    def __init__(self) -> None:
        # The hash of a run's first block -> the runs starting with it (more than one: duplicates).
        self.cached_block_hash_to_block: dict[Hashable, list[CachedRun]] = {}
        # How many of those runs start at each chain position (run.lo), and the positions where any does, in
        # order: a lookup asks the index only at those (on Mooncake, 2% of the positions its hits cover).
        self.run_starts: list[int] = []
        self.start_positions: list[int] = []
        # Runs of a block cached alone (not placed): while any is cached, a lookup asks at every position.
        self.num_unplaced_runs = 0
        # Cached blocks with ref_cnt == 0, least recently freed first (the tail of vLLM's free queue); an entry
        # whose runs were all taken or evicted is dropped when it reaches the front.
        self.free_block_queue: deque[FreeEntry | PrivateRun] = deque()
        self.num_queued_blocks = 0  # blocks in free_block_queue
        self.num_evicted_blocks = 0
        self._num_inserts = 0
        # Bumped by every change a lookup could see (a hash cached or evicted, a reference count, a run):
        # a waiting request's hit, looked up again each step while it waits, is reused while it holds.
        self.version = 0

    # ---- the index ---------------------------------------------------------------------------------------------

    def _index(self, run: CachedRun) -> None:
        lo = run.lo
        key = run.block_hashes[lo]
        runs = self.cached_block_hash_to_block.get(key)
        if runs is None:
            self.cached_block_hash_to_block[key] = [run]
        else:
            runs.append(run)
        if run.placed:
            self._count_start(lo)
        else:
            self.num_unplaced_runs += 1

    def _count_start(self, lo: int) -> None:
        run_starts = self.run_starts
        if lo >= len(run_starts):
            run_starts.extend([0] * (lo + 1 - len(run_starts)))
        if not run_starts[lo]:
            insort(self.start_positions, lo)
        run_starts[lo] += 1

    def _unindex(self, run: CachedRun) -> None:
        lo = run.lo
        if not run.placed:
            self.num_unplaced_runs -= 1
        else:
            run_starts = self.run_starts
            run_starts[lo] -= 1
            if not run_starts[lo]:
                start_positions = self.start_positions
                del start_positions[bisect_left(start_positions, lo)]
        key = run.block_hashes[lo]
        runs = self.cached_block_hash_to_block[key]
        if len(runs) == 1:
            del self.cached_block_hash_to_block[key]
        else:
            runs.remove(run)

    def _split(self, run: CachedRun, at: int) -> CachedRun:
        """Cut `run` before block `at` (lo < at < hi): it keeps lo..at-1, the returned run takes at..hi-1."""
        right = CachedRun(run.block_hashes, at, run.hi, run.ref_cnt, run.stamp)
        right.placed = run.placed
        right.next = run.next
        run.next = right
        run.hi = at
        self._index(right)
        return right

    # ---- lookup ------------------------------------------------------------------------------------------------

    def find_longest_cache_hit(
        self, block_hashes: Sequence[Hashable], max_num_blocks: int
    ) -> list[HeldEntry]:
        """The cached blocks of the longest run of `block_hashes` from the start, at most `max_num_blocks`, as
        (run, lo, hi) entries: at each position the first inserted block holding that hash."""
        index = self.cached_block_hash_to_block
        num_hashes = min(max_num_blocks, len(block_hashes))
        if num_hashes <= 0:
            return []
        runs = index.get(block_hashes[0])
        if runs is None:
            return []
        if len(runs) == 1:
            # The common case, without the general walk's lists: one run matches from the start and no run starts
            # inside its match (the walk below would stop there with this one candidate).
            run = runs[0]
            run_hashes = run.block_hashes
            lo = run.lo
            end = run.hi - lo
            if end > num_hashes:
                end = num_hashes
            if run_hashes is not block_hashes and run_hashes[lo + end - 1] != block_hashes[end - 1]:
                end = _match_length(run, block_hashes, 0, num_hashes)
            stop = end if end < num_hashes else num_hashes - 1
            # Runs starting inside the match (or at its end): asked of the index only where some run starts.
            found = self._runs_starting_in(block_hashes, 1, stop + 1)
            if not found:
                return [(run, lo, lo + end)]
            # The walk goes on from the runs found: (stamp, run, position of run.lo in block_hashes, end of the
            # match there) for each run met, and positions 0..scanned looked up for runs starting there.
            candidates: list[tuple[int, CachedRun, int, int]] = [(run.stamp, run, 0, end)]
            reach = end
            scanned = stop
        else:
            candidates = []
            found = [(0, runs)]  # (position, the runs starting there) not yet matched
            reach = 0
            scanned = 0
        while found:
            for position, runs in found:
                for run in runs:
                    end = position + _match_length(run, block_hashes, position, num_hashes)
                    candidates.append((run.stamp, run, position, end))
                    reach = max(reach, end)
            # A run may also start inside the hit so far (a duplicate, or a chain that goes further).
            start, stop = scanned + 1, min(reach, num_hashes - 1) + 1
            if start >= stop:
                break
            found = self._runs_starting_in(block_hashes, start, stop)
            scanned = stop - 1
        if len(candidates) == 1:
            _stamp, run, position, end = candidates[0]
            return [(run, run.lo, run.lo + end - position)]
        return _first_inserted(candidates)

    def _runs_starting_in(self, block_hashes: Sequence[Hashable], start: int, stop: int) -> list:
        """(position, the runs starting there) for the positions start..stop-1 of `block_hashes` where runs start,
        asked of the index only where some run starts (unless a block cached alone may start anywhere)."""
        index = self.cached_block_hash_to_block
        if self.num_unplaced_runs:
            window = block_hashes[start:stop]
            if index.keys().isdisjoint(window):  # a C loop: most often nothing is found
                return []
            positions = compress(range(start, stop), map(index.__contains__, window))
            return [(position, index[block_hashes[position]]) for position in positions]
        start_positions = self.start_positions
        first = bisect_left(start_positions, start)
        return [
            (position, index[block_hashes[position]])
            for position in start_positions[first : bisect_left(start_positions, stop, first)]
            if block_hashes[position] in index
        ]

    # ---- taking and releasing blocks ---------------------------------------------------------------------------

    def touch(self, hit: list[HeldEntry]) -> int:
        """A request takes the blocks it hit; `hit` becomes its held entries (in place). Returns how many of them
        left the free queue (were unused)."""
        self.version += 1
        num_taken = 0
        for i, (run, lo, hi) in enumerate(hit):
            while run.hi <= lo:  # an earlier entry of this hit split the run
                run = run.next  # type: ignore[assignment]
            if run.ref_cnt == 0:
                run = self._take_free(run, lo, hi)
                num_taken += hi - lo
            else:
                if lo > run.lo:
                    run = self._split(run, lo)
                if hi < run.hi:
                    self._split(run, hi)
            run.ref_cnt += 1
            hit[i] = (run, lo, hi)
        self.num_queued_blocks -= num_taken
        return num_taken

    def _take_free(self, run: CachedRun, lo: int, hi: int) -> CachedRun:
        """Blocks lo..hi-1 of a free run leave the queue; what is left of the run keeps its place there, in the
        order vLLM would evict it (its tail part first, then its head part). Returns the run taken."""
        entry = run.entry
        assert entry is not None  # a run nobody holds is in the queue
        left_over: list[CachedRun] = []
        taken = run
        if lo > run.lo:
            taken = self._split(run, lo)
        if hi < taken.hi:
            left_over.append(self._split(taken, hi))
        if taken is not run:
            left_over.append(run)
        taken.entry = None
        for part in left_over:
            part.entry = entry
        place = entry.runs.index(run)  # runs compare by identity
        entry.runs[place : place + 1] = left_over
        return taken

    def cache_full_blocks(
        self, held: list[HeldEntry], block_hashes: Sequence[Hashable], num_full_blocks: int
    ) -> None:
        """Blocks filled by the request holding `held` (ref_cnt 1) join the cache, up to `num_full_blocks` of its
        `block_hashes` (those it does not hold yet)."""
        if not held:
            start = 0
        else:
            last = held[-1]
            last_run = last[0]  # typed by the compiled build, as `last`: C field and item access
            # Its own run: the run's positions are its block table's.
            start = last[2] if last_run.block_hashes is block_hashes else num_blocks(held)
        if num_full_blocks <= start:
            return
        self.version += 1
        self._num_inserts += 1
        run = CachedRun(block_hashes, start, num_full_blocks, 1, self._num_inserts)
        index = self.cached_block_hash_to_block  # self._index(run), inlined: once or more a request
        key = block_hashes[start]
        runs = index.get(key)
        if runs is None:
            index[key] = [run]
        else:
            runs.append(run)
        run_starts = self.run_starts  # self._count_start(start), inlined
        if start >= len(run_starts):
            run_starts.extend([0] * (start + 1 - len(run_starts)))
        if not run_starts[start]:
            insort(self.start_positions, start)
        run_starts[start] += 1
        held.append((run, start, num_full_blocks))

    def hold_initial(
        self, held: list[HeldEntry], block_hashes: Sequence[Hashable], num_full_blocks: int
    ) -> int:
        """A request already running when the simulation starts holds its first `num_full_blocks` blocks: those
        another such request holds are shared, the rest cached anew. Returns how many were shared."""
        hit = self.find_longest_cache_hit(block_hashes, num_full_blocks)
        self.touch(hit)
        held.extend(hit)
        self.cache_full_blocks(held, block_hashes, min(num_full_blocks, len(block_hashes)))
        return num_blocks(hit)

    def free_blocks(self, held: list[HeldEntry]) -> int:
        """A request releases its held blocks, last first (vLLM frees a block table in reverse); those nobody
        holds any more enter the free queue together. Returns how many became free."""
        if not held:
            return 0
        self.version += 1
        freed: list[CachedRun] = []
        first = held[0]
        run = first[0]
        if len(held) == 1 and run.hi >= first[2]:  # one run, not split since: no held_runs walk
            run.ref_cnt -= 1
            if not run.ref_cnt:
                freed.append(run)
        else:
            for run in reversed(held_runs(held)):
                run.ref_cnt -= 1
                if not run.ref_cnt:
                    freed.append(run)
        if not freed:
            return 0
        entry = FreeEntry(freed)  # self._enqueue(freed), inlined
        num_freed = 0
        for run in freed:
            run.entry = entry
            num_freed += run.hi - run.lo
        self.num_queued_blocks += num_freed
        self.free_block_queue.append(entry)
        return num_freed

    def _enqueue(self, runs: list[CachedRun]) -> None:
        entry = FreeEntry(runs)
        for run in runs:
            run.entry = entry
            self.num_queued_blocks += run.hi - run.lo
        self.free_block_queue.append(entry)

    def cache_full_block(self, block_hash: Hashable) -> CachedRun:
        """One block with `block_hash`, just filled by the request holding it (ref_cnt 1), joins the cache: a
        run of its own (for a cache rebuilt block by block, e.g. from a recording)."""
        self.version += 1
        self._num_inserts += 1
        run = CachedRun((block_hash,), 0, 1, 1, self._num_inserts)
        run.placed = False
        self._index(run)
        return run

    def free_block(self, run: CachedRun) -> bool:
        """A request releases a run it holds alone; returns whether nobody holds it any more (it became free)."""
        self.version += 1
        run.ref_cnt -= 1
        if run.ref_cnt:
            return False
        self._enqueue([run])
        return True

    def free_private_run(self, lo: int, hi: int) -> PrivateRun:
        """A request frees its private cached blocks lo..hi-1 (see the module docstring): cached, evictable."""
        self.version += 1
        run = PrivateRun(lo, hi)
        self.free_block_queue.append(run)
        self.num_queued_blocks += hi - lo
        return run

    def take_private(self, run: PrivateRun, num_blocks: int) -> None:
        """A resumed request hits the first `num_blocks` of its run: they leave the queue."""
        self.version += 1
        run.lo += num_blocks  # an emptied run is a dead entry
        self.num_queued_blocks -= num_blocks

    def evict_to(self, num_free_blocks: int) -> None:
        """Allocations took free blocks: those without a hash went first, then cached ones from the front of
        the queue, whose hashes are evicted. Afterwards the queue holds at most the free blocks."""
        num_surplus = self.num_queued_blocks - num_free_blocks
        if num_surplus <= 0:
            return
        queue = self.free_block_queue
        num_left = num_surplus  # blocks still to evict
        while num_left > 0:
            entry = queue[0]
            if type(entry) is PrivateRun:
                private = entry  # typed by the compiled build (C fields, no attribute lookups)
                size = private.hi - private.lo
                if size > num_left:
                    private.hi -= num_left
                    break
                num_left -= size
                private.hi = private.lo
                queue.popleft()
            else:
                freed_together = entry  # typed by the compiled build
                runs = freed_together.runs  # type: ignore[union-attr]
                if not runs:
                    queue.popleft()  # taken since it was freed
                    continue
                run = runs[0]
                size = run.hi - run.lo
                if size > num_left:
                    run.hi -= num_left  # its tail first
                    break
                num_left -= size
                run.hi = run.lo
                self._unindex(run)
                run.entry = None
                del runs[0]
                if not runs:
                    queue.popleft()
        self.version += 1  # once for the lot: the version only tells whether anything changed
        self.num_queued_blocks = num_free_blocks
        self.num_evicted_blocks += num_surplus

    # ---- inspection (tests) ------------------------------------------------------------------------------------

    def queued(self) -> Iterator[CachedRun | PrivateRun]:
        """The runs in the free queue, front first."""
        for entry in self.free_block_queue:
            if type(entry) is PrivateRun:
                if entry.hi > entry.lo:
                    yield entry
            else:
                yield from entry.runs  # type: ignore[union-attr]

    def num_cached_blocks(self) -> int:
        return sum(run.hi - run.lo for runs in self.cached_block_hash_to_block.values() for run in runs)


def _match_length(run: CachedRun, block_hashes: Sequence[Hashable], position: int, num_hashes: int) -> int:
    """How many blocks of `run`, from its first, equal `block_hashes` from `position` on (the first does). Hashes
    are chained: once two chains differ they never agree again, so the match is found by bisection."""
    run_hashes = run.block_hashes
    length = min(run.hi - run.lo, num_hashes - position)
    if run_hashes is block_hashes or run_hashes[run.lo + length - 1] == block_hashes[position + length - 1]:
        return length
    good, bad = 1, length - 1  # blocks 0..good-1 match; block `bad` does not
    while bad - good > 0:
        middle = (good + bad) // 2
        if run_hashes[run.lo + middle] == block_hashes[position + middle]:
            good = middle + 1
        else:
            bad = middle
    return good


def _first_inserted(candidates: list[tuple[int, CachedRun, int, int]]) -> list[HeldEntry]:
    """The hit when several runs cover parts of it (together, every position from the first to the furthest
    end): at each position, the run inserted first among those covering it, as (run, lo, hi) entries in the
    run's own positions."""
    boundaries = sorted(
        {position for _s, _r, position, _e in candidates} | {end for *_rest, end in candidates}
    )
    hit: list[HeldEntry] = []
    last: CachedRun | None = None
    last_position = 0
    for start, stop in pairwise(boundaries):
        _stamp, run, position, _end = min(
            (c for c in candidates if c[2] <= start and c[3] >= stop), key=lambda c: c[0]
        )
        if run is last:
            previous, lo, _hi = hit[-1]
            hit[-1] = (previous, lo, run.lo + stop - last_position)
        else:
            hit.append((run, run.lo + start - position, run.lo + stop - position))
            last, last_position = run, position
    return hit


# ---- the pool in use --------------------------------------------------------------------------------------------

COMPILED_MODULE = "vllm_shadow.solver._kv_cache_compiled"
_PURE_MODULE = "vllm_shadow.solver._kv_cache_pure"
# What the build hands out in place of this module's own (everything the simulator and the tests take from here).
_COMPILED_NAMES = (
    "BlockPool",
    "CachedRun",
    "FreeEntry",
    "PrivateRun",
    "held_runs",
    "num_blocks",
    "num_held_blocks",
)


_SOURCE = Path(__file__)
_DECLARATIONS = _SOURCE.with_name("_kv_cache_compiled.pxd")


def compiled_pool() -> ModuleType | None:
    """This file as compiled by setup.py, or None where it was not built (see solver.compiled_build)."""
    return compiled_build.compiled_module(COMPILED_MODULE)


def stale_sources(pool: ModuleType) -> list[str]:
    """In a source checkout, the files edited since `pool` was built (an edited .py runs as the .py until it is
    rebuilt); none in an installed package, whose build and sources came together."""
    return compiled_build.stale_sources(pool, _SOURCE, _DECLARATIONS)


def pure_pool() -> ModuleType:
    """This file as plain Python, whichever pool is in use: the oracle the compiled pool is tested against. Under
    the compiled pool it is loaded from the source file under a name of its own, so that the two pools' classes
    never mix."""
    if not COMPILED:
        return sys.modules[__name__]
    return compiled_build.load_as_python(_PURE_MODULE, _SOURCE)


COMPILED = False  # whether the classes and functions above are the compiled pool's
if __name__ == "vllm_shadow.solver.kv_cache":
    _pool = compiled_build.build_in_use(COMPILED_MODULE, _SOURCE, _DECLARATIONS, "prefix cache", "pool")
    if _pool is not None:
        # Not plain assignments: in the build Cython compiles from this file, these names are extension types and
        # C functions, whose names cannot be rebound.
        globals().update({name: getattr(_pool, name) for name in _COMPILED_NAMES})
        COMPILED = True
