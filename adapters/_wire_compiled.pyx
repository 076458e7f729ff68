# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, infer_types=False
"""The fast path of `adapters.wire.decode_batch`: an `EventBatch` message read straight from its bytes.

`decode(data)` reads the protobuf wire format of shadow_events.proto's EventBatch in one pass and builds the
schema events (adapters/events.py) as their own constructors would, or returns None to hand the bytes to the
upb path: wire.py's `decode_batch_upb`, which stays the oracle and decides every case this one does not take.
What it takes, it must decode exactly as the upb path would (tests/test_wire_compiled.py holds the two equal on
random batches and on corrupted bytes). It takes what an honest publisher sends, and leaves to upb, so never
has to word a refusal:
- an EngineInfo (the first batch of a sender; its JSON and settings are the upb path's business), an unknown
  field or wire type, a second kind in one Event, an Event with none;
- anything malformed (a truncated field, a varint past 10 bytes, a length past the end, a string that is not
  UTF-8), and anything the upb path refuses (unequal id and count arrays, an id twice in one step);
- a uint32 field above 2^32 - 1 (upb truncates it).
Repeated numbers are read packed and unpacked, and a scalar field given twice keeps the last value, as the
protobuf specification asks of every parser. The doubles are read as little-endian IEEE 754 (wire.py does not
use this module on a big-endian machine). The numbers' quick checks (`checked`) are wire.py's own.
"""

import dataclasses

from cpython.dict cimport PyDict_SetItem
from cpython.object cimport PyObject, PyTypeObject, Py_TYPE
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

from vllm_shadow.adapters.events import EngineStep, RequestArrival, RequestFinish

cdef double _INF = float("inf")

cdef enum:  # wire types
    VARINT = 0
    I64 = 1
    LEN = 2


cdef tuple _NO_ARGS = ()


cdef class _Builder:
    """Builds a frozen slots dataclass as its `__init__` would, every field set, without `__init__`'s
    `object.__setattr__` per field: each slot is set through its member descriptor's C setter (wire.py's
    `_frozen_builder`, in C)."""

    cdef type cls
    cdef tuple slots  # the member descriptors, in field order

    def __init__(self, type cls, Py_ssize_t fields):
        if hasattr(cls, "__post_init__"):
            raise TypeError(f"{cls.__name__} has a __post_init__, which this builder would skip")
        self.cls = cls
        self.slots = tuple(getattr(cls, f.name) for f in dataclasses.fields(cls))
        if len(self.slots) != fields:  # the schema changed under this reader
            raise TypeError(f"{cls.__name__} has {len(self.slots)} fields, this reader builds {fields}")

    cdef inline object new(self):
        return (<PyTypeObject*>self.cls).tp_new(self.cls, <PyObject*>_NO_ARGS, NULL)

    cdef inline int put(self, object event, Py_ssize_t index, object value) except -1:
        cdef object slot = <object>PyTuple_GET_ITEM(self.slots, index)
        return Py_TYPE(slot).tp_descr_set(slot, event, value)


cdef _Builder _STEP = _Builder(EngineStep, 9)
cdef _Builder _ARRIVAL = _Builder(RequestArrival, 8)
cdef _Builder _FINISH = _Builder(RequestFinish, 5)


