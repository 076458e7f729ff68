# The C types of the compiled simulator core: solver/simulator.py compiled by Cython as
# `vllm_shadow.solver._simulator_compiled` (see setup.py). The .py stays the one source of the algorithm; this
# file only declares types for it (Cython's "augmenting .pxd"): the classes become extension types with C fields,
# the hot methods C functions, and their counters C integers. A declaration that does not match the .py fails the
# build.
#
# Times in picoseconds are C 64-bit integers (`long long`: 2**63 ps is 106 days), token and block counts C
# integers (Py_ssize_t): setup.py compiles this module with overflowcheck, so that a figure that would not fit
# raises OverflowError instead of wrapping, and `simulate` (the dispatch at the end of simulator.py) then runs the
# plain-Python core, whose ints are unbounded: the compiled core's figures equal the pure core's to the last digit.
# A time becomes seconds as in Python (`ps / PS_PER_S`, PS_PER_S a Python int): correctly rounded.

cimport cython

cpdef Py_ssize_t cdiv(Py_ssize_t a, Py_ssize_t b)

cpdef Py_ssize_t recomputed_tokens(Py_ssize_t computed, Py_ssize_t new, Py_ssize_t dropped_kv)

cpdef (Py_ssize_t, Py_ssize_t) request_without_recompute(Py_ssize_t new, Py_ssize_t context, Py_ssize_t recomputed)

@cython.locals(i=Py_ssize_t, without_new=list, without_context=list, new=Py_ssize_t, context=Py_ssize_t)
cpdef tuple without_recompute(object new_tokens, object context_tokens, object recomputed)

cdef Py_ssize_t _JOB_SHIFT
cdef long long _NEVER

cdef long long _EXACT_PS
cdef double _ROUND_LIMIT
cdef double _seconds(long long ps) except? -1

@cython.locals(arrival_time=cython.longlong, request=_Request, num_prompt_tokens=Py_ssize_t,
               max_tokens=Py_ssize_t, num_prompt_blocks=Py_ssize_t, queue_order=cython.longlong)
cdef _Request _new_request(object r, Py_ssize_t index, object order, Py_ssize_t block_size,
                           Py_ssize_t num_usable_blocks)

# A __slots__ class's slot, by its member descriptor (simulator.py's `_slot` checks that it is one, of an object
# slot): read or set at the descriptor's offset, as its own get and set do, when the object is exactly of the
# descriptor's class; otherwise by name. Also an instance without `__init__` (`tp_new`, every slot empty), and the
# cyclic collector's untracking. simulator.py defines their plain-Python twins (under `not cython.compiled`).
cdef extern from *:
    """
    #include <structmember.h>
    static PyObject **__pyx_shadow_slot(PyObject *obj, PyObject *slot) {
        if (Py_TYPE(obj) != PyDescr_TYPE(slot)) return NULL;
        return (PyObject **)((char *)obj + ((PyMemberDescrObject *)slot)->d_member->offset);
    }
    static PyObject *__pyx_shadow_slot_get(PyObject *obj, PyObject *slot) {
        PyObject **field = __pyx_shadow_slot(obj, slot);
        if (field == NULL || *field == NULL) return PyObject_GetAttr(obj, PyDescr_NAME(slot));
        Py_INCREF(*field);
        return *field;
    }
    static int __pyx_shadow_slot_set(PyObject *obj, PyObject *slot, PyObject *value) {
        PyObject **field = __pyx_shadow_slot(obj, slot);
        PyObject *old;
        if (field == NULL) return PyObject_SetAttr(obj, PyDescr_NAME(slot), value);
        old = *field;
        Py_INCREF(value);
        *field = value;
        Py_XDECREF(old);
        return 0;
    }
    static int __pyx_shadow_slots_set(PyObject *obj, PyObject *slots, Py_ssize_t start, PyObject *values) {
        Py_ssize_t index, n = PyTuple_GET_SIZE(values);
        if (start < 0 || start + n > PyTuple_GET_SIZE(slots)) {
            PyErr_SetString(PyExc_IndexError, "more values than slots");
            return -1;
        }
        for (index = 0; index < n; index++)
            if (__pyx_shadow_slot_set(obj, PyTuple_GET_ITEM(slots, start + index), PyTuple_GET_ITEM(values, index)) < 0)
                return -1;
        return 0;
    }
    static PyObject *__pyx_shadow_new_bare(PyObject *cls) {
        PyTypeObject *type = (PyTypeObject *)cls;
        PyObject *no_args, *obj;
        /* object.__new__ without arguments only allocates (after checks that pass here): the allocation alone. */
        if (type->tp_new == PyBaseObject_Type.tp_new && !PyType_HasFeature(type, Py_TPFLAGS_IS_ABSTRACT))
            return type->tp_alloc(type, 0);
        no_args = PyTuple_New(0);
        if (no_args == NULL) return NULL;
        obj = ((PyTypeObject *)cls)->tp_new((PyTypeObject *)cls, no_args, NULL);
        Py_DECREF(no_args);
        return obj;
    }
    """
    object _slot_get "__pyx_shadow_slot_get"(object obj, object slot)
    int _slot_set "__pyx_shadow_slot_set"(object obj, object slot, object value) except -1
    int _slots_set "__pyx_shadow_slots_set"(object obj, tuple slots, Py_ssize_t start, tuple values) except -1
    object _new_bare "__pyx_shadow_new_bare"(object cls)
    void _untrack "PyObject_GC_UnTrack"(object obj)

