# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, infer_types=False
"""The fast path of `adapters.wire.decode_batch`: an `EventBatch` message read straight from its bytes.

`decode(data)` reads the protobuf wire format of shadow_events.proto's EventBatch in one pass and builds the
schema events (adapters/events.py) as their own constructors would, or returns None to hand the bytes to the
upb path: wire.py's `decode_batch_upb`, which stays the oracle and decides every case this one does not take.
What it takes, it must decode exactly as the upb path would (tests/test_wire_compiled.py holds the two equal on
random batches and on corrupted bytes). It takes what an honest publisher sends, and leaves to upb, so never
has to word a refusal:
- an EngineInfo (in a sender's first batch; its JSON and settings are the upb path's business): that one
  Event's bytes go to the `info` decoder wire.py passes, the upb path on that Event alone, and the batch to
  upb if it refuses them (so that the refusal is worded as for the batch);
- an unknown field or wire type, a second kind in one Event, an Event with none;
- anything malformed (a truncated field, a varint past 10 bytes, a length past the end, a string that is not
  UTF-8), and anything the upb path refuses (unequal id and count arrays, an id twice in one step);
- a uint32 field above 2^32 - 1 (upb truncates it).
Repeated numbers are read packed and unpacked, and a scalar field given twice keeps the last value, as the
protobuf specification asks of every parser. The doubles are read as little-endian IEEE 754 (wire.py does not
use this module on a big-endian machine). The numbers' quick checks (`checked`) are wire.py's own.

Cheap for the receive path, which keeps the steps it reads (a window's steps): a string that recurs in one
message (a request id in every step that schedules it, a finish reason) is decoded once and every event holds
that one str (`_Strings`), so the trackers' lookups by id find the very key they stored, its hash already made;
and the events, whose fields are numbers, strings and containers of those, are left out of the cyclic garbage
collector's walks (`PyObject_GC_UnTrack`, as CPython does itself for tuples and dicts of atomic values): they
cannot be part of a cycle, and the collector walked every step a window keeps, again and again.
"""

import dataclasses
import types

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_SetItem
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.object cimport PyObject, PyTypeObject, Py_TYPE
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcmp, memcpy


cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)

from vllm_shadow.adapters.events import EngineStep, RequestArrival, RequestFinish

cdef double _INF = float("inf")
cdef type _MEMBER_DESCRIPTOR = types.MemberDescriptorType

cdef enum:  # wire types
    VARINT = 0
    I64 = 1
    LEN = 2


cdef tuple _NO_ARGS = ()


cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
        int flags
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    int T_OBJECT_EX
    int READONLY
    void Py_INCREF(PyObject* op)


cdef enum:
    _MAX_FIELDS = 16


cdef class _Builder:
    """Builds a frozen slots dataclass as its `__init__` would, every field set, without `__init__`'s
    `object.__setattr__` per field: each field is stored straight into its slot, at the offset its member
    descriptor gives, which is what the descriptor's own setter does for an object fresh from `tp_new` (every
    slot empty; wire.py's `_frozen_builder` sets them through the descriptors)."""

    cdef type cls
    cdef Py_ssize_t fields
    cdef Py_ssize_t offsets[_MAX_FIELDS]  # each field's slot, in field order

    def __init__(self, type cls, Py_ssize_t fields):
        if hasattr(cls, "__post_init__"):
            raise TypeError(f"{cls.__name__} has a __post_init__, which this builder would skip")
        self.cls = cls
        slots = [getattr(cls, f.name) for f in dataclasses.fields(cls)]
        if len(slots) != fields or fields > _MAX_FIELDS:  # the schema changed under this reader
            raise TypeError(f"{cls.__name__} has {len(slots)} fields, this reader builds {fields}")
        cdef PyMemberDef* member
        for index, slot in enumerate(slots):
            if type(slot) is not _MEMBER_DESCRIPTOR:
                raise TypeError(f"{cls.__name__}'s field {index} is not a slot")
            member = (<PyMemberDescrObject*>slot).d_member
            if member.type != T_OBJECT_EX or member.flags & READONLY:
                raise TypeError(f"{cls.__name__}'s field {index} is not a writable object slot")
            self.offsets[index] = member.offset
        self.fields = fields

    cdef inline object new(self):
        return (<PyTypeObject*>self.cls).tp_new(self.cls, <PyObject*>_NO_ARGS, NULL)

    cdef inline void put(self, object event, Py_ssize_t index, object value) noexcept:
        """Only once per field of an event fresh from `new` (its slots empty: nothing to release)."""
        cdef PyObject** field = <PyObject**>((<char*><PyObject*>event) + self.offsets[index])
        Py_INCREF(<PyObject*>value)
        field[0] = <PyObject*>value


