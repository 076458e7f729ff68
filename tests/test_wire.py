"""The protobuf wire form: exact round trips, and a decoder that refuses bad bytes with WireError only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from event_strategies import batches
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_shadow.adapters.events import EngineStep
from vllm_shadow.adapters.proto import shadow_events_pb2 as pb
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.wire import WireError, decode_batch, encode_batch


@given(batches)
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


def _raw(**step_fields: object) -> bytes:
    msg = pb.EventBatch()
    msg.events.add().step.CopyFrom(pb.EngineStep(**step_fields))
    return msg.SerializeToString()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (_raw(scheduled_ids=["a", "b"], scheduled_counts=[1]), "2 scheduled ids but 1 counts"),
        (_raw(scheduled_ids=["a", "a"], scheduled_counts=[1, 2]), "appears twice"),
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