cdef extern from "math.h":
    double _sqrt "sqrt"(double x)

cdef tuple _RECORD_SLOTS
cdef tuple _RECORD_DEFAULTS
cdef object _RECORD_FIRST_SCHEDULED
cdef object _RECORD_FIRST_TOKEN
cdef object _RECORD_FINISH
cdef object _ARRIVAL_REQUEST_ID
cdef object _ARRIVAL_TIME
cdef object _ARRIVAL_PROMPT_TOKENS
cdef object _ARRIVAL_OUTPUT_TOKENS
cdef object _ARRIVAL_PRIORITY
cdef object _ARRIVAL_BLOCK_HASHES
cdef object _RUNNING_REQUEST
cdef object _RUNNING_COMPUTED_TOKENS
cdef object _RUNNING_GENERATED_TOKENS
cdef object _RUNNING_FINISHING
cdef object _RUNNING_DECODED_IN_FLIGHT

@cython.locals(record=object)
cpdef object _new_record(object request_id, object arrival, object prompt_tokens, object output_tokens,
                         object priority)

cdef tuple _STEP_SLOTS
cdef tuple _STEP_UNSET

@cython.locals(logged=object, values=tuple)
cdef object _new_step(object step, object start_time, object duration, dict scheduled_tokens, tuple preempted,
                      object kv_blocks_used, dict cached_tokens)

@cython.locals(seconds=double, x=double, n=cython.longlong, rest=double)
cdef long long _to_ps(object time) except? -1

# A C call from the core (its arrays), callable from Python too.
cpdef object _zeros(Py_ssize_t n)

@cython.locals(i=Py_ssize_t, n=Py_ssize_t)
cdef bint _ascending(list values) except -1

cdef bint _IN_C

@cython.locals(start=Py_ssize_t, end=Py_ssize_t, root=Py_ssize_t, child=Py_ssize_t, value=cython.longlong)
cpdef _sort_ascending(long long[::1] values, Py_ssize_t n)

# Its float estimate sees what the pure core's sees (C doubles: the same IEEE operations); a figure past a C
# integer's range raises OverflowError, and the plain-Python core runs (see `simulate`).
@cython.locals(half=double, area=double, exact=bint, j=cython.longlong)
cdef Py_ssize_t _steps_starting_before(long long gap, long long first_step, long long slope) except? -1


