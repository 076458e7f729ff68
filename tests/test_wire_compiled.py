"""The compiled wire reader (adapters/_wire_compiled.pyx) against its oracle, the upb path: on what it takes it
decodes exactly as upb does, whatever it leaves to upb ends as before, and it does take every batch an honest
publisher sends that holds no announcement."""

from __future__ import annotations

import dataclasses
import gc
import random
import struct

import pytest
from event_strategies import arrivals, finishes, steps, wire_batches
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_shadow.adapters import wire
from vllm_shadow.adapters.events import EngineInfo, EngineStep, RequestArrival, RequestFinish
from vllm_shadow.adapters.proto import shadow_events_pb2 as pb
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.wire import WireError, decode_batch, decode_batch_upb, encode_batch

pytestmark = pytest.mark.skipif(
    not wire.COMPILED, reason="the compiled wire reader is not built here (setup.py; `make .venv/.compiled`)"
)


def _outcome(decode: object, data: bytes) -> tuple[object, object]:
    try:
        return "decoded", decode(data)  # type: ignore[operator]
    except WireError as exc:
        return type(exc), str(exc)


def _compiled(data: bytes) -> object:
    """What the compiled reader alone makes of `data`: a tuple, or None (left to upb)."""
    assert wire._compiled is not None
    return wire._compiled.decode(data)


def _assert_as_upb(data: bytes) -> None:
    assert _outcome(decode_batch, data) == _outcome(decode_batch_upb, data)


no_announcements = wire_batches.filter(lambda batch: not any(isinstance(e, EngineInfo) for e in batch.events))


@given(no_announcements)
@settings(max_examples=100, deadline=None)
def test_every_batch_a_publisher_sends_is_read_by_the_compiled_reader_as_upb_reads_it(
    batch: EventBatch,
) -> None:
    data = encode_batch(batch)
    assert _compiled(data) is not None  # taken, not left to upb
    assert decode_batch(data) == decode_batch_upb(data) == batch


@given(wire_batches)
@settings(max_examples=50, deadline=None)
def test_a_batch_with_an_announcement_is_read_with_the_announcement_alone_through_upb(
    batch: EventBatch,
) -> None:
    data = encode_batch(batch)
    if any(isinstance(e, EngineInfo) for e in batch.events):
        assert _compiled(data) is None  # without wire.py's decoder of one announcement, left to upb
        assert wire._compiled is not None and wire._compiled.decode(data, wire._decode_info_event) is not None
    assert decode_batch(data) == decode_batch_upb(data) == batch


@given(no_announcements.filter(lambda batch: batch.events), st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_corrupted_bytes_end_as_they_do_through_upb(batch: EventBatch, rng: random.Random) -> None:
    encoded = encode_batch(batch)
    for _ in range(30):  # many corruptions of each batch: drawing batches is what costs here
        data = bytearray(encoded)
        for _ in range(rng.randint(1, 3)):
            how, position, value = (
                rng.choice(("flip", "insert", "delete")),
                rng.randrange(len(data)),
                rng.randrange(256),
            )
            if how == "flip":
                data[position] = value
            elif how == "insert":
                data.insert(position, value)
            elif len(data) > 1:
                del data[position]
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)) :]
        _assert_as_upb(bytes(data))


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_end_as_they_do_through_upb(data: bytes) -> None:
    _assert_as_upb(data)


def _event_bytes(**kind: object) -> bytes:
    return pb.EventBatch(events=[pb.Event(**kind)]).SerializeToString()


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _batch_of(event_kind: int, message: bytes) -> bytes:
    event = _field(event_kind, 2, _varint(len(message)) + message)
    return _field(4, 2, _varint(len(event)) + event)


@pytest.mark.parametrize(
    ("data", "taken"),
    [
        # repeated numbers unpacked, and a packed field in two pieces: both legal, concatenated
        (
            _batch_of(
                3,
                _field(4, 2, b"\x01a")
                + _field(4, 2, b"\x01b")
                + _field(5, 0, b"\x03")
                + _field(5, 0, b"\x04"),
            ),
            True,
        ),
        (
            _batch_of(
                3,
                _field(4, 2, b"\x01a")
                + _field(4, 2, b"\x01b")
                + _field(5, 2, b"\x01\x03")
                + _field(5, 2, b"\x01\x04"),
            ),
            True,
        ),
        # a scalar given twice: the last one counts
        (_batch_of(3, _field(1, 0, b"\x05") + _field(1, 0, b"\x07")), True),
        (_field(2, 0, b"\x05") + _field(2, 0, b"\x09"), True),
        # negative numbers: an int64 in ten bytes, a sint64 zigzagged
        (_batch_of(3, _field(1, 0, _varint(-3))), True),
        (_batch_of(1, _field(7, 2, b"\x02\x05\x06")), True),
        # two events; an optional count present at 0
        (_event_bytes(step=pb.EngineStep()) + _batch_of(3, b""), True),
        (_event_bytes(arrival=pb.RequestArrival(request_id="r", output_tokens=0)), True),
        # left to upb: a second kind in one event, an event of no kind, an unknown field, a uint32 past 32
        # bits, bad UTF-8, an announcement, an id twice
        (_field(4, 2, b"\x04\x1a\x00\x0a\x00"), False),
        (_field(4, 2, b"\x00"), False),
        (_batch_of(3, _field(12, 0, b"\x01")), False),
        (_field(6, 0, _varint(2**33)) + _field(7, 0, _varint(2**33 + 2)), False),
        (_batch_of(2, _field(1, 2, b"\x02\xc3\x28")), False),
        (_batch_of(4, b""), False),
        (
            _batch_of(3, _field(4, 2, b"\x01a") + _field(4, 2, b"\x01a") + _field(5, 2, b"\x02\x01\x01")),
            False,
        ),
        (_batch_of(3, _field(2, 1, struct.pack("<d", float("nan")))), True),
    ],
)
def test_legal_encodings_are_read_as_upb_reads_them_and_the_rest_left_to_it(data: bytes, taken: bool) -> None:
    assert (_compiled(data) is not None) == taken
    _assert_as_upb(data)