cdef class _Reader:
    """A cursor over one message's bytes; `bad` is set, and stays set, by anything malformed."""

    cdef const unsigned char* p
    cdef const unsigned char* end
    cdef bint bad

    cdef inline uint64_t varint(self) noexcept:
        cdef uint64_t result = 0
        cdef int shift = 0
        cdef unsigned char byte
        while True:
            if self.p >= self.end:
                self.bad = True
                return 0
            byte = self.p[0]
            self.p += 1
            if shift == 63 and byte > 1:  # a 10th byte holds one bit; more is not a 64-bit varint
                self.bad = True
                return 0
            result |= (<uint64_t>(byte & 0x7F)) << shift
            if byte < 0x80:
                return result
            shift += 7

    cdef inline double fixed_double(self) noexcept:
        cdef double value = 0.0
        if self.end - self.p < 8:
            self.bad = True
            return 0.0
        memcpy(&value, self.p, 8)
        self.p += 8
        return value

    cdef inline uint64_t fixed64(self) noexcept:
        cdef uint64_t value = 0
        if self.end - self.p < 8:
            self.bad = True
            return 0
        memcpy(&value, self.p, 8)
        self.p += 8
        return value

    cdef inline Py_ssize_t length(self) noexcept:
        """A length-delimited field's length, checked against what is left."""
        cdef uint64_t n = self.varint()
        if self.bad or n > <uint64_t>(self.end - self.p):
            self.bad = True
            return 0
        return <Py_ssize_t>n

    cdef inline object text(self):
        """A string field's value, or None (bad) when it is not UTF-8."""
        cdef Py_ssize_t n = self.length()
        if self.bad:
            return None
        try:
            value = PyUnicode_DecodeUTF8(<const char*>self.p, n, NULL)
        except UnicodeDecodeError:
            self.bad = True
            return None
        self.p += n
        return value

    cdef inline _Reader sub(self):
        """A reader over a length-delimited field, which this one skips."""
        cdef Py_ssize_t n = self.length()
        cdef _Reader inner = _Reader.__new__(_Reader)
        inner.p = self.p
        inner.end = self.p + n
        inner.bad = self.bad
        self.p += n
        return inner


cdef inline int64_t _int64(uint64_t value) noexcept:
    return <int64_t>value  # an int64 travels as its two's complement


cdef inline int64_t _sint64(uint64_t value) noexcept:
    return <int64_t>(value >> 1) ^ -(<int64_t>(value & 1))  # zigzag


cdef bint _int64s(_Reader r, int wire, list out, bint zigzag, int64_t* least):
    """A repeated int64 / sint64 field, packed (LEN) or not (VARINT), appended to `out`; `least` keeps the
    smallest value seen. False when malformed or of another wire type."""
    cdef _Reader packed
    cdef int64_t value
    if wire == VARINT:
        value = _sint64(r.varint()) if zigzag else _int64(r.varint())
        if r.bad:
            return False
        out.append(value)
        if value < least[0]:
            least[0] = value
        return True
    if wire != LEN:
        return False
    packed = r.sub()
    while not packed.bad and packed.p < packed.end:
        value = _sint64(packed.varint()) if zigzag else _int64(packed.varint())
        if packed.bad:
            break
        out.append(value)
        if value < least[0]:
            least[0] = value
    return not (packed.bad or r.bad)


cdef inline dict _token_map(list ids, list counts):
    """ids -> counts, or None where wire.py's _token_map refuses them (unequal lengths, an id twice)."""
    cdef dict tokens = {}
    cdef Py_ssize_t i, n = len(ids)
    if n != len(counts):
        return None
    for i in range(n):
        PyDict_SetItem(tokens, ids[i], counts[i])
    if len(tokens) != n:
        return None
    return tokens


cdef object _step(_Reader r, bint* checked):
    cdef uint64_t key
    cdef int field, wire
    cdef int64_t number = 0, kv = 0
    cdef double start = 0.0, duration = 0.0
    cdef int64_t least_count = 0, least_cached = 0
    cdef list ids = [], counts = [], preempted = [], resumed = [], finished = [], cached_ids = [], cached_counts = []
    cdef list names
    while r.p < r.end:
        key = r.varint()
        if r.bad:
            return None
        field = <int>(key >> 3) if key >> 3 < 64 else 0
        wire = <int>(key & 7)
        if field == 1 and wire == VARINT:
            number = _int64(r.varint())
        elif field == 2 and wire == I64:
            start = r.fixed_double()
        elif field == 3 and wire == I64:
            duration = r.fixed_double()
        elif field == 9 and wire == VARINT:
            kv = _int64(r.varint())
        elif field in (4, 6, 7, 8, 10) and wire == LEN:
            names = (
                ids if field == 4 else preempted if field == 6 else resumed if field == 7
                else finished if field == 8 else cached_ids
            )
            name = r.text()
            if name is None:
                return None
            names.append(name)
        elif field == 5:
            if not _int64s(r, wire, counts, False, &least_count):
                return None
        elif field == 11:
            if not _int64s(r, wire, cached_counts, False, &least_cached):
                return None
        else:
            return None
        if r.bad:
            return None
    scheduled = _token_map(ids, counts)
    if scheduled is None:
        return None
    if cached_ids or cached_counts:
        cached = _token_map(cached_ids, cached_counts)
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
    return event