@cython.final
cdef class _Request:
    cdef public object request_id
    cdef public long long arrival_time
    cdef public Py_ssize_t num_prompt_tokens
    cdef public Py_ssize_t max_tokens
    cdef public object queue_key
    cdef public object record
    cdef public Py_ssize_t num_output_tokens
    cdef public Py_ssize_t num_computed_tokens
    cdef public bint implicit_decoder
    cdef public Py_ssize_t decode_base
    cdef public Py_ssize_t dropped_kv
    cdef public Py_ssize_t finish_seq
    cdef public Py_ssize_t num_reserved_blocks
    cdef public object block_hashes
    cdef public object output_block_hashes
    cdef public list held_blocks
    cdef public Py_ssize_t num_cached_blocks
    cdef public object private_run
    cdef public object hit_memo
    cdef public Py_ssize_t running_seq
    cdef public bint finishing
    cdef public bint freed
    cdef public Py_ssize_t implicit_stamp
    cdef public Py_ssize_t last_run_step
    cdef public Py_ssize_t prev_run_step
    cdef public bint last_run_decode
    cdef public bint last_run_sampled
    cdef public bint ever_scheduled
    cdef public Py_ssize_t scheduled_new_tokens
    cdef public Py_ssize_t scheduled_computed_tokens
    cdef public Py_ssize_t scheduled_plan
    cdef public Py_ssize_t scheduled_blocks
    cdef public long long queue_order
    cdef public Py_ssize_t queue_index
    cdef public long long priority

    cdef _init(self, object request_id, long long arrival_time, Py_ssize_t num_prompt_tokens,
               Py_ssize_t max_tokens, object queue_key, object record, object block_hashes,
               object output_block_hashes)


@cython.locals(index=Py_ssize_t)
cdef Py_ssize_t _index(list requests, _Request request) except -1

cdef _remove(list requests, _Request request)

@cython.locals(index=Py_ssize_t, worst=_Request, r=_Request)
cdef _Request _worst_priority(list running)

@cython.locals(a_finish=Py_ssize_t, b_finish=Py_ssize_t)
cdef bint _peak_before(_Request a, _Request b) except -1

@cython.locals(lo=Py_ssize_t, hi=Py_ssize_t, mid=Py_ssize_t)
cdef Py_ssize_t _peak_place(list order, _Request request) except -1

@cython.locals(i=Py_ssize_t, j=Py_ssize_t, value=cython.longlong)
cdef _sort_in(long long[::1] values, Py_ssize_t start, Py_ssize_t n)

cdef bint _queued_before(_Request a, _Request b) noexcept
cdef bint _arrived_before(_Request a, _Request b) noexcept

@cython.locals(pos=Py_ssize_t, parent_pos=Py_ssize_t, parent=_Request)
cdef _heap_push(list heap, _Request request)

@cython.locals(last=_Request, top=_Request, size=Py_ssize_t, pos=Py_ssize_t, child=Py_ssize_t)
cdef _Request _heap_pop(list heap)

@cython.locals(seq=Py_ssize_t, lo=Py_ssize_t, hi=Py_ssize_t, mid=Py_ssize_t, r=_Request)
cpdef _remove_in_seq_order(list requests, _Request request)


@cython.final
cdef class _WaitingQueue:
    cdef public bint ordered
    cdef public list fifo
    cdef public Py_ssize_t head
    cdef public list heap
    cdef public Py_ssize_t size
    cdef public bint in_arrival_order
    cdef public _Request tail

    cdef add_request(self, _Request request)
    cdef prepend_request(self, _Request request)
    cdef _Request peek_request(self)
    @cython.locals(request=_Request)
    cdef _Request pop_request(self)