cdef _Builder _STEP = _Builder(EngineStep, 9)
cdef _Builder _ARRIVAL = _Builder(RequestArrival, 8)
cdef _Builder _FINISH = _Builder(RequestFinish, 5)


def new_arrival(request_id, time, prompt_tokens, output_tokens, max_tokens, priority, prefix_block_hashes,
                block_hashes):
    """wire.py's `_new_arrival` (`RequestArrival(...)` with every field given, in field order) built here: the
    engine tracker builds one per request of every window. Left out of the cyclic collector's walks, as the
    events `decode` builds are: its fields are numbers, strings and tuples of those."""
    event = _ARRIVAL.new()
    PyObject_GC_UnTrack(<PyObject*>event)
    _ARRIVAL.put(event, 0, request_id)
    _ARRIVAL.put(event, 1, time)
    _ARRIVAL.put(event, 2, prompt_tokens)
    _ARRIVAL.put(event, 3, output_tokens)
    _ARRIVAL.put(event, 4, max_tokens)
    _ARRIVAL.put(event, 5, priority)
    _ARRIVAL.put(event, 6, prefix_block_hashes)
    _ARRIVAL.put(event, 7, block_hashes)
    return event


cdef struct _Reader:
    # A cursor over one message's bytes (a C struct on the stack, one per nested message: nothing to allocate);
    # `bad` is set, and stays set, by anything malformed.
    const unsigned char* p
    const unsigned char* end
    bint bad


cdef inline uint64_t _varint(_Reader* r) noexcept:
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef unsigned char byte
    while True:
        if r.p >= r.end:
            r.bad = True
            return 0
        byte = r.p[0]
        r.p += 1
        if shift == 63 and byte > 1:  # a 10th byte holds one bit; more is not a 64-bit varint
            r.bad = True
            return 0
        result |= (<uint64_t>(byte & 0x7F)) << shift
        if byte < 0x80:
            return result
        shift += 7


cdef inline double _fixed_double(_Reader* r) noexcept:
    cdef double value = 0.0
    if r.end - r.p < 8:
        r.bad = True
        return 0.0
    memcpy(&value, r.p, 8)
    r.p += 8
    return value


cdef inline uint64_t _fixed64(_Reader* r) noexcept:
    cdef uint64_t value = 0
    if r.end - r.p < 8:
        r.bad = True
        return 0
    memcpy(&value, r.p, 8)
    r.p += 8
    return value


cdef inline Py_ssize_t _length(_Reader* r) noexcept:
    """A length-delimited field's length, checked against what is left."""
    cdef uint64_t n = _varint(r)
    if r.bad or n > <uint64_t>(r.end - r.p):
        r.bad = True
        return 0
    return <Py_ssize_t>n


cdef inline object _plain_text(_Reader* r):
    """A string field's value, or None (bad) when it is not UTF-8."""
    cdef Py_ssize_t n = _length(r)
    if r.bad:
        return None
    try:
        value = PyUnicode_DecodeUTF8(<const char*>r.p, n, NULL)
    except UnicodeDecodeError:
        r.bad = True
        return None
    r.p += n
    return value


