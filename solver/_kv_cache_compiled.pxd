# The C types of the compiled prefix cache: solver/kv_cache.py compiled by Cython as
# `vllm_shadow.solver._kv_cache_compiled` (see setup.py), beside the compiled simulator core. The .py stays the one
# source of the algorithm; this file only declares types for it (Cython's "augmenting .pxd"): the runs, free-queue
# entries and the pool become extension types with C fields, the pool's internal steps C methods, positions and
# counts C integers. Everything the simulator and the tests call stays callable from Python (cpdef / def).

cimport cython


@cython.final
cdef class CachedRun:
    cdef public object block_hashes
    cdef public Py_ssize_t lo
    cdef public Py_ssize_t hi
    cdef public Py_ssize_t ref_cnt
    cdef public Py_ssize_t stamp
    cdef public CachedRun next
    cdef public FreeEntry entry
    cdef public bint placed


@cython.final
cdef class FreeEntry:
    cdef public list runs


@cython.final
cdef class PrivateRun:
    cdef public Py_ssize_t hi
    cdef public Py_ssize_t lo


@cython.locals(entry=tuple, total=Py_ssize_t)
cpdef Py_ssize_t num_blocks(list entries) except -1

@cython.locals(runs=list, run=CachedRun, _lo=Py_ssize_t, hi=Py_ssize_t)
cpdef list held_runs(list entries)

@cython.locals(run=CachedRun, lo=Py_ssize_t, hi=Py_ssize_t, total=Py_ssize_t)
cpdef Py_ssize_t num_held_blocks(list entries) except -1


@cython.final
cdef class BlockPool:
    cdef public dict cached_block_hash_to_block
    cdef public object free_block_queue
    cdef public Py_ssize_t num_queued_blocks
    cdef public Py_ssize_t num_evicted_blocks
    cdef public Py_ssize_t _num_inserts
    cdef public Py_ssize_t version
    cdef public list run_starts
    cdef public list start_positions
    cdef public Py_ssize_t num_unplaced_runs

    @cython.locals(lo=Py_ssize_t, runs=list)
    cdef _index(self, CachedRun run)
    @cython.locals(run_starts=list)
    cdef _count_start(self, Py_ssize_t lo)
    @cython.locals(lo=Py_ssize_t, run_starts=list, start_positions=list, runs=list)
    cdef _unindex(self, CachedRun run)
    @cython.locals(index=dict, start_positions=list, first=Py_ssize_t)
    cdef list _runs_starting_in(self, object block_hashes, Py_ssize_t start, Py_ssize_t stop)
    cdef CachedRun _split(self, CachedRun run, Py_ssize_t at)

    @cython.locals(index=dict, num_hashes=Py_ssize_t, runs=list, run=CachedRun,
                   lo=Py_ssize_t, end=Py_ssize_t, stop=Py_ssize_t, candidates=list, found=list,
                   reach=Py_ssize_t, scanned=Py_ssize_t, position=Py_ssize_t, start=Py_ssize_t,
                   _stamp=Py_ssize_t)
    cpdef list find_longest_cache_hit(self, object block_hashes, Py_ssize_t max_num_blocks)

    @cython.locals(num_taken=Py_ssize_t, i=Py_ssize_t, run=CachedRun, lo=Py_ssize_t, hi=Py_ssize_t)
    cpdef Py_ssize_t touch(self, list hit) except -1

    @cython.locals(entry=FreeEntry, left_over=list, taken=CachedRun, part=CachedRun, place=Py_ssize_t)
    cdef CachedRun _take_free(self, CachedRun run, Py_ssize_t lo, Py_ssize_t hi)

    @cython.locals(start=Py_ssize_t, run=CachedRun, index=dict, runs=list, run_starts=list, last=tuple,
                   last_run=CachedRun)
    cpdef cache_full_blocks(self, list held, object block_hashes, Py_ssize_t num_full_blocks)

    @cython.locals(hit=list)
    cpdef Py_ssize_t hold_initial(self, list held, object block_hashes, Py_ssize_t num_full_blocks) except -1

    @cython.locals(freed=list, run=CachedRun, entry=FreeEntry, num_freed=Py_ssize_t, first=tuple)
    cpdef Py_ssize_t free_blocks(self, list held) except -1

    @cython.locals(entry=FreeEntry, run=CachedRun)
    cdef _enqueue(self, list runs)

    @cython.locals(run=CachedRun)
    cpdef CachedRun cache_full_block(self, object block_hash)

    cpdef bint free_block(self, CachedRun run) except -1

    @cython.locals(run=PrivateRun)
    cpdef PrivateRun free_private_run(self, Py_ssize_t lo, Py_ssize_t hi)

    cpdef take_private(self, PrivateRun run, Py_ssize_t num_blocks)

    @cython.locals(num_surplus=Py_ssize_t, num_left=Py_ssize_t, size=Py_ssize_t, runs=list, run=CachedRun,
                   private=PrivateRun, freed_together=FreeEntry)
    cpdef evict_to(self, Py_ssize_t num_free_blocks)


@cython.locals(run_hashes=object, length=Py_ssize_t, good=Py_ssize_t, bad=Py_ssize_t, middle=Py_ssize_t)
cdef Py_ssize_t _match_length(CachedRun run, object block_hashes, Py_ssize_t position,
                              Py_ssize_t num_hashes) except -1
