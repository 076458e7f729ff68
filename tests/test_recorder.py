"""Recordings: exact round trips (plain and gzip), and malformed input reported at its file:line."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from event_strategies import batches
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_shadow.adapters.events import EngineStep, RequestArrival
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.recorder import (
    Recorder,
    RecordingError,
    RecordingTruncatedWarning,
    read_batches,
    read_events,
)


def _valid(batch: EventBatch) -> EventBatch:
    """`batch` with every step duration made non-negative: a recording refuses negative durations."""
    events = [
        dataclasses.replace(e, duration=abs(e.duration)) if isinstance(e, EngineStep) else e
        for e in batch.events
    ]
    return dataclasses.replace(batch, events=events)


@given(st.lists(batches, max_size=4), st.sampled_from(["run.jsonl", "run.jsonl.gz"]))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_recording_round_trips_exactly(tmp_path: Path, recorded: list[EventBatch], name: str) -> None:
    path = tmp_path / name
    recorded = [_valid(batch) for batch in recorded]
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


# --- cut, damaged and foreign files (issue 13, item 8) ----------------------------------------------------

STEP = {"type": "step", "step": 1, "start_time": 0.0, "duration": 0.01, "scheduled_tokens": {"a": 10}}


def _recorded(path: Path, n: int) -> list[RequestArrival]:
    """A recording of `n` one-arrival batches, closed properly; returns its events."""
    events = [RequestArrival(f"r{i}", float(i), 10 + i) for i in range(n)]
    with Recorder(path) as recorder:
        for event in events:
            recorder.write([event])
    return events


@pytest.mark.parametrize("cut", [1, 7, 40, 200])
def test_a_truncated_gzip_recording_reads_up_to_its_last_complete_line_with_a_warning(
    tmp_path: Path, cut: int
) -> None:
    path = tmp_path / "run.jsonl.gz"
    events = _recorded(path, 100)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - cut])
    with pytest.warns(RecordingTruncatedWarning, match=re.escape(str(path)) + r":\d+: ") as caught:
        read = list(read_events(path))
    assert read == events[: len(read)] and len(read) >= 90
    # Line 1 is the header, then a batch line and an event line per batch; the cut may fall between the two.
    assert caught[0].message.line in (2 * len(read) + 2, 2 * len(read) + 3)


def test_a_gzip_recording_whose_process_was_killed_reads_what_was_flushed(tmp_path: Path) -> None:
    """A recorder never closed (kill -9) leaves a gzip stream without its end marker: every flushed batch is
    read back, then a warning, not an EOFError."""
    path = tmp_path / "killed.jsonl.gz"
    script = (
        "import os, sys\n"
        "from vllm_shadow.adapters.events import RequestArrival\n"
        "from vllm_shadow.adapters.recorder import Recorder\n"
        "r = Recorder(sys.argv[1])\n"
        "for i in range(50):\n"
        "    r.write([RequestArrival(f'r{i}', float(i), 10)])\n"
        "os._exit(0)  # no close(), no interpreter shutdown: as good as kill -9 after the last flush\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60)
    with pytest.warns(RecordingTruncatedWarning, match="killed.jsonl.gz"):
        read = list(read_events(path))
    assert [e.request_id for e in read] == [f"r{i}" for i in range(50)]


def test_a_plain_recording_cut_mid_line_reads_up_to_its_last_complete_line(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    events = _recorded(path, 5)
    text = path.read_text()
    path.write_text(text[: len(text) - 9])
    with pytest.warns(RecordingTruncatedWarning, match=re.escape(f"{path}:11: ")):
        assert list(read_events(path)) == events[:4]


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.jsonl.gz"])
def test_an_empty_file_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wb"):
            pass
    else:
        path.write_bytes(b"")
    with pytest.raises(RecordingError, match="^" + re.escape(f"{path}:1: ") + "empty file"):
        list(read_events(path))


def test_a_header_only_recording_holds_no_events(tmp_path: Path) -> None:
    path = _write(tmp_path / "header.jsonl", HEADER)
    assert list(read_events(path)) == []


def test_a_gz_that_is_not_gzip_is_refused_naming_it(tmp_path: Path) -> None:
    path = _write(tmp_path / "plain.jsonl.gz", HEADER, BATCH)
    with pytest.raises(RecordingError, match="^" + re.escape(str(path)) + ": not gzip-compressed"):
        list(read_events(path))


def test_corrupt_gzip_data_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl.gz"
    _recorded(path, 200)
    data = bytearray(path.read_bytes())
    data[30:60] = b"\xff" * 30
    path.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match="^" + re.escape(str(path))):
        list(read_events(path))


def test_a_directory_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="^" + re.escape(str(tmp_path)) + ": .*directory"):
        list(read_events(tmp_path))


def test_a_binary_jsonl_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "binary.jsonl"
    path.write_bytes(HEADER.encode() + b"\n" + BATCH.encode() + b"\n\xff\xfe\x00garbage\n")
    with pytest.raises(RecordingError, match="^" + re.escape(f"{path}:3: ") + "not UTF-8"):
        list(read_events(path))


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('"duration": NaN', "step.duration"),
        ('"duration": Infinity', "step.duration"),
        ('"duration": -0.5', "step.duration"),
        ('"start_time": -Infinity', "step.start_time"),
    ],
)
def test_a_non_finite_or_negative_step_time_is_refused_naming_file_line_and_field(
    tmp_path: Path, text: str, field: str
) -> None:
    name = field.split(".")[1]
    line = json.dumps(STEP).replace(f'"{name}": {json.dumps(STEP[name])}', text)
    assert text in line
    path = _write(tmp_path / "nan.jsonl", HEADER, BATCH, line)
    with pytest.raises(
        RecordingError, match="^" + re.escape(f"{path}:3: ") + f".*{re.escape(field)}"
    ) as caught:
        list(read_events(path))
    assert caught.value.field == field


def test_a_non_finite_arrival_time_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "inf.jsonl", HEADER, BATCH, json.dumps({**ARRIVAL, "time": math.inf}))
    with pytest.raises(RecordingError, match=re.escape("arrival.time")):
        list(read_events(path))


@given(st.binary(max_size=300), st.sampled_from(["x.jsonl", "x.jsonl.gz"]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_bytes_raise_only_recording_errors(tmp_path: Path, data: bytes, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RecordingTruncatedWarning)
            list(read_batches(path))
    except RecordingError as error:
        assert str(error).startswith(str(path))


@given(st.lists(batches, min_size=1, max_size=4), st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_truncation_of_a_recording_reads_a_prefix_or_a_named_error(
    tmp_path: Path, recorded: list[EventBatch], data: st.DataObject
) -> None:
    for name in ("t.jsonl", "t.jsonl.gz"):
        path = tmp_path / name
        with Recorder(path) as recorder:
            for batch in recorded:
                recorder(_valid(batch))
        whole = path.read_bytes()
        path.write_bytes(whole[: data.draw(st.integers(0, len(whole)))])
        events = [e for b in recorded for e in _valid(b).events]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RecordingTruncatedWarning)
                read = list(read_events(path))
        except RecordingError as error:
            assert str(error).startswith(str(path))
        else:
            assert read == events[: len(read)]