cdef inline _Reader _sub(_Reader* r) noexcept:
    """A reader over a length-delimited field, which `r` skips."""
    cdef Py_ssize_t n = _length(r)
    cdef _Reader inner
    inner.p = r.p
    inner.end = r.p + n
    inner.bad = r.bad
    r.p += n
    return inner


cdef struct _Interned:
    const unsigned char* p  # its bytes in the message (alive while the message is read)
    Py_ssize_t n
    uint64_t hash
    PyObject* text  # NULL: a free slot; else owned by `_Strings.owned`


cdef class _Strings:
    """The strings of one message, each decoded once (an open-addressing table over their bytes), and the
    lists a step is read into, reused from step to step. One per message: nothing here is shared between
    threads, and the bytes it points into live as long as it does."""

    cdef _Interned* table
    cdef size_t mask
    cdef Py_ssize_t free  # inserts left before the table is half full; then strings are only looked up
    cdef list owned
    # A step's scheduled ids and token counts as read, the first `used` items of each (the rest left over
    # from an earlier step: overwritten, not freed and grown again step after step).
    cdef list ids, counts

    def __cinit__(self, Py_ssize_t message_bytes):
        cdef size_t size = 16
        # A string takes at least 2 bytes of the message (its tag and length): a table of about a quarter of
        # the message's bytes, at most 2,048 slots (a batch of 1,024 events holds a few hundred distinct ids).
        while size < 2048 and size * 4 < <size_t>message_bytes:
            size *= 2
        self.table = <_Interned*>PyMem_Calloc(size, sizeof(_Interned))
        if self.table == NULL:
            raise MemoryError()
        self.mask = size - 1
        self.free = <Py_ssize_t>(size // 2)
        self.owned = []
        self.ids = []
        self.counts = []

    def __dealloc__(self):
        PyMem_Free(self.table)

    cdef object get(self, const unsigned char* p, Py_ssize_t n):
        """The str of these UTF-8 bytes, the same object for the same bytes; raises UnicodeDecodeError."""
        cdef uint64_t h = 14695981039346656037ULL, word
        cdef Py_ssize_t i = 0
        cdef _Interned* entry
        while i + 8 <= n:  # FNV-1a over 8-byte words, then bytes
            memcpy(&word, p + i, 8)
            h = (h ^ word) * 1099511628211ULL
            i += 8
        while i < n:
            h = (h ^ p[i]) * 1099511628211ULL
            i += 1
        cdef size_t slot = <size_t>(h ^ (h >> 29)) & self.mask
        while True:  # ends: at most half the slots are taken
            entry = &self.table[slot]
            if entry.text == NULL:
                break
            if entry.hash == h and entry.n == n and memcmp(entry.p, p, n) == 0:
                return <object>entry.text
            slot = (slot + 1) & self.mask
        value = PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
        if self.free > 0:
            self.free -= 1
            self.owned.append(value)
            entry.p = p
            entry.n = n
            entry.hash = h
            entry.text = <PyObject*>value
        return value


cdef inline object _text(_Reader* r, _Strings strings):
    """`_plain_text` through the message's strings table."""
    cdef Py_ssize_t n = _length(r)
    if r.bad:
        return None
    try:
        value = strings.get(r.p, n)
    except UnicodeDecodeError:
        r.bad = True
        return None
    r.p += n
    return value


cdef inline int64_t _int64(uint64_t value) noexcept:
    return <int64_t>value  # an int64 travels as its two's complement


cdef inline int64_t _sint64(uint64_t value) noexcept:
    return <int64_t>(value >> 1) ^ -(<int64_t>(value & 1))  # zigzag


cdef inline void _put(list out, Py_ssize_t* used, object value):
    """Appends value to `out`; with `used` (how many items of `out` are in use), sets the next item instead
    while there is one."""
    if used == NULL:
        out.append(value)
    elif used[0] < len(out):
        out[used[0]] = value
        used[0] += 1
    else:
        out.append(value)
        used[0] += 1


cdef bint _int64s(_Reader* r, int wire, list out, bint zigzag, int64_t* least, Py_ssize_t* used=NULL):
    """A repeated int64 / sint64 field, packed (LEN) or not (VARINT), appended to `out` (see `_put`);
    `least` keeps the smallest value seen. False when malformed or of another wire type."""
    cdef _Reader packed
    cdef int64_t value
    if wire == VARINT:
        value = _sint64(_varint(r)) if zigzag else _int64(_varint(r))
        if r.bad:
            return False
        _put(out, used, value)
        if value < least[0]:
            least[0] = value
        return True
    if wire != LEN:
        return False
    packed = _sub(r)
    while not packed.bad and packed.p < packed.end:
        value = _sint64(_varint(&packed)) if zigzag else _int64(_varint(&packed))
        if packed.bad:
            break
        _put(out, used, value)
        if value < least[0]:
            least[0] = value
    return not (packed.bad or r.bad)


cdef inline dict _token_map(list ids, list counts, Py_ssize_t n=-1, Py_ssize_t n_counts=-1):
    """ids -> counts (their first n and n_counts items; all by default), or None where wire.py's _token_map
    refuses them (unequal lengths, an id twice)."""
    cdef dict tokens = {}
    cdef Py_ssize_t i
    if n < 0:
        n, n_counts = len(ids), len(counts)
    if n != n_counts:
        return None
    for i in range(n):
        PyDict_SetItem(tokens, ids[i], counts[i])
    if len(tokens) != n:
        return None
    return tokens


cdef object _step(_Reader* r, bint* checked, _Strings strings):
    cdef uint64_t key
    cdef int field, wire
    cdef int64_t number = 0, kv = 0
    cdef double start = 0.0, duration = 0.0
    cdef int64_t least_count = 0, least_cached = 0
    # What nearly every step has (ids and counts) in the message's reused lists; the rest made when present.
    cdef list ids = strings.ids, counts = strings.counts
    cdef list preempted = None, resumed = None, finished = None, cached_ids = None, cached_counts = None
    cdef Py_ssize_t n_ids = 0, n_counts = 0
    while r.p < r.end:
        key = _varint(r)
        if r.bad:
            return None
        field = <int>(key >> 3) if key >> 3 < 64 else 0
        wire = <int>(key & 7)
        if field == 1 and wire == VARINT:
            number = _int64(_varint(r))
        elif field == 2 and wire == I64:
            start = _fixed_double(r)
        elif field == 3 and wire == I64:
            duration = _fixed_double(r)
        elif field == 9 and wire == VARINT:
            kv = _int64(_varint(r))
        elif field == 4 and wire == LEN:
            name = _text(r, strings)
            if name is None:
                return None
            _put(ids, &n_ids, name)
        elif field in (6, 7, 8, 10) and wire == LEN:
            name = _text(r, strings)
            if name is None:
                return None
            if field == 6:
                if preempted is None:
                    preempted = []
                preempted.append(name)
            elif field == 7:
                if resumed is None:
                    resumed = []
                resumed.append(name)
            elif field == 8:
                if finished is None:
                    finished = []
                finished.append(name)
            else:
                if cached_ids is None:
                    cached_ids = []
                cached_ids.append(name)
        elif field == 5:
            if not _int64s(r, wire, counts, False, &least_count, &n_counts):
                return None
        elif field == 11:
            if cached_counts is None:
                cached_counts = []
            if not _int64s(r, wire, cached_counts, False, &least_cached):
                return None
        else:
            return None
        if r.bad:
            return None
    scheduled = _token_map(ids, counts, n_ids, n_counts)
    if scheduled is None:
        return None
    if cached_ids is not None or cached_counts is not None:
        cached = _token_map(cached_ids if cached_ids is not None else [],
                            cached_counts if cached_counts is not None else [])
        if cached is None:
            return None
    else:
        cached = {}
    if checked[0] and not (
        number >= 0
        and -_INF < start < _INF
        and 0.0 <= duration < _INF
        and kv >= 0
        and least_count >= 0
        and least_cached >= 0
    ):
        checked[0] = False
    event = _STEP.new()
    _STEP.put(event, 0, number)
    _STEP.put(event, 1, start)
    _STEP.put(event, 2, duration)
    _STEP.put(event, 3, scheduled)
    _STEP.put(event, 4, tuple(preempted) if preempted else ())
    _STEP.put(event, 5, tuple(resumed) if resumed else ())
    _STEP.put(event, 6, tuple(finished) if finished else ())
    _STEP.put(event, 7, kv)
    _STEP.put(event, 8, cached)
    PyObject_GC_UnTrack(<PyObject*>event)
    return event


cdef object _arrival(_Reader* r, bint* checked, _Strings strings):
    cdef uint64_t key
    cdef int field, wire
    cdef double time = 0.0
    cdef int64_t prompt = 0, output = 0, max_tokens = 0, priority = 0, least = 0
    cdef bint has_output = False, has_max_tokens = False
    cdef list prefix = [], hashes = []
    request_id = ""
    while r.p < r.end:
        key = _varint(r)
        if r.bad:
            return None
        field = <int>(key >> 3) if key >> 3 < 64 else 0
        wire = <int>(key & 7)
        if field == 1 and wire == LEN:
            request_id = _text(r, strings)
            if request_id is None:
                return None
        elif field == 2 and wire == I64:
            time = _fixed_double(r)
        elif field == 3 and wire == VARINT:
            prompt = _int64(_varint(r))
        elif field == 4 and wire == VARINT:
            output = _int64(_varint(r))
            has_output = True
        elif field == 5 and wire == VARINT:
            max_tokens = _int64(_varint(r))
            has_max_tokens = True
        elif field == 6 and wire == VARINT:
            priority = _int64(_varint(r))
        elif field == 7:
            if not _int64s(r, wire, prefix, True, &least):
                return None
        elif field == 8:
            if not _int64s(r, wire, hashes, True, &least):
                return None
        else:
            return None
        if r.bad:
            return None
    if checked[0] and not (
        -_INF < time < _INF
        and prompt >= 0
        and (not has_output or output >= 0)
        and (not has_max_tokens or max_tokens >= 0)
    ):
        checked[0] = False
    event = _ARRIVAL.new()
    _ARRIVAL.put(event, 0, request_id)
    _ARRIVAL.put(event, 1, time)
    _ARRIVAL.put(event, 2, prompt)
    _ARRIVAL.put(event, 3, output if has_output else None)
    _ARRIVAL.put(event, 4, max_tokens if has_max_tokens else None)
    _ARRIVAL.put(event, 5, priority)
    _ARRIVAL.put(event, 6, tuple(prefix) if prefix else ())
    _ARRIVAL.put(event, 7, tuple(hashes) if hashes else ())
    PyObject_GC_UnTrack(<PyObject*>event)
    return event


cdef object _finish(_Reader* r, bint* checked, _Strings strings):
    cdef uint64_t key
    cdef int field, wire
    cdef double time = 0.0
    cdef int64_t output = 0, least = 0
    cdef list hashes = []
    request_id = ""
    reason = ""
    while r.p < r.end:
        key = _varint(r)
        if r.bad:
            return None
        field = <int>(key >> 3) if key >> 3 < 64 else 0
        wire = <int>(key & 7)
        if field == 1 and wire == LEN:
            request_id = _text(r, strings)
            if request_id is None:
                return None
        elif field == 2 and wire == I64:
            time = _fixed_double(r)
        elif field == 3 and wire == VARINT:
            output = _int64(_varint(r))
        elif field == 4 and wire == LEN:
            reason = _text(r, strings)
            if reason is None:
                return None
        elif field == 5:
            if not _int64s(r, wire, hashes, True, &least):
                return None
        else:
            return None
        if r.bad:
            return None
    if checked[0] and not (-_INF < time < _INF and output >= 0):
        checked[0] = False
    event = _FINISH.new()
    _FINISH.put(event, 0, request_id)
    _FINISH.put(event, 1, time)
    _FINISH.put(event, 2, output)
    _FINISH.put(event, 3, reason)
    _FINISH.put(event, 4, tuple(hashes) if hashes else ())
    PyObject_GC_UnTrack(<PyObject*>event)
    return event


cdef object _event(_Reader* r, bint* checked, _Strings strings, object info):
    """One Event message: exactly one of step, arrival, finish, or an info through `info`; None for anything
    else."""
    cdef uint64_t key
    cdef int field
    cdef const unsigned char* begin = r.p
    key = _varint(r)
    if r.bad or (key & 7) != LEN:
        return None
    field = <int>(key >> 3) if key >> 3 < 64 else 0
    cdef _Reader inner = _sub(r)
    if r.bad or r.p != r.end:  # a second field in the Event (another kind, or the same one to merge)
        return None
    if field == 3:
        return _step(&inner, checked, strings)
    if field == 1:
        return _arrival(&inner, checked, strings)
    if field == 2:
        return _finish(&inner, checked, strings)
    if field == 4 and info is not None:
        decoded = info(PyBytes_FromStringAndSize(<const char*>begin, r.end - begin))
        if decoded is None:
            return None
        event, info_checked = decoded
        if not info_checked:
            checked[0] = False
        return event
    return None  # no kind the schema knows


def decode(object data, object info=None):
    """(events, checked, source, sequence, dropped, incarnation, part, parts, lost_batches) of an EventBatch
    message, `parts` as sent (0 when unset), or None: the upb path decides (see the module docstring).
    `info(event_bytes)`: an Event message holding an EngineInfo, decoded as (event, checked), or None to leave
    the batch to upb; without it such a batch is left to upb."""
    if type(data) is not bytes:
        return None
    cdef const unsigned char[:] view = data
    cdef _Reader r
    cdef uint64_t key, value
    cdef int field, wire
    cdef bint checked = True
    cdef list events = []
    cdef _Reader inner
    source = ""
    cdef uint64_t sequence = 0, dropped = 0, incarnation = 0, part = 0, parts = 0, lost = 0
    if view.shape[0] == 0:
        return (events, checked, source, sequence, dropped, incarnation, part, parts, lost)
    r.p = &view[0]
    r.end = r.p + view.shape[0]
    r.bad = False
    cdef _Strings strings = _Strings(view.shape[0])
    while r.p < r.end:
        key = _varint(&r)
        if r.bad:
            return None
        field = <int>(key >> 3) if key >> 3 < 64 else 0
        wire = <int>(key & 7)
        if field == 4 and wire == LEN:
            inner = _sub(&r)
            if r.bad:
                return None
            event = _event(&inner, &checked, strings, info)
            if event is None:
                return None
            events.append(event)
        elif field == 1 and wire == LEN:
            source = _plain_text(&r)
            if source is None:
                return None
        elif field == 5 and wire == I64:
            incarnation = _fixed64(&r)
        elif wire == VARINT and field in (2, 3, 6, 7, 8):
            value = _varint(&r)
            if field == 2:
                sequence = value
            elif field == 3:
                dropped = value
            elif field == 8:
                lost = value
            elif value > 0xFFFFFFFF:
                return None  # upb keeps the low 32 bits of a uint32
            elif field == 6:
                part = value
            else:
                parts = value
        else:
            return None
        if r.bad:
            return None
    return (events, checked, source, sequence, dropped, incarnation, part, parts, lost)
