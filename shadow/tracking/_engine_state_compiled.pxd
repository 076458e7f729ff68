# The C types of the compiled engine tracker: shadow/tracking/engine_state.py compiled by Cython as
# `vllm_shadow.tracking._engine_state_compiled` (see setup.py), as solver/simulator.py is. The .py stays the one
# source of the algorithm and the oracle (VLLM_SHADOW_PURE_PYTHON=1); this file only declares types for it
# (Cython's "augmenting .pxd"): a request becomes an extension type with C fields, and the per-request walk of a
# step (`_schedule`) runs on C integers. A declaration that does not match the .py fails the build.
#
# Token counts are C 64-bit integers (`long long`) and setup.py compiles this module with overflowcheck: a count
# that would not fit raises OverflowError instead of wrapping, never a different figure. (The wire admits counts
# up to 2**63 - 1 each, adapters/validation.py; an engine's are below 2**31.) Times are C doubles, as Python's
# floats are: the same IEEE operations.

cimport cython


@cython.final
cdef class _Request:
    cdef public Py_ssize_t admission
    cdef public double arrival
    cdef public Py_ssize_t arrival_step
    cdef public object block_hashes
    cdef public long long computed
    cdef public long long dropped_kv
    cdef public double finish
    cdef public bint finished
    cdef public double first_token
    cdef public long long generated
    cdef public bint last_decode
    cdef public double last_progress
    cdef public Py_ssize_t last_run
    cdef public bint last_sampled
    cdef public object max_tokens
    cdef public object output_block_hashes
    cdef public Py_ssize_t prev_run
    cdef public object priority
    cdef public long long prompt
    cdef public Py_ssize_t refs
    cdef public object reported_output
    cdef public object request_id
    cdef public bint running
    cdef public bint tainted


@cython.locals(batch=list, new_tokens=list, index=Py_ssize_t)
cpdef tuple _lookup(dict requests, dict scheduled)


@cython.locals(
    request=_Request,
    n=cython.longlong,
    computed=cython.longlong,
    generated=cython.longlong,
    after=cython.longlong,
    again=cython.longlong,
    rest=cython.longlong,
    recomputed=cython.longlong,
    tokens=cython.longlong,
    kv_tokens=cython.longlong,
    attention_units=cython.longlong,
    count=cython.longlong,
    extra_tokens=cython.longlong,
    extra_kv=cython.longlong,
    extra_attention=cython.longlong,
    extra_count=cython.longlong,
    index=Py_ssize_t,
)
cpdef tuple _schedule(list batch, list new_tokens, dict running, object waiting, dict hits,
                      Py_ssize_t admissions, bint track_runs, Py_ssize_t step_index, double end)


# engine_state.py's `_new_slots` (its plain-Python twin is defined there under `not cython.compiled`): an instance
# of a slots dataclass without its `__init__`, each slot set at its member descriptor's offset (as the descriptor
# sets a slot of a fresh object), then left out of the cyclic collector's walks. `_slots` checked `cls` and its
# slots at import: a dataclass whose `__new__` is object's, whose `__init__` only sets them.
cdef extern from *:
    """
    #include <structmember.h>
    static PyObject *__pyx_tracker_new_slots(PyObject *cls, PyObject *slots, PyObject *values, PyObject *defaults) {
        Py_ssize_t given = PyTuple_GET_SIZE(values), count = PyTuple_GET_SIZE(slots), index;
        PyObject *obj, *value;
        if (given + PyTuple_GET_SIZE(defaults) != count) {
            PyErr_SetString(PyExc_TypeError, "one value a slot");
            return NULL;
        }
        obj = ((PyTypeObject *)cls)->tp_alloc((PyTypeObject *)cls, 0);
        if (obj == NULL) return NULL;
        for (index = 0; index < count; index++) {
            value = index < given ? PyTuple_GET_ITEM(values, index) : PyTuple_GET_ITEM(defaults, index - given);
            Py_INCREF(value);
            *(PyObject **)((char *)obj + ((PyMemberDescrObject *)PyTuple_GET_ITEM(slots, index))->d_member->offset) = value;
        }
        PyObject_GC_UnTrack(obj);
        return obj;
    }
    """
    object _new_slots "__pyx_tracker_new_slots"(object cls, tuple slots, tuple values, tuple defaults)

cdef extern from "Python.h":
    int _dict_set "PyDict_SetItem"(object mapping, object key, object value) except -1
