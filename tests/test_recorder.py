"""Recordings: exact round trips (plain and gzip), and malformed input reported at its file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from event_strategies import batches
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_shadow.adapters.events import EngineStep, RequestArrival
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.recorder import Recorder, RecordingError, read_batches, read_events


@given(st.lists(batches, max_size=4), st.sampled_from(["run.jsonl", "run.jsonl.gz"]))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_recording_round_trips_exactly(tmp_path: Path, recorded: list[EventBatch], name: str) -> None:
    path = tmp_path / name
    with Recorder(path) as recorder:
        for batch in recorded:
            recorder(batch)
    assert list(read_batches(path)) == recorded
    assert list(read_events(path)) == [e for b in recorded for e in b.events]


def test_gzip_recording_is_compressed(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl.gz"
    with Recorder(path) as recorder:
        recorder.write([EngineStep(i, float(i), 0.01, {"r": 1}) for i in range(200)])
    assert path.read_bytes()[:2] == b"\x1f\x8b"


def _write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


HEADER = json.dumps({"format": "shadow-events", "version": 1})
BATCH = json.dumps({"type": "batch", "source": "s", "sequence": 0, "dropped": 0})
ARRIVAL = {"type": "arrival", "request_id": "a", "time": 1.5, "prompt_tokens": 10}


@pytest.mark.parametrize(
    ("lines", "bad_line", "problem"),
    [
        (['{"format": "other"}'], 1, "recording header"),
        ([HEADER, BATCH, "{not json"], 3, "not JSON"),
        ([HEADER, BATCH, "[1, 2]"], 3, "JSON object"),
        ([HEADER, json.dumps(ARRIVAL)], 2, "before any batch"),
        ([HEADER, BATCH, json.dumps({**ARRIVAL, "type": "teleport"})], 3, "unknown event type"),
        (
            [HEADER, BATCH, json.dumps({**ARRIVAL, "prompt_tokens": "10"})],
            3,
            "prompt_tokens has the wrong type",
        ),
        ([HEADER, BATCH, json.dumps({**ARRIVAL, "colour": 1})], 3, "unknown arrival fields"),
        ([HEADER, BATCH, json.dumps({"type": "arrival", "request_id": "a"})], 3, "malformed event"),
        (
            [
                HEADER,
                BATCH,
                json.dumps(
                    {
                        "type": "step",
                        "step": 1,
                        "start_time": 0,
                        "duration": 0,
                        "scheduled_tokens": {"a": "x"},
                    }
                ),
            ],
            3,
            "scheduled_tokens",
        ),
        ([HEADER, json.dumps({"type": "batch", "source": "s"})], 2, "malformed batch"),
    ],
)
def test_malformed_lines_are_reported_with_file_and_line(
    tmp_path: Path, lines: list[str], bad_line: int, problem: str
) -> None:
    path = _write(tmp_path / "bad.jsonl", *lines)
    with pytest.raises(RecordingError, match=problem) as caught:
        list(read_events(path))
    assert caught.value.line == bad_line
    assert str(caught.value).startswith(f"{path}:{bad_line}: ")


def test_valid_lines_before_an_error_are_yielded(tmp_path: Path) -> None:
    path = _write(tmp_path / "run.jsonl", HEADER, BATCH, json.dumps(ARRIVAL), "garbage")
    events = read_events(path)
    assert next(events) == RequestArrival("a", 1.5, 10)
    with pytest.raises(RecordingError):
        next(events)
