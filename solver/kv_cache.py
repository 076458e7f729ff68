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
  * A block hash is an int (vLLM's hash of a full block of prompt tokens, as the mirror publishes it) or, for a
    block whose tokens no other request can share (generated tokens, or a prompt without published hashes), the
    tuple (request key, block index): such a block can only ever be hit by its own request once resumed, so it
    is created lazily, when its request frees it (`cache_free_block`), not while its request holds it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class KVCacheBlock:
    """A cached block: its hash and how many running requests hold it (vLLM's `ref_cnt`)."""

    __slots__ = ("block_hash", "ref_cnt")

    def __init__(self, block_hash: Hashable, ref_cnt: int) -> None:
        self.block_hash: Hashable | None = block_hash
        self.ref_cnt = ref_cnt


class BlockPool:
    """The cached blocks of one engine and the eviction order of those nobody holds."""

    def __init__(self) -> None:
        # hash -> the block holding it, or an insertion-ordered dict of the blocks holding it (duplicates).
        self.cached_block_hash_to_block: dict[Hashable, KVCacheBlock | dict[KVCacheBlock, None]] = {}
        # Cached blocks with ref_cnt == 0, least recently freed first (the tail of vLLM's free queue).
        self.free_block_queue: OrderedDict[KVCacheBlock, None] = OrderedDict()
        self.num_evicted_blocks = 0

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
        key = block.block_hash
        blocks = self.cached_block_hash_to_block.get(key)
        if blocks is None:
            self.cached_block_hash_to_block[key] = block
        elif isinstance(blocks, KVCacheBlock):
            self.cached_block_hash_to_block[key] = {blocks: None, block: None}
        else:
            blocks[block] = None

    def _remove(self, block: KVCacheBlock) -> None:
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

    def cache_free_block(self, block_hash: Hashable) -> None:
        """A private cached block (see the module docstring) freed by its request: cached and evictable."""
        block = KVCacheBlock(block_hash, 0)
        self._insert(block)
        self.free_block_queue[block] = None

    def touch(self, blocks: list[KVCacheBlock]) -> int:
        """A request takes the blocks it hit; returns how many of them left the free queue (were unused)."""
        num_taken = 0
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_block_queue[block]
                num_taken += 1
            block.ref_cnt += 1
        return num_taken

    def free_block(self, block: KVCacheBlock) -> bool:
        """A request releases a cached block; returns whether nobody holds it any more (it became free)."""
        block.ref_cnt -= 1
        if block.ref_cnt:
            return False
        self.free_block_queue[block] = None
        return True

    def evict_to(self, num_free_blocks: int) -> None:
        """Allocations took free blocks: those without a hash went first, then cached ones from the front of
        the queue, whose hashes are evicted. Afterwards the queue holds at most the free blocks."""
        queue = self.free_block_queue
        while len(queue) > num_free_blocks:
            block, _ = queue.popitem(last=False)
            self._remove(block)
            self.num_evicted_blocks += 1

    def num_cached_blocks(self) -> int:
        return sum(
            1 if isinstance(b, KVCacheBlock) else len(b) for b in self.cached_block_hash_to_block.values()
        )