def test_what_it_takes_is_the_schema_events_with_their_numbers_checked() -> None:
    data = _batch_of(
        3, _field(1, 0, _varint(-3))
    )  # a negative step number: refused, in the validator's words
    with pytest.raises(wire.InvalidWireBatch, match="step -3 is below 0"):
        decode_batch(data)
    events, checked, *_ = _compiled(encode_batch(EventBatch([EngineStep(1, 0.0, 0.1, {"a": 2})])))  # type: ignore[misc]
    assert checked and events == [EngineStep(1, 0.0, 0.1, {"a": 2})]
    arrival = RequestArrival("r", 1.0, 5, None, 0, 3, (-1, 2), ())
    assert decode_batch(encode_batch(EventBatch([arrival]))).events == [arrival]


@given(st.lists(st.one_of(arrivals, finishes, steps), max_size=30))
@settings(max_examples=50, deadline=None)
def test_events_built_by_the_compiled_reader_are_the_dataclasses_themselves(events: list[object]) -> None:
    decoded = decode_batch(encode_batch(EventBatch(events)))  # type: ignore[arg-type]
    assert [type(e) for e in decoded.events] == [type(e) for e in events]
    assert decoded.events == events


def test_a_string_that_recurs_in_a_batch_is_one_object_and_its_events_are_left_to_refcounting() -> None:
    """A request id in every step that schedules it is decoded once, so the trackers' lookups find the very
    key they stored; steps of shrinking and growing size reuse the reader's lists; the events stay out of the
    collector's walks (their fields are numbers, strings and containers of those)."""
    events = [
        RequestArrival("r1", 0.0, 5),
        RequestArrival("r2", 0.0, 5),
        EngineStep(0, 0.0, 0.1, {"r1": 5, "r2": 5, "x": 1, "y": 2, "z": 3}),
        EngineStep(1, 0.1, 0.1, {"r2": 1, "r1": 1}, finished=("r2",)),
        EngineStep(2, 0.2, 0.1, {"r1": 1, "z": 2, "w": 4}, preempted=("x",)),
        RequestFinish("r2", 0.3, 1, "stop"),
        RequestFinish("r1", 0.3, 2, "stop"),
    ]
    data = encode_batch(EventBatch(events))  # type: ignore[arg-type]
    decoded = decode_batch(data).events
    assert decoded == events == decode_batch_upb(data).events
    r1 = decoded[0].request_id
    assert all(r is r1 for e in decoded[2:5] for r in e.scheduled_tokens if r == "r1")
    assert decoded[6].request_id is r1 and decoded[3].finished[0] is decoded[1].request_id
    assert decoded[5].reason is decoded[6].reason
    assert not any(gc.is_tracked(e) for e in decoded)


def test_a_batch_of_more_distinct_strings_than_the_reader_keeps_is_read_whole() -> None:
    """The reader's table of strings stops taking new ones once half full; the rest are decoded one by one."""
    events = [EngineStep(i, float(i), 0.1, {f"r{i}-{j}": j + 1 for j in range(3)}) for i in range(1500)]
    data = encode_batch(EventBatch(events))  # type: ignore[arg-type]
    assert _compiled(data) is not None
    assert decode_batch(data).events == events


@settings(max_examples=100, deadline=None)
@given(arrival=arrivals)
def test_the_trackers_arrival_builder_builds_what_the_dataclass_builds(arrival: RequestArrival) -> None:
    """`wire.build_arrival` (the engine tracker's, one per request of every window) is the compiled reader's:
    the event `RequestArrival(...)` builds, holding the very objects it was given."""
    assert wire.build_arrival is wire._compiled.new_arrival  # type: ignore[union-attr]
    values = [getattr(arrival, f.name) for f in dataclasses.fields(RequestArrival)]
    built = wire.build_arrival(*values)
    assert type(built) is RequestArrival and built == RequestArrival(*values) == wire._new_arrival(*values)
    assert all(
        getattr(built, f.name) is v for f, v in zip(dataclasses.fields(RequestArrival), values, strict=True)
    )