cdef object _arrival(_Reader r, bint* checked):
    cdef uint64_t key
    cdef int field, wire
    cdef double time = 0.0
    cdef int64_t prompt = 0, output = 0, max_tokens = 0, priority = 0, least = 0
    cdef bint has_output = False, has_max_tokens = False
    cdef list prefix = [], hashes = []
    request_id = ""
    while r.p < r.end:
        key = r.varint()
        if r.bad:
            return None
        field = <int>(key >> 3) if key >> 3 < 64 else 0
        wire = <int>(key & 7)
        if field == 1 and wire == LEN:
            request_id = r.text()
            if request_id is None:
                return None
        elif field == 2 and wire == I64:
            time = r.fixed_double()
        elif field == 3 and wire == VARINT:
            prompt = _int64(r.varint())
        elif field == 4 and wire == VARINT:
            output = _int64(r.varint())
            has_output = True
        elif field == 5 and wire == VARINT:
            max_tokens = _int64(r.varint())
            has_max_tokens = True
        elif field == 6 and wire == VARINT:
            priority = _int64(r.varint())
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
    return event


cdef object _finish(_Reader r, bint* checked):
    cdef uint64_t key
    cdef int field, wire
    cdef double time = 0.0
    cdef int64_t output = 0, least = 0
    cdef list hashes = []
    request_id = ""
    reason = ""
    while r.p < r.end:
        key = r.varint()
        if r.bad:
            return None
        field = <int>(key >> 3) if key >> 3 < 64 else 0
        wire = <int>(key & 7)
        if field == 1 and wire == LEN:
            request_id = r.text()
            if request_id is None:
                return None
        elif field == 2 and wire == I64:
            time = r.fixed_double()
        elif field == 3 and wire == VARINT:
            output = _int64(r.varint())
        elif field == 4 and wire == LEN:
            reason = r.text()
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
    return event


cdef object _event(_Reader r, bint* checked):
    """One Event message: exactly one of step, arrival, finish; None for anything else."""
    cdef uint64_t key
    cdef int field
    key = r.varint()
    if r.bad or (key & 7) != LEN:
        return None
    field = <int>(key >> 3) if key >> 3 < 64 else 0
    cdef _Reader inner = r.sub()
    if r.bad or r.p != r.end:  # a second field in the Event (another kind, or the same one to merge)
        return None
    if field == 3:
        return _step(inner, checked)
    if field == 1:
        return _arrival(inner, checked)
    if field == 2:
        return _finish(inner, checked)
    return None  # an EngineInfo, or no kind the schema knows


def decode(object data):
    """(events, checked, source, sequence, dropped, incarnation, part, parts, lost_batches) of an EventBatch
    message, `parts` as sent (0 when unset), or None: the upb path decides (see the module docstring)."""
    if type(data) is not bytes:
        return None
    cdef const unsigned char[:] view = data
    cdef _Reader r = _Reader.__new__(_Reader)
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
    while r.p < r.end:
        key = r.varint()
        if r.bad:
            return None
        field = <int>(key >> 3) if key >> 3 < 64 else 0
        wire = <int>(key & 7)
        if field == 4 and wire == LEN:
            inner = r.sub()
            if r.bad:
                return None
            event = _event(inner, &checked)
            if event is None:
                return None
            events.append(event)
        elif field == 1 and wire == LEN:
            source = r.text()
            if source is None:
                return None
        elif field == 5 and wire == I64:
            incarnation = r.fixed64()
        elif wire == VARINT and field in (2, 3, 6, 7, 8):
            value = r.varint()
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