@cython.final
cdef class Simulator:
    cdef public object policy
    cdef public Py_ssize_t max_num_seqs
    cdef public Py_ssize_t max_num_batched_tokens
    cdef public Py_ssize_t long_prefill_token_threshold
    cdef public bint chunked_prefill
    cdef public bint decode_first
    cdef public bint eviction
    cdef public bint continuous_batching
    cdef public bint prefill_first
    cdef public bint static_batching
    cdef public bint admit_full_prompt
    cdef public bint admit_future_peak
    cdef public bint priority_order
    cdef public bint least_computed_victim
    cdef public Py_ssize_t block_size
    cdef public Py_ssize_t num_kv_blocks
    cdef public Py_ssize_t num_usable_blocks
    cdef public Py_ssize_t watermark_blocks
    cdef public long long step_ps
    cdef public long long token_ps
    cdef public long long kv_token_ps
    cdef public long long attention_pair_ps
    cdef public long long request_ps
    cdef public bint record_steps
    cdef public bint fast
    cdef public Py_ssize_t max_steps
    cdef public list running
    cdef public _WaitingQueue waiting
    cdef public Py_ssize_t num_used_blocks
    cdef public Py_ssize_t num_reserved_blocks
    cdef public long long now
    cdef public long long busy_ps
    cdef public long long recompute_ps
    cdef public Py_ssize_t num_steps
    cdef public Py_ssize_t peak_used_blocks
    cdef public Py_ssize_t num_tokens_processed
    cdef public Py_ssize_t decode_steps
    cdef public Py_ssize_t num_implicit_decoders
    cdef public Py_ssize_t sum_decode_base
    cdef long long[::1] decode_base_residues
    cdef long long[::1] finish_steps
    cdef long long[::1] finish_seqs
    cdef Py_ssize_t finish_heap_size
    cdef public list finish_heap_requests
    cdef public long long next_finish
    cdef public Py_ssize_t finish_heap_pushes
    cdef public bint admission_blocked
    cdef public list step_log
    cdef public bint caching
    cdef public object block_pool
    cdef public dict step_cached_tokens
    cdef public dict implicit_tokens
    cdef public bint async_scheduling
    cdef public list finishing
    cdef public Py_ssize_t last_decode_step
    cdef public Py_ssize_t num_running_seq
    cdef public Py_ssize_t plan_serial
    cdef public Py_ssize_t num_scheduled_decoders
    cdef long long[::1] peak_jobs
    cdef public list peak_order
    cdef public Py_ssize_t demanded_running
    cdef public Py_ssize_t demanded_tokens
    cdef public Py_ssize_t demanded_chunk
    cdef public bint picked_victim
    cdef public bint newest_victims
    cdef public bint least_computed_victims
    cdef public bint worst_priority_victims

    cpdef add_running(self, _Request request, Py_ssize_t num_computed_tokens, Py_ssize_t num_output_tokens)
    cdef _hold_initial_blocks(self, _Request request)

    @cython.locals(num_arrivals=Py_ssize_t, next_arrival=Py_ssize_t, fed=bint, request=_Request,
                   clock=cython.longlong, when=cython.longlong, num_tokens=Py_ssize_t,
                   max_tokens_processed=Py_ssize_t)
    cpdef run(self, list arrival_whens, list arriving, bint by_step)

    @cython.locals(when=cython.longlong)
    cdef Py_ssize_t _feed_idle(self, list arrival_whens, list arriving, Py_ssize_t next_arrival, bint by_step) except -1
    @cython.locals(finish_at=cython.longlong)
    cdef _to_implicit(self, _Request request)
    @cython.locals(pos=Py_ssize_t, parent=Py_ssize_t, steps=cython.longlong[::1], seqs=cython.longlong[::1])
    cdef _push_finish(self, long long finish_at, Py_ssize_t seq)
    @cython.locals(pos=Py_ssize_t, child=Py_ssize_t, size=Py_ssize_t, top=Py_ssize_t, finish_at=cython.longlong,
                   seq=Py_ssize_t, steps=cython.longlong[::1], seqs=cython.longlong[::1])
    cdef Py_ssize_t _pop_finish(self) except -1
    @cython.locals(size=Py_ssize_t, steps=cython.longlong[::1], seqs=cython.longlong[::1], i=Py_ssize_t)
    cdef _grow_finish_heap(self)
    @cython.locals(index=Py_ssize_t)
    cdef _to_explicit(self, _Request request)
    cdef Py_ssize_t _num_computed_tokens(self, _Request request) except? -1
    cdef Py_ssize_t _num_output_tokens(self, _Request request) except? -1
    cdef bint _is_decoding(self, _Request request) except -1
    cdef _preempt_request(self, _Request request, Py_ssize_t num_unrun_tokens=*)
    cdef _demand(self, Py_ssize_t tokens, Py_ssize_t chunk)
    cdef _free_request(self, _Request request)

    @cython.locals(num_cached_blocks=Py_ssize_t, held_blocks=list, num_freed=Py_ssize_t, reachable=Py_ssize_t,
                   last_step=Py_ssize_t)
    cdef Py_ssize_t _free_cached_blocks(self, _Request request, bint preempted=*) except? -1

    @cython.locals(num_full_blocks=Py_ssize_t, held_blocks=list, index=Py_ssize_t)
    cdef _cache_blocks(self, _Request request, Py_ssize_t num_tokens)

    @cython.locals(max_num_blocks=Py_ssize_t, num_held_hit_blocks=Py_ssize_t, num_private_hits=Py_ssize_t)
    cdef tuple _find_longest_cache_hit(self, _Request request, Py_ssize_t num_tokens)

    @cython.locals(watermark=Py_ssize_t, num_free_blocks=Py_ssize_t)
    cdef bint _admission_fits_cached(self, _Request request, Py_ssize_t num_new_tokens,
                                     Py_ssize_t num_computed_tokens, Py_ssize_t num_held_hit_blocks) except -1

    @cython.locals(watermark=Py_ssize_t)
    cdef bint _admission_fits(self, _Request request, Py_ssize_t num_new_tokens,
                              Py_ssize_t num_free_blocks) except -1

    @cython.locals(block_size=Py_ssize_t, final_tokens=Py_ssize_t, held=Py_ssize_t, running=list,
                   num_jobs=Py_ssize_t, held_now=Py_ssize_t, i=Py_ssize_t, left=Py_ssize_t, live=Py_ssize_t,
                   least_left=Py_ssize_t, decode_steps=Py_ssize_t, r=_Request, jobs=cython.longlong[::1], job=cython.longlong,
                   num_decoders=Py_ssize_t, leading=bint, bound_held=Py_ssize_t, bound_left=Py_ssize_t,
                   held_explicit=Py_ssize_t, num_sorted=Py_ssize_t, peak_order=list)
    cdef bint _peak_fits(self, _Request candidate, Py_ssize_t limit) except -1

    cdef Py_ssize_t _long_prefill_token_threshold(self) except? -1

    @cython.locals(blocked=bint, request=_Request, num_tokens=Py_ssize_t, num_computed_tokens=Py_ssize_t,
                   num_new_tokens=Py_ssize_t, num_private_hits=Py_ssize_t, num_held_hit_blocks=Py_ssize_t,
                   given=Py_ssize_t, chunk=Py_ssize_t)
    cdef Py_ssize_t _schedule_waiting(self, Py_ssize_t token_budget, list scheduled,
                                      Py_ssize_t long_prefill_token_threshold) except? -1

    @cython.locals(num_hit_blocks=Py_ssize_t, num_hit_tokens=Py_ssize_t)
    cdef _admit_with_hits(self, _Request request, list hit_blocks, Py_ssize_t num_private_hits,
                          Py_ssize_t num_tokens)

    @cython.locals(token_budget=Py_ssize_t, long_prefill_token_threshold=Py_ssize_t, scheduled=list,
                   preempted_reqs=list, static_admit=bint, req_index=Py_ssize_t,
                   request=_Request, num_computed_tokens=Py_ssize_t, num_tokens=Py_ssize_t,
                   num_new_tokens=Py_ssize_t, num_new_blocks=Py_ssize_t, victim_index=Py_ssize_t,
                   preempted_req=_Request, candidate=_Request, num_unscheduled=Py_ssize_t,
                   num_unrun_tokens=Py_ssize_t, chunk=Py_ssize_t)
    cdef _schedule_literal(self)

    @cython.locals(victim=_Request, candidate=_Request, index=Py_ssize_t)
    cdef _Request _least_computed(self)
    cdef _note_victim(self, _Request victim)

    @cython.locals(j=Py_ssize_t, num_new_tokens=Py_ssize_t, num_computed_tokens=Py_ssize_t)
    cdef Py_ssize_t _unschedule(self, _Request victim, list scheduled) except? -1

    @cython.locals(num_new_tokens=Py_ssize_t, j=Py_ssize_t, decoding=bint)
    cdef Py_ssize_t _unschedule_cached(self, _Request victim, list scheduled) except? -1

    @cython.locals(request=_Request)
    cdef _freeze_decoders(self)

    @cython.locals(block_size=Py_ssize_t, scheduled=list, long_prefill_token_threshold=Py_ssize_t,
                   num_decoders=Py_ssize_t, token_budget=Py_ssize_t, num_new_blocks=Py_ssize_t,
                   request=_Request, num_computed_tokens=Py_ssize_t, num_new_tokens=Py_ssize_t, blocks=Py_ssize_t,
                   preempted_reqs=list, preempted_req=_Request, running=list, index=Py_ssize_t,
                   first=Py_ssize_t, chunk=Py_ssize_t)
    cdef bint _step_fast(self) except -1

    @cython.locals(num_scheduled_tokens=Py_ssize_t, kv_tokens=Py_ssize_t, attention_pairs=Py_ssize_t,
                   num_new_tokens=Py_ssize_t, num_computed_tokens=Py_ssize_t, step=Py_ssize_t, finished=list,
                   track_runs=bint, request=_Request, recomputing=bint,
                   seq=Py_ssize_t, start=cython.longlong, duration=cython.longlong)
    cdef _apply(self, list scheduled, list preempted_reqs, Py_ssize_t num_decoders)

    # Py_ssize_t, not long long, only because Cython 3.3 spells a long long's error value -1LLLL.
    @cython.locals(request=_Request, num_new_tokens=Py_ssize_t, num_computed_tokens=Py_ssize_t,
                   num_tokens=Py_ssize_t, num_requests=Py_ssize_t, kv_tokens=Py_ssize_t,
                   attention_pairs=Py_ssize_t, without_ps=cython.longlong)
    cdef Py_ssize_t _recompute_tax(self, list scheduled, Py_ssize_t num_decoders, long long duration) except? -1

    @cython.locals(request=_Request)
    cdef _free_finishing(self)

    @cython.locals(request=_Request, running=list)
    cdef _finish_requests(self, list finished, object end_s)

    @cython.locals(request=_Request, num_scheduled_tokens=dict)
    cdef _log_step(self, long long start, long long duration, list scheduled, Py_ssize_t num_decoders,
                   list preempted_reqs)

    @cython.locals(block_size=Py_ssize_t, full_cycles=Py_ssize_t, rest=Py_ssize_t, total=Py_ssize_t,
                   end=Py_ssize_t, first=Py_ssize_t, residues=cython.longlong[::1], residue=Py_ssize_t)
    cdef Py_ssize_t _decode_blocks_over(self, Py_ssize_t num_steps) except? -1

    @cython.locals(num_decoders=Py_ssize_t, static_full=bint, k=Py_ssize_t, num_free_blocks=Py_ssize_t,
                   lo=Py_ssize_t, hi=Py_ssize_t, mid=Py_ssize_t, num_new_blocks=Py_ssize_t, j=Py_ssize_t,
                   finished=list, request=_Request, seq=Py_ssize_t,
                   first_step_ps=cython.longlong, slope_ps=cython.longlong, gap=cython.longlong,
                   total_ps=cython.longlong, head=_Request, sequence=Py_ssize_t)
    cdef bint _fast_forward(self, object next_arrival_time, object next_arrival_step) except -1
