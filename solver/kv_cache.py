"""vLLM's prefix cache, for the simulator: its block pool's cached blocks, their reference counts and its free
queue's eviction order (vllm/v1/core/block_pool.py and kv_cache_utils.py, 0.32), with vLLM's names.

What is replicated, and how it is kept cheap:
  * `BlockPool.cached_block_hash_to_block` maps a block hash to the cached block(s) holding it; duplicates are
    kept, and a lookup returns the first inserted, as vLLM's `BlockHashToBlockMap`.
  * vLLM's `FreeKVCacheBlockQueue` holds, front to back, the free blocks without a hash (freed blocks without a
    hash are prepended) and then the cached blocks nobody uses, in the order they were freed (appended). A free
    block without a hash is indistinguishable from another, so that front part is a count kept by the
    simulator (its free blocks minus this queue's length), and only the cached part is a queue here:
    `free_block_queue`, least recently freed first.
  * Allocation takes from the front: free blocks without a hash first, then the least recently freed cached
    block, whose hash is evicted. The simulator counts allocations and calls `evict_to(num_free_blocks)` before
    anything that depends on the queue's order (a lookup, a free): only pops happen in between, so evicting
    the surplus at once is exact.
  * A block with a published hash (vLLM's hash of a full block of prompt tokens, an int, as the mirror
    publishes it) is a `KVCacheBlock`. A block whose tokens no other request can share (generated tokens, or a
    prompt without published hashes) can only ever be hit by its own request once resumed: while its request
    holds it, it is only counted; when its request frees it, its request's private blocks enter the queue as one
    `PrivateRun` (evicted tail first, one block at a time), so a finish costs O(1), not O(blocks).
  * One case is not literal: a priority victim preempted after its blocks for the step were cached may leave a
    cached block its resume cannot hit (vLLM caps a hit at num_tokens - 1); vLLM keeps it as a duplicate that a
    later lookup prefers, here it stays in the queue unreferenced. The queue's order and counts are the same.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator


class KVCacheBlock:
    """A cached block: its hash and how many running requests hold it (vLLM's `ref_cnt`)."""

    __slots__ = ("block_hash", "queued_at", "ref_cnt")

    def __init__(self, block_hash: Hashable, ref_cnt: int) -> None:
        self.block_hash: Hashable | None = block_hash
        self.ref_cnt = ref_cnt
        self.queued_at = -1  # the number of its live entry in the free queue; -1 when not in it


class PrivateRun:
    """A freed request's private cached blocks: positions lo..hi-1 of its block table, freed tail first, so the
    queue evicts hi-1 first. Its request hits lo.. on resume."""

    __slots__ = ("hi", "lo")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo = lo
        self.hi = hi


class BlockPool:
    """The cached blocks of one engine and the eviction order of those nobody holds."""

    def __init__(self) -> None:
        # hash -> the block holding it, or an insertion-ordered dict of the blocks holding it (duplicates).
        self.cached_block_hash_to_block: dict[Hashable, KVCacheBlock | dict[KVCacheBlock, None]] = {}
        # Cached blocks with ref_cnt == 0, least recently freed first (the tail of vLLM's free queue). A deque
        # with lazy removal: a block's entry (block, number) is live while block.queued_at is that number, a
        # run's while it has blocks; dead entries are dropped when they reach the front.
        self.free_block_queue: deque[tuple[KVCacheBlock, int] | PrivateRun] = deque()
        self.num_queued_blocks = 0  # blocks in free_block_queue's live entries (a run counts its blocks)
        self._entry_number = 0
        self.num_evicted_blocks = 0
        # Bumped by every change a lookup could see (a hash cached or evicted, a reference count, a run):
        # a waiting request's hit, looked up again each step while it waits, is reused while it holds.
        self.version = 0

    def get_cached_block(self, block_hash: Hashable) -> KVCacheBlock | None:
        blocks = self.cached_block_hash_to_block.get(block_hash)
        if blocks is None or isinstance(blocks, KVCacheBlock):
            return blocks
        return next(iter(blocks))

    def find_longest_cache_hit(self, block_hashes: list[Hashable]) -> list[KVCacheBlock]:
        """The cached blocks of the longest run of `block_hashes` from the start (hashes are chained: a miss
        means every later block misses too)."""
        hit: list[KVCacheBlock] = []
        for block_hash in block_hashes:
            block = self.get_cached_block(block_hash)
            if block is None:
                break
            hit.append(block)
        return hit

    def _insert(self, block: KVCacheBlock) -> None:
        self.version += 1
        key = block.block_hash
        blocks = self.cached_block_hash_to_block.get(key)
        if blocks is None:
            self.cached_block_hash_to_block[key] = block
        elif isinstance(blocks, KVCacheBlock):
            self.cached_block_hash_to_block[key] = {blocks: None, block: None}
        else:
            blocks[block] = None

    def _remove(self, block: KVCacheBlock) -> None:
        self.version += 1
        key = block.block_hash
        blocks = self.cached_block_hash_to_block.pop(key)
        if not isinstance(blocks, KVCacheBlock):
            del blocks[block]
            if blocks:
                self.cached_block_hash_to_block[key] = blocks
        block.block_hash = None

    def cache_full_block(self, block_hash: Hashable) -> KVCacheBlock:
        """A block just filled by the request holding it (ref_cnt 1) joins the cache."""
        block = KVCacheBlock(block_hash, 1)
        self._insert(block)
        return block

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

    def touch(self, blocks: list[KVCacheBlock]) -> int:
        """A request takes the blocks it hit; returns how many of them left the free queue (were unused)."""
        self.version += 1
        num_taken = 0
        for block in blocks:
            if block.ref_cnt == 0:
                block.queued_at = -1  # its entry dies
                num_taken += 1
            block.ref_cnt += 1
        self.num_queued_blocks -= num_taken
        return num_taken

    def free_block(self, block: KVCacheBlock) -> bool:
        """A request releases a cached block; returns whether nobody holds it any more (it became free)."""
        self.version += 1
        block.ref_cnt -= 1
        if block.ref_cnt:
            return False
        self._entry_number += 1
        block.queued_at = self._entry_number
        self.free_block_queue.append((block, self._entry_number))
        self.num_queued_blocks += 1
        return True

    def evict_to(self, num_free_blocks: int) -> None:
        """Allocations took free blocks: those without a hash went first, then cached ones from the front of
        the queue, whose hashes are evicted. Afterwards the queue holds at most the free blocks."""
        queue = self.free_block_queue
        while self.num_queued_blocks > num_free_blocks:
            entry = queue[0]
            if type(entry) is PrivateRun:
                num_evicted = min(self.num_queued_blocks - num_free_blocks, entry.hi - entry.lo)
                entry.hi -= num_evicted
                if entry.hi == entry.lo:
                    queue.popleft()
            else:
                queue.popleft()
                block, number = entry
                if block.queued_at != number:
                    continue  # a dead entry: the block was taken since
                block.queued_at = -1
                num_evicted = 1
                self._remove(block)
            self.version += 1
            self.num_queued_blocks -= num_evicted
            self.num_evicted_blocks += num_evicted

    def queued(self) -> Iterator[KVCacheBlock | PrivateRun]:
        """The live entries of the free queue, front first."""
        for entry in self.free_block_queue:
            if type(entry) is PrivateRun:
                if entry.hi > entry.lo:
                    yield entry
            elif entry[0].queued_at == entry[1]:
                yield entry[0]

    def num_cached_blocks(self) -> int:
        return sum(
            1 if isinstance(b, KVCacheBlock) else len(b) for b in self.cached_block_hash_to_block.values()
        )
