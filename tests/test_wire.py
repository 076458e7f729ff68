"""The protobuf wire form: exact round trips, and a decoder that refuses bad bytes with WireError only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from event_strategies import wire_batches
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_shadow.adapters.events import EngineStep
from vllm_shadow.adapters.proto import shadow_events_pb2 as pb
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.validation import validate_batch
from vllm_shadow.adapters.wire import InvalidWireBatch, WireError, decode_batch, encode_batch


@given(wire_batches)
@settings(max_examples=200, deadline=None)
def test_batches_round_trip_exactly(batch: EventBatch) -> None:
    assert decode_batch(encode_batch(batch)) == batch


def test_step_keeps_batch_order() -> None:
    step = EngineStep(3, 1.0, 0.01, {"b": 5, "a": 1, "c": 128})
    decoded = decode_batch(encode_batch(EventBatch([step]))).events[0]
    assert list(decoded.scheduled_tokens.items()) == [("b", 5), ("a", 1), ("c", 128)]


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_decode_or_raise_wire_error(data: bytes) -> None:
    try:
        batch = decode_batch(data)
    except WireError:
        return
    assert isinstance(batch, EventBatch)
    validate_batch(batch)  # what decodes is valid, numbers included


def _raw(**step_fields: object) -> bytes:
    msg = pb.EventBatch()
    msg.events.add().step.CopyFrom(pb.EngineStep(**step_fields))
    return msg.SerializeToString()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (_raw(scheduled_ids=["a", "b"], scheduled_counts=[1]), "2 scheduled ids but 1 counts"),
        (_raw(scheduled_ids=["a", "a"], scheduled_counts=[1, 2]), "appears twice"),
        (_raw(cached_ids=["a"], cached_counts=[]), "1 cached ids but 0 counts"),
        (_raw(cached_ids=["a", "a"], cached_counts=[1, 2]), "appears twice in one step's cached"),
        (pb.EventBatch(events=[pb.Event()]).SerializeToString(), "no event kind"),
        (
            pb.EventBatch(
                events=[pb.Event(info=pb.EngineInfo(model_config_json="{oops"))]
            ).SerializeToString(),
            "not JSON",
        ),
        (
            pb.EventBatch(events=[pb.Event(info=pb.EngineInfo(model_config_json="[1]"))]).SerializeToString(),
            "not a JSON object",
        ),
        (b"\xff\xff\xff", "not an EventBatch"),
    ],
)
def test_structurally_invalid_batches_are_refused(data: bytes, problem: str) -> None:
    with pytest.raises(WireError, match=problem):
        decode_batch(data)


def test_generated_protobuf_module_is_up_to_date() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a test dependency (see pyproject's test extra)")
    # In its own interpreter: protoc's C++ crashed the test process once vLLM and torch were loaded in it.
    check = subprocess.run(
        [sys.executable, "-m", "vllm_shadow.adapters.proto.generate", "--check"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr


# ---- issue 13, item 5: impossible numbers are refused at the wire, the whole batch with them -----------------

FINE_ARRIVAL = pb.Event(arrival=pb.RequestArrival(request_id="r", time=1.0, prompt_tokens=3))


def _info(**fields: object) -> pb.Event:
    scheduler = {"policy": "fcfs", "max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 128}
    scheduler.update(fields.pop("scheduler", {}))  # type: ignore[arg-type]
    info = {"model": "m", "block_size": 16, "num_kv_blocks": 64, "tensor_parallel_size": 1, **fields}
    return pb.Event(info=pb.EngineInfo(scheduler=pb.SchedulerSettings(**scheduler), **info))


def _step(**fields: object) -> pb.Event:
    return pb.Event(step=pb.EngineStep(**{"step": 1, "start_time": 1.0, "duration": 0.01, **fields}))


@pytest.mark.parametrize(
    ("event", "problem"),
    [
        (_info(scheduler={"max_num_seqs": 0}), "max_num_seqs 0 is below 1"),
        (_info(scheduler={"max_num_batched_tokens": -4}), "max_num_batched_tokens"),
        (_info(scheduler={"policy": "lifo"}), "policy 'lifo'"),
        (_info(scheduler={"watermark": float("nan")}), "watermark nan"),
        (_info(block_size=0), "block_size 0"),
        (_info(num_kv_blocks=-1), "num_kv_blocks -1"),
        (_info(tensor_parallel_size=0), "tensor_parallel_size"),
        (pb.Event(arrival=pb.RequestArrival(request_id="r", time=1.0, prompt_tokens=-5)), "prompt_tokens -5"),
        (pb.Event(arrival=pb.RequestArrival(request_id="r", time=float("nan"))), "time is nan"),
        (pb.Event(finish=pb.RequestFinish(request_id="r", time=float("inf"))), "time is inf"),
        (pb.Event(finish=pb.RequestFinish(request_id="r", time=1.0, output_tokens=-1)), "output_tokens -1"),
        (_step(duration=float("nan")), "duration is nan"),
        (_step(duration=float("inf")), "duration is inf"),
        (_step(duration=-0.5), "duration -0.5"),
        (_step(start_time=float("-inf")), "start_time is -inf"),
        (_step(scheduled_ids=["r"], scheduled_counts=[-3]), "negative count -3"),
        (_step(kv_blocks_used=-2), "kv_blocks_used -2"),
        (_step(cached_ids=["r"], cached_counts=[-1]), "cached_tokens has a negative count -1"),
    ],
)
def test_impossible_numbers_refuse_the_whole_batch(event: pb.Event, problem: str) -> None:
    # The bad event comes after a good one: nothing of the batch may come through.
    data = pb.EventBatch(events=[FINE_ARRIVAL, event]).SerializeToString()
    with pytest.raises(InvalidWireBatch, match=f"event 1 .*{problem}"):
        decode_batch(data)


@pytest.mark.parametrize(("part", "parts"), [(1, 1), (5, 3), (0, 2**17)])
def test_a_part_outside_its_batch_is_refused(part: int, parts: int) -> None:
    with pytest.raises(InvalidWireBatch, match="part"):
        decode_batch(pb.EventBatch(part=part, parts=parts).SerializeToString())


def _event_with(kind: str, whole: int, real: float) -> pb.Event:
    if kind == "arrival":
        return pb.Event(arrival=pb.RequestArrival(time=real, prompt_tokens=whole))
    if kind == "finish":
        return pb.Event(finish=pb.RequestFinish(time=real, output_tokens=whole))
    if kind == "step":
        return _step(duration=real, kv_blocks_used=whole)
    return _info(block_size=whole, scheduler={"watermark": real})


NUMBER = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats())


@given(
    st.lists(st.tuples(st.sampled_from(["arrival", "finish", "step", "info"]), NUMBER, NUMBER), max_size=4)
)
@settings(max_examples=300, deadline=None)
def test_arbitrary_numbers_decode_to_a_valid_batch_or_raise_wire_error(fields: list) -> None:
    events = [_event_with(kind, int(a) if isinstance(a, int) else -1, float(b)) for kind, a, b in fields]
    try:
        batch = decode_batch(pb.EventBatch(events=events).SerializeToString())
    except WireError:
        return
    validate_batch(batch)
