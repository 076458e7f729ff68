"""vLLM's prefix cache as the engine's own steps leave it: what a window needs at its start to replay exactly.

With prefix caching on, a request admitted in window k may hit blocks that requests of window k-1 left cached,
and a preempted request resumes from its own blocks while they survive. Which blocks are cached, and in which
order vLLM would evict them, follows from what the engine did; the tracker replays its steps here with the
engine's decisions instead of a policy: the requests each step ran, preempted and admitted, and the hit each
admission got where the hook publishes it (`EngineStep.cached_tokens`; otherwise the lookup here decides it,
as vLLM's would). The engine's count of blocks in use after each step checks the replay (`mismatches`).

The bookkeeping is the simulator's (`vllm_shadow.solver.kv_cache` and `Simulator._free_cached_blocks`,
`_cache_blocks`, `_find_longest_cache_hit`, `_admit_with_hits`), block by block (a tracker sees each block
once or twice, a replay many times): cached blocks with a published hash, keyed by it, the first inserted
taken on a duplicate (a finished request's generated blocks too, under the hashes its finish publishes);
blocks no other request can hit (a running or preempted request's generated tokens, a prompt without hashes)
as one run per request once freed; the free queue's cached part in eviction order, lazily
evicted down to the free block count. Within a step a victim is freed when the running request that needed
its blocks allocates, as in vLLM's `schedule()`; under async scheduling a finished request is freed one
schedule later (`step`'s `finishing`). A window's start state is that free queue, front first
(`FreeQueueEntry`): the simulator rebuilds it with `simulate(..., initial_free_queue=...)`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# A cached block nobody holds (its hash), or a run of one request's private blocks (request id, first, end):
# the simulator's `initial_free_queue` entries. An id of no waiting request marks a run nobody can hit.
FreeQueueEntry = int | tuple[str, int, int]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Block:
    """A cached block with a published hash, and how many running requests hold it (vLLM's ref_cnt)."""

    __slots__ = ("block_hash", "ref_cnt")

    def __init__(self, block_hash: int) -> None:
        self.block_hash = block_hash
        self.ref_cnt = 1


class _PrivateRun:
    """A freed request's private blocks lo..hi-1 of its block table, evicted tail first."""

    __slots__ = ("hi", "lo", "owner")

    def __init__(self, lo: int, hi: int, owner: str) -> None:
        self.lo = lo
        self.hi = hi
        self.owner = owner  # "" once nobody can hit it


class _Pool:
    def __init__(self) -> None:
        self.cached: dict[int, list[_Block]] = {}  # hash -> its cached blocks, first inserted first
        # Cached blocks nobody holds and private runs, least recently freed first (insertion order).
        self.queue: OrderedDict[_Block | _PrivateRun, None] = OrderedDict()
        self.num_queued_blocks = 0

    def cache(self, block_hash: int) -> _Block:
        block = _Block(block_hash)
        self.cached.setdefault(block_hash, []).append(block)
        return block

    def find_longest_cache_hit(self, block_hashes: Sequence[int]) -> list[_Block]:
        hit = []
        for block_hash in block_hashes:
            blocks = self.cached.get(block_hash)
            if not blocks:
                break
            hit.append(blocks[0])
        return hit

    def touch(self, blocks: list[_Block]) -> int:
        """A request takes the blocks it hit; returns how many left the free queue."""
        num_taken = 0
        for block in blocks:
            if block.ref_cnt == 0:
                del self.queue[block]
                num_taken += 1
            block.ref_cnt += 1
        self.num_queued_blocks -= num_taken
        return num_taken

    def free_block(self, block: _Block) -> bool:
        block.ref_cnt -= 1
        if block.ref_cnt:
            return False
        self.queue[block] = None
        self.num_queued_blocks += 1
        return True

    def free_private_run(self, lo: int, hi: int, owner: str = "") -> _PrivateRun:
        run = _PrivateRun(lo, hi, owner)
        self.queue[run] = None
        self.num_queued_blocks += hi - lo
        return run

    def take_private(self, run: _PrivateRun, num_blocks: int) -> None:
        run.lo += num_blocks
        self.num_queued_blocks -= num_blocks
        if run.lo == run.hi:
            del self.queue[run]

    def evict_to(self, num_free_blocks: int) -> None:
        while self.num_queued_blocks > num_free_blocks:
            if not self.queue:  # more blocks in use than the engine has: the model lost track (never raise)
                self.num_queued_blocks = 0
                return
            entry = next(iter(self.queue))
            if isinstance(entry, _PrivateRun):
                num_evicted = min(self.num_queued_blocks - num_free_blocks, entry.hi - entry.lo)
                entry.hi -= num_evicted
                if entry.hi == entry.lo:
                    del self.queue[entry]
            else:
                del self.queue[entry]
                blocks = self.cached[entry.block_hash]
                blocks.remove(entry)
                if not blocks:
                    del self.cached[entry.block_hash]
                num_evicted = 1
            self.num_queued_blocks -= num_evicted


class _CachedRequest:
    __slots__ = (
        "block_hashes",
        "computed",
        "held_blocks",
        "num_cached_blocks",
        "output_block_hashes",
        "private_run",
    )

    def __init__(self, block_hashes: tuple[int, ...]) -> None:
        self.block_hashes = block_hashes
        self.output_block_hashes: tuple[int, ...] = ()  # its generated blocks', published at its finish
        self.computed = 0  # tokens whose KV it holds
        self.held_blocks: list[_Block] = []  # its cached blocks with a published hash, a prefix
        self.num_cached_blocks = 0  # its leading full blocks (past held_blocks, private ones)
        self.private_run: _PrivateRun | None = None  # its private blocks in the free queue since a preemption


@dataclass(frozen=True, slots=True)
class Admission:
    """A request the engine admitted (new, or resumed after a preemption) in a step."""

    request_id: str
    num_tokens: int  # prompt plus the tokens it had emitted: what it computes from scratch without a hit
    num_new_tokens: int  # tokens the step scheduled for it
    engine_hit: int | None  # tokens the engine found cached (None: the sender does not say)


class PrefixCacheModel:
    """One engine's prefix cache, replayed from its steps. Not thread-safe: the tracker serialises calls."""

    def __init__(self, num_kv_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_usable_blocks = num_kv_blocks - 1  # vLLM's null block is never free nor used
        self.mismatches = 0  # admissions whose hit, and steps whose blocks in use, the engine saw otherwise
        self.reset()

    def reset(self) -> None:
        """Start again from an empty cache (events were lost: a window's start state is then approximate)."""
        self.num_used_blocks = 0
        self.pool = _Pool()
        self._requests: dict[str, _CachedRequest] = {}

    def _state(self, request_id: str) -> _CachedRequest:
        state = self._requests.get(request_id)
        if state is None:  # unknown to the model (an arrival lost): it holds only private blocks
            state = self._requests[request_id] = _CachedRequest(())
        return state

    def arrived(self, request_id: str, block_hashes: tuple[int, ...]) -> None:
        self._requests.setdefault(request_id, _CachedRequest(block_hashes))

    def output_hashes(self, request_id: str, block_hashes: tuple[int, ...]) -> None:
        """The hashes of a finishing request's generated blocks (`RequestFinish.block_hashes`): when it is
        freed, the blocks its output filled are cached under them, as vLLM caches them, and a later prompt
        holding that output (a conversation's next turn) hits them."""
        state = self._requests.get(request_id)
        if state is not None:
            state.output_block_hashes = block_hashes

    def _output_hashes_to_cache(self, state: _CachedRequest) -> tuple[int, ...]:
        """Those of its generated blocks that become cached when a finished request is freed: the full blocks
        it computed past its prompt's, where its prompt's are all cached (the chain is unbroken)."""
        held = len(state.held_blocks)
        if (
            not state.output_block_hashes
            or held != len(state.block_hashes)
            or state.num_cached_blocks <= held
        ):
            return ()
        return state.output_block_hashes[: state.num_cached_blocks - held]

    def _evict(self) -> None:
        num_free_blocks = self.num_usable_blocks - self.num_used_blocks
        if self.pool.num_queued_blocks > num_free_blocks:
            self.pool.evict_to(num_free_blocks)

    def _cache_blocks(self, state: _CachedRequest, num_tokens: int) -> None:
        num_full_blocks = num_tokens // self.block_size
        if num_full_blocks <= state.num_cached_blocks:
            return
        for index in range(len(state.held_blocks), min(num_full_blocks, len(state.block_hashes))):
            state.held_blocks.append(self.pool.cache(state.block_hashes[index]))
        state.num_cached_blocks = num_full_blocks

    def _free(
        self, request_id: str, num_tokens: int, unhashed_tail: bool = False, *, resumable: bool
    ) -> None:
        """vLLM's `free`, blocks released tail first. `num_tokens`: its prompt plus what it had emitted;
        `unhashed_tail`: its last computed block got no hash (an async victim's, see `step`)."""
        state = self._state(request_id)
        if unhashed_tail:
            state.num_cached_blocks = min(state.num_cached_blocks, (state.computed - 1) // self.block_size)
        self._evict()  # allocations so far came first
        pool = self.pool
        if not resumable:
            state.held_blocks += [pool.cache(h) for h in self._output_hashes_to_cache(state)]
        held = len(state.held_blocks)
        num_freed = _cdiv(state.computed, self.block_size) - held
        if state.num_cached_blocks > held:
            # Past num_tokens - 1 no resume hits (vLLM caps a hit there).
            reachable = max((num_tokens - 1) // self.block_size, held)
            if state.num_cached_blocks > reachable:
                pool.free_private_run(reachable, state.num_cached_blocks)
            if reachable > held:
                run = pool.free_private_run(held, min(state.num_cached_blocks, reachable))
                if resumable:
                    self._drop_run(state)
                    run.owner = request_id
                    state.private_run = run
        for block in reversed(state.held_blocks):
            num_freed += pool.free_block(block)
        state.held_blocks = []
        state.num_cached_blocks = 0
        state.computed = 0
        self.num_used_blocks -= num_freed

    def _drop_run(self, state: _CachedRequest) -> None:
        if state.private_run is not None:
            state.private_run.owner = ""
            state.private_run = None

    def _lookup(self, state: _CachedRequest, num_tokens: int) -> tuple[list[_Block], int]:
        """vLLM's `get_computed_blocks`: the hit blocks with a hash, and how many private blocks follow."""
        max_num_blocks = (num_tokens - 1) // self.block_size
        hashes = state.block_hashes
        hit = self.pool.find_longest_cache_hit(hashes[:max_num_blocks]) if hashes else []
        run = state.private_run
        num_private = 0
        if run is not None and len(hit) == len(hashes) and run.lo == len(hit):
            num_private = max(min(run.hi, max_num_blocks) - run.lo, 0)
        return hit, num_private

    def _admit(self, admission: Admission) -> int:
        state = self._state(admission.request_id)
        self._evict()
        hit, num_private = self._lookup(state, admission.num_tokens)
        num_hit_blocks = len(hit) + num_private
        num_extra = 0  # blocks the engine hit that the replay does not hold (a mismatch)
        if admission.engine_hit is not None and admission.engine_hit != num_hit_blocks * self.block_size:
            self.mismatches += 1
            wanted = admission.engine_hit // self.block_size
            if wanted < len(hit):
                hit, num_private = hit[:wanted], 0
            elif wanted < num_hit_blocks:
                num_private = wanted - len(hit)
            else:
                num_extra = wanted - num_hit_blocks
            num_hit_blocks = wanted
        hit_tokens = num_hit_blocks * self.block_size
        pool = self.pool
        self.num_used_blocks += _cdiv(hit_tokens + admission.num_new_tokens, self.block_size) - num_hit_blocks
        if hit:
            self.num_used_blocks += pool.touch(hit)
        if num_private:
            pool.take_private(state.private_run, num_private)  # type: ignore[arg-type]
            self.num_used_blocks += num_private
        self.num_used_blocks += num_extra
        self._drop_run(state)
        state.held_blocks = list(hit)
        state.num_cached_blocks = num_hit_blocks
        state.computed = hit_tokens + admission.num_new_tokens
        self._cache_blocks(state, state.computed)
        return hit_tokens

    def step(
        self,
        running: Sequence[tuple[str, int]],
        victims: Sequence[tuple[str, int, bool]],
        admissions: Sequence[Admission],
        kv_blocks_used: int | None = None,
        finishing: Sequence[tuple[str, int]] = (),
    ) -> dict[str, int]:
        """One step as the engine ran it: `running` (id, new tokens) the requests it ran that were running
        before, in running-queue order; `victims` (id, prompt plus emitted tokens, whether the block holding its
        last computed token has no hash: under async scheduling, when that token was sampled by its run the
        step before) those it preempted, tail first; `admissions` in admission order. Returns the hit (tokens)
        of each admission.

        `finishing` (async scheduling): requests the previous step finished, which vLLM frees after this step's
        schedule when that step was still in flight, else before; the engine's count of blocks in use
        (`kv_blocks_used`, taken after the schedule) says which."""
        pending = list(victims)
        for request_id, num_new_tokens in running:
            state = self._state(request_id)
            num_new_blocks = _cdiv(state.computed + num_new_tokens, self.block_size) - _cdiv(
                state.computed, self.block_size
            )
            # vLLM preempts from the tail while the running request cannot allocate its blocks.
            while pending and num_new_blocks > self.num_usable_blocks - self.num_used_blocks:
                self._free(*pending.pop(0), resumable=True)
            self.num_used_blocks += num_new_blocks
            state.computed += num_new_tokens
            self._cache_blocks(state, state.computed)
        for victim in pending:  # the last running request, preempting itself, or one the step did not run
            self._free(*victim, resumable=True)
        hits = {a.request_id: self._admit(a) for a in admissions}
        if finishing and kv_blocks_used is not None and kv_blocks_used != self.num_used_blocks:
            # Freed before this schedule. Freeing them now keeps the queue's order unless the step evicted.
            self.finished(finishing)
            finishing = ()
        if kv_blocks_used is not None and kv_blocks_used != self.num_used_blocks:
            self.mismatches += 1
            self.num_used_blocks = kv_blocks_used  # the engine's count is the truth; the order stays a guess
        self.finished(finishing)
        return hits

    def finished(self, finished: Iterable[tuple[str, int]]) -> None:
        """Requests that left the engine, (id, prompt plus emitted tokens), in running-queue order."""
        for request_id, num_tokens in finished:
            state = self._requests.get(request_id)
            if state is None:
                continue
            if state.computed:
                self._free(request_id, num_tokens, resumable=False)
            self._drop_run(state)
            del self._requests[request_id]

    def free_queue(self, finishing: Sequence[tuple[str, int]] = ()) -> tuple[FreeQueueEntry, ...]:
        """The free queue's cached part, front (next evicted) first: a window's start state. `finishing`
        (async scheduling): requests finished and not yet freed, whose blocks join the queue's back as their
        free will put them there (the window does not hold them)."""
        self._evict()
        entries: list[FreeQueueEntry] = [
            (entry.owner, entry.lo, entry.hi) if isinstance(entry, _PrivateRun) else entry.block_hash
            for entry in self.pool.queue
        ]
        ref_cnt: dict[_Block, int] = {}
        for request_id, num_tokens in finishing:
            state = self._requests.get(request_id)
            if state is None or not state.computed:
                continue
            output_hashes = self._output_hashes_to_cache(state)
            held = len(state.held_blocks) + len(output_hashes)
            if state.num_cached_blocks > held:  # as `_free` puts them: nobody's to hit
                reachable = max((num_tokens - 1) // self.block_size, held)
                if state.num_cached_blocks > reachable:
                    entries.append(("", reachable, state.num_cached_blocks))
                if reachable > held:
                    entries.append(("", held, min(state.num_cached_blocks, reachable)))
            entries += reversed(output_hashes)  # cached as it is freed, by nobody else held
            for block in reversed(state.held_blocks):
                ref_cnt[block] = ref_cnt.get(block, block.ref_cnt) - 1
                if ref_cnt[block] == 0:
                    entries.append(block.block_hash)
        return tuple(entries)
