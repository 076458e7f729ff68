"""Trace readers: every format on hand-written files, the bundled traces, options, errors, round trips."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import statistics
from dataclasses import dataclass
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_shadow.adapters.traces import (
    BUNDLED_TRACES,
    MOONCAKE_BLOCK_TOKENS,
    Reason,
    Trace,
    TraceError,
    bundled_trace,
    read_trace,
    resolve_trace,
)

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"
BURSTGPT_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"


def write(directory: Path, name: str, content: str | bytes) -> Path:
    path = directory / name
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def rows_of(trace: Trace) -> list[tuple[str, float, int, int | None]]:
    return [(r.request_id, r.time, r.prompt_tokens, r.output_tokens) for r in trace.requests]


# --- each format, hand-written ----------------------------------------------------------------------------


def test_azure_2023_crlf_without_final_newline(tmp_path: Path) -> None:
    content = (
        f"{AZURE_HEADER}\r\n"
        "2023-11-16 18:15:46.6805900,374,44\r\n"
        "2023-11-16 18:15:50.9951690,396,109\r\n"
        "2023-11-16 18:16:01.0000001,879,55"
    )
    trace = read_trace(write(tmp_path, "t.csv", content))
    assert trace.format == "azure"
    assert trace.block_tokens is None
    assert rows_of(trace) == [
        ("2", 0.0, 374, 44),
        ("3", 4.314579, 396, 109),
        ("4", 14.3194101, 879, 55),
    ]
    assert trace.excluded == {} and trace.modified == {}


@pytest.mark.parametrize("digits", range(1, 8))
def test_azure_2024_timestamps_with_offset_and_any_fraction_length(tmp_path: Path, digits: int) -> None:
    frac = "1234567"[:digits]
    content = (
        f"{AZURE_HEADER}\n"
        "2024-05-10 00:00:00+00:00,10,1\n"
        f"2024-05-10 00:00:02.{frac}+00:00,20,2\n"
        # 01:00:03 at UTC+01:00 is 00:00:03 UTC
        f"2024-05-10 01:00:03.{frac}+01:00,30,3\n"
    )
    trace = read_trace(write(tmp_path, "t.csv", content))
    fraction = Fraction(int(frac), 10**digits)
    assert rows_of(trace) == [
        ("2", 0.0, 10, 1),
        ("3", float(2 + fraction), 20, 2),
        ("4", float(3 + fraction), 30, 3),
    ]


def test_azure_timestamps_across_midnight_and_month_end(tmp_path: Path) -> None:
    content = f"{AZURE_HEADER}\n2023-11-30 23:59:59.5000000,1,1\n2023-12-01 00:00:00.2500000,1,1\n"
    assert [r.time for r in read_trace(write(tmp_path, "t.csv", content)).requests] == [0.0, 0.75]


def test_mooncake_jsonl(tmp_path: Path) -> None:
    lines = [
        {"timestamp": 3000, "input_length": 1100, "output_length": 7, "hash_ids": [0, 1, 5]},
        {"timestamp": 0, "input_length": 600, "output_length": 500, "hash_ids": [0, 1]},
        {"timestamp": 3000, "input_length": 12, "output_length": 3, "hash_ids": [9]},
    ]
    trace = read_trace(write(tmp_path, "t.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n"))
    assert trace.format == "mooncake"
    assert trace.block_tokens == MOONCAKE_BLOCK_TOKENS
    assert rows_of(trace) == [("2", 0.0, 600, 500), ("1", 3.0, 1100, 7), ("3", 3.0, 12, 3)]
    assert [r.prefix_block_hashes for r in trace.requests] == [(0, 1), (0, 1, 5), (9,)]


def test_burstgpt_failed_requests_are_excluded_and_counted(tmp_path: Path) -> None:
    content = (
        f"{BURSTGPT_HEADER}\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,ChatGPT,1087,0,1087,Conversation log\n"
        "118.25,GPT-4,417,276,693,API log\n"
    )
    path = write(tmp_path, "t.csv", content)
    trace = read_trace(path)
    assert trace.format == "burstgpt"
    assert rows_of(trace) == [("2", 0.0, 472, 18), ("4", 113.25, 417, 276)]
    assert trace.excluded == {Reason.FAILED: 1}

    with_failed = read_trace(path, include_failed=True)
    assert rows_of(with_failed) == [("2", 0.0, 472, 18), ("3", 40.0, 1087, 1), ("4", 113.25, 417, 276)]
    assert with_failed.excluded == {}
    assert with_failed.modified == {Reason.ZERO_OUTPUT: 1}


def test_failed_first_row_still_sets_the_clock(tmp_path: Path) -> None:
    # Times must not depend on include_failed, or two reads of one file would disagree on every arrival.
    content = f"{BURSTGPT_HEADER}\n10,ChatGPT,5,0,5,API log\n12.5,ChatGPT,5,3,8,API log\n"
    path = write(tmp_path, "t.csv", content)
    assert rows_of(read_trace(path)) == [("3", 2.5, 5, 3)]
    assert rows_of(read_trace(path, include_failed=True)) == [("2", 0.0, 5, 1), ("3", 2.5, 5, 3)]


def test_vidur_with_unnamed_index_extra_columns_and_float_forms(tmp_path: Path) -> None:
    content = (
        ",arrived_at,num_prefill_tokens,num_decode_tokens,num_total_tokens\n"
        "0,0.0,591,140,731\n"
        "1,1e-05,547,248,795\n"
        "2,0.30000000000000004,100,0,100\n"
    )
    trace = read_trace(write(tmp_path, "t.csv", content))
    assert trace.format == "vidur"
    assert rows_of(trace) == [("2", 0.0, 591, 140), ("3", 1e-05, 547, 248), ("4", 0.3, 100, 1)]
    assert trace.modified == {Reason.ZERO_OUTPUT: 1}


def test_out_of_order_rows_are_sorted_and_ties_keep_file_order(tmp_path: Path) -> None:
    content = "arrived_at,num_prefill_tokens,num_decode_tokens\n2,1,1\n1,2,1\n2,3,1\n1,4,1\n0,5,1\n"
    trace = read_trace(write(tmp_path, "t.csv", content))
    assert [(r.request_id, r.time) for r in trace.requests] == [
        ("6", 0.0),
        ("3", 1.0),
        ("5", 1.0),
        ("2", 2.0),
        ("4", 2.0),
    ]


def test_zero_output_is_clamped_to_one_and_counted(tmp_path: Path) -> None:
    content = f"{AZURE_HEADER}\n2023-11-16 18:15:46.6805900,374,0\n2023-11-16 18:15:47.6805900,3,0\n"
    trace = read_trace(write(tmp_path, "t.csv", content))
    assert [r.output_tokens for r in trace.requests] == [1, 1]
    assert trace.modified == {Reason.ZERO_OUTPUT: 2}


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    content = f"\ufeff{AZURE_HEADER}\n\n2023-11-16 18:15:46.6805900,374,4\n\n2023-11-16 18:15:47.0,3,1\n\n"
    trace = read_trace(write(tmp_path, "t.csv", content))
    assert [r.request_id for r in trace.requests] == ["3", "5"]


def test_header_only_file_is_an_empty_trace(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, "t.csv", AZURE_HEADER + "\r\n"))
    assert len(trace) == 0 and trace.span == 0.0


# --- detection --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (f"{AZURE_HEADER}\n2023-11-16 18:15:46.6805900,374,44\n", "azure"),
        (f"{BURSTGPT_HEADER}\n5,ChatGPT,472,18,490,Conversation log\n", "burstgpt"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0.5,10,2\n", "vidur"),
        ('{"timestamp": 0, "input_length": 5, "output_length": 2, "hash_ids": [0]}\n', "mooncake"),
    ],
)
@pytest.mark.parametrize("name", ["trace.csv", "trace.jsonl", "trace"])
def test_format_is_detected_from_the_header_not_the_name(
    tmp_path: Path, content: str, expected: str, name: str
) -> None:
    assert read_trace(write(tmp_path, name, content)).format == expected


def test_unknown_header_lists_the_known_formats(tmp_path: Path) -> None:
    with pytest.raises(TraceError) as error:
        read_trace(write(tmp_path, "t.csv", "time,prompt,output\n1,2,3\n"))
    assert error.value.line == 1
    message = str(error.value)
    for known in ("azure", "burstgpt", "vidur", "Mooncake", "TIMESTAMP,ContextTokens,GeneratedTokens"):
        assert known in message


# --- errors -----------------------------------------------------------------------------------------------


def test_error_message_names_file_line_and_field(tmp_path: Path) -> None:
    rows = "".join(f"2023-11-16 18:15:{i:02d}.0000000,10,1\n" for i in range(15))
    path = write(tmp_path, "trace.csv", f"{AZURE_HEADER}\n{rows}2023-11-16 18:16:00.0000000,abc,1\n")
    with pytest.raises(TraceError) as error:
        read_trace(path)
    assert str(error.value) == f"{path}:17: field 'ContextTokens': expected a positive integer, got 'abc'"
    assert (error.value.line, error.value.field) == (17, "ContextTokens")


AZURE_ROW = "2023-11-16 18:15:46.6805900"


@pytest.mark.parametrize(
    ("content", "line", "field", "fragment"),
    [
        (f"{AZURE_HEADER}\n{AZURE_ROW},0,4\n", 2, "ContextTokens", "positive integer, got '0'"),
        (f"{AZURE_HEADER}\n{AZURE_ROW},5,-4\n", 2, "GeneratedTokens", "non-negative integer, got '-4'"),
        (f"{AZURE_HEADER}\n{AZURE_ROW},5,1.5\n", 2, "GeneratedTokens", "got '1.5'"),
        (f"{AZURE_HEADER}\n{AZURE_ROW},5,1\n{AZURE_ROW},5\n", 3, "GeneratedTokens", "missing"),
        (f"{AZURE_HEADER}\n{AZURE_ROW},5,1,7\n", 2, None, "expected 3 fields"),
        (f"{AZURE_HEADER}\n2023-02-29 18:15:46.6,5,1\n", 2, "TIMESTAMP", "got '2023-02-29 18:15:46.6'"),
        (f"{AZURE_HEADER}\n2023-11-16 18:15:46.1234567890,5,1\n", 2, "TIMESTAMP", "expected a timestamp"),
        (f"{AZURE_HEADER}\n,5,1\n", 2, "TIMESTAMP", "got ''"),
        (f"{BURSTGPT_HEADER}\nnan,ChatGPT,4,1,5,API log\n", 2, "Timestamp", "number of seconds"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n1,,3\n", 2, "num_prefill_tokens", "got ''"),
        ('{"timestamp": 1, "input_length": 5}\n', 1, "output_length", "missing"),
        ('{"timestamp": 1, "input_length": 5, "output_length": true}\n', 1, "output_length", "got 'true'"),
        ('{"timestamp": "1", "input_length": 5, "output_length": 1}\n', 1, "timestamp", "milliseconds"),
        ('{"timestamp": 1, "input_length": 0, "output_length": 1}\n', 1, "input_length", "positive"),
        (
            '{"timestamp": 1, "input_length": 5, "output_length": 1, "hash_ids": [1, "2"]}\n',
            1,
            "hash_ids",
            "integers",
        ),
        (
            '{"timestamp": 1, "input_length": 5, "output_length": 1}\n{"timestamp": 2,\n',
            2,
            None,
            "invalid JSON",
        ),
        ('{"timestamp": 1, "input_length": 5, "output_length": 1}\n[1, 2]\n', 2, None, "a JSON object"),
        ("", 1, None, "empty file"),
    ],
)
def test_malformed_input_raises_trace_error(
    tmp_path: Path, content: str, line: int, field: str | None, fragment: str
) -> None:
    path = write(tmp_path, "t.csv", content)
    with pytest.raises(TraceError, match="^" + re.escape(str(path))) as error:
        read_trace(path)
    assert (error.value.line, error.value.field) == (line, field)
    assert fragment in str(error.value)
    assert isinstance(error.value, ValueError)


def test_non_utf8_file_raises_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="not UTF-8"):
        read_trace(write(tmp_path, "t.csv", f"{AZURE_HEADER}\n".encode() + b"\xff\xfe,1,1\n"))


# --- options ----------------------------------------------------------------------------------------------


@pytest.fixture
def ten_rows(tmp_path: Path) -> Path:
    """Vidur rows at t = 0..9 s, prompt = 100 * (t + 1), output = t + 1; request ids "2".."11"."""
    rows = "".join(f"{t},{100 * (t + 1)},{t + 1}\n" for t in range(10))
    return write(tmp_path, "ten.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n" + rows)


def test_time_slice_is_half_open_and_rebased(ten_rows: Path) -> None:
    trace = read_trace(ten_rows, start=2.0, end=5.0)
    assert [(r.request_id, r.time) for r in trace.requests] == [("4", 0.0), ("5", 1.0), ("6", 2.0)]
    assert trace.excluded == {Reason.BEFORE_START: 2, Reason.AFTER_END: 5}


def test_slice_start_between_arrivals_keeps_the_idle_lead_in(ten_rows: Path) -> None:
    assert [r.time for r in read_trace(ten_rows, start=7.5).requests] == [0.5, 1.5]


def test_limit_applies_after_slicing(ten_rows: Path) -> None:
    trace = read_trace(ten_rows, start=3.0, limit=2)
    assert [r.request_id for r in trace.requests] == ["5", "6"]
    assert trace.excluded == {Reason.BEFORE_START: 3, Reason.OVER_LIMIT: 5}
    assert len(read_trace(ten_rows, limit=0)) == 0
    assert read_trace(ten_rows, limit=50).excluded == {}


def test_rate_scale_divides_inter_arrival_times(ten_rows: Path) -> None:
    assert [r.time for r in read_trace(ten_rows, rate_scale=2.0).requests] == [t / 2 for t in range(10)]
    assert [r.time for r in read_trace(ten_rows, start=4.0, rate_scale=0.5).requests] == [
        2.0 * t for t in range(6)
    ]


def test_caps_shorten_and_are_counted(ten_rows: Path) -> None:
    trace = read_trace(ten_rows, max_prompt_tokens=250, max_output_tokens=8)
    assert [r.prompt_tokens for r in trace.requests] == [100, 200] + [250] * 8
    assert [r.output_tokens for r in trace.requests] == [1, 2, 3, 4, 5, 6, 7, 8, 8, 8]
    assert trace.modified == {Reason.PROMPT_CAPPED: 8, Reason.OUTPUT_CAPPED: 2}


def test_capped_mooncake_prompt_keeps_the_hashes_of_the_blocks_it_covers(tmp_path: Path) -> None:
    line = {"timestamp": 0, "input_length": 2000, "output_length": 1, "hash_ids": [7, 8, 9, 10]}
    path = write(tmp_path, "t.jsonl", json.dumps(line))
    assert read_trace(path, max_prompt_tokens=1024).requests[0].prefix_block_hashes == (7, 8)
    assert read_trace(path, max_prompt_tokens=1025).requests[0].prefix_block_hashes == (7, 8, 9)


@pytest.mark.parametrize(
    "options",
    [
        {"start": -1.0},
        {"end": math.inf},
        {"start": 5.0, "end": 5.0},
        {"limit": -1},
        {"rate_scale": 0.0},
        {"rate_scale": math.nan},
        {"max_prompt_tokens": 0},
        {"max_output_tokens": 0},
    ],
)
def test_bad_options_raise_value_error(ten_rows: Path, options: dict) -> None:
    with pytest.raises(ValueError) as error:
        read_trace(ten_rows, **options)
    assert not isinstance(error.value, TraceError)


# --- bundled traces ---------------------------------------------------------------------------------------


def test_bundled_files_are_byte_exact_copies() -> None:
    notice = (bundled_trace("azure-conv").parent / "NOTICE.md").read_text()
    sums = dict(line.split()[::-1] for line in notice.split("## sha256")[1].strip().splitlines())
    assert set(sums) == set(BUNDLED_TRACES.values())
    for filename, digest in sums.items():
        data = (bundled_trace("azure-conv").parent / filename).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, filename


@pytest.mark.parametrize(
    ("name", "fmt", "rows", "span", "prompt_mean", "prompt_p50", "output_mean", "output_p50"),
    [
        ("azure-conv", "azure", 19_366, 3_502, 1_155, 1_020, 211, 129),
        ("azure-code", "azure", 8_819, 3_436, 2_048, 1_469, 28, 13),
        ("mooncake-conv", "mooncake", 12_031, 3_537, 12_035, 6_909, 343, 350),
    ],
)
def test_bundled_traces_match_their_notice(
    name: str,
    fmt: str,
    rows: int,
    span: float,
    prompt_mean: float,
    prompt_p50: float,
    output_mean: float,
    output_p50: float,
) -> None:
    trace = read_trace(bundled_trace(name))
    assert (trace.format, len(trace), trace.excluded, trace.modified) == (fmt, rows, {}, {})
    assert trace.requests[0].time == 0.0
    assert abs(trace.span - span) < 1.0
    prompts = [r.prompt_tokens for r in trace.requests]
    outputs = [r.output_tokens for r in trace.requests]
    assert abs(statistics.fmean(prompts) - prompt_mean) < 1.0
    assert abs(statistics.median(prompts) - prompt_p50) < 1.0
    assert abs(statistics.fmean(outputs) - output_mean) < 1.0
    assert abs(statistics.median(outputs) - output_p50) < 1.0
    assert len({r.request_id for r in trace.requests}) == rows


def test_bundled_mooncake_has_one_hash_per_prompt_block() -> None:
    trace = read_trace(bundled_trace("mooncake-conv"))
    assert all(
        len(r.prefix_block_hashes) == -(-r.prompt_tokens // trace.block_tokens) for r in trace.requests
    )


def test_the_fast_azure_parser_agrees_with_a_plain_one_on_the_whole_bundled_trace() -> None:
    # The reader hand-parses timestamps for speed (its speed is a benchmark's business); here a slow,
    # independent parse (datetime for the whole seconds, exact decimals for the fraction) checks every row.
    path = bundled_trace("azure-conv")
    trace = read_trace(path)
    rows = path.read_text().splitlines()[1:]
    assert len(trace.requests) == len(rows)
    epoch = datetime(1970, 1, 1)
    times = []
    for row in rows:
        stamp, prompt, output = row.split(",")
        whole, _, fraction = stamp.partition(".")
        seconds = (datetime.strptime(whole, "%Y-%m-%d %H:%M:%S") - epoch) // timedelta(seconds=1)
        times.append((Fraction(seconds) + Fraction(f"0.{fraction or 0}"), int(prompt), max(int(output), 1)))
    first = times[0][0]
    for request, (at, prompt, output) in zip(trace.requests, times, strict=True):
        assert request.time == pytest.approx(float(at - first), abs=1e-9)
        assert (request.prompt_tokens, request.output_tokens) == (prompt, output)


def test_bundled_names_and_aliases() -> None:
    assert bundled_trace("azure-conv") == bundled_trace("azure-conv-2023")
    assert bundled_trace("azure-code").name == "AzureLLMInferenceTrace_code_2023.csv"
    assert bundled_trace("mooncake-conv").suffix == ".jsonl"
    with pytest.raises(ValueError, match="azure-conv, azure-conv-2023, azure-code"):
        bundled_trace("sharegpt")


def test_resolve_trace_takes_a_name_or_a_path(tmp_path: Path) -> None:
    assert resolve_trace("mooncake-conv") == bundled_trace("mooncake-conv")
    path = write(tmp_path, "mine.csv", AZURE_HEADER)
    assert resolve_trace(path) == path
    assert resolve_trace(str(path)) == path
    with pytest.raises(FileNotFoundError, match=r"azure-conv.*mooncake-conv"):
        resolve_trace(tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="neither a bundled trace"):
        resolve_trace("azure-chat")


# --- round trips and corruption (property tests) ------------------------------------------------------------


@dataclass
class Case:
    """A trace file as data (CSV rows of fields, or JSONL objects) and what must be read back from it."""

    header: list[str] | None  # None for JSONL
    columns: tuple[str, str, str]  # the time, prompt and output fields
    rows: list  # list[list[str]] for CSV, list[dict] for JSONL
    times_ns: list[int]  # absolute time of each row, for the expected relative times
    prompts: list[int]
    outputs: list[int]
    hashes: list[tuple[int, ...]] | None = None

    def text(self, newline: str = "\n", final_newline: bool = True) -> str:
        if self.header is None:
            lines = [json.dumps(row) for row in self.rows]
        else:
            lines = [",".join(self.header)] + [",".join(row) for row in self.rows]
        return newline.join(lines) + (newline if final_newline else "")

    def first_data_line(self) -> int:
        return 1 if self.header is None else 2


prompt_tokens = st.integers(1, 200_000)
output_tokens = st.integers(1, 20_000)
AZURE_BASE = datetime(2023, 11, 16)


@st.composite
def azure_cases(draw: st.DrawFn) -> Case:
    style = draw(st.sampled_from(["2023", "2024"]))
    offset_minutes = draw(st.sampled_from([0, 60, -300, 330])) if style == "2024" else 0
    rows, times = [], []
    for _ in range(draw(st.integers(1, 15))):
        digits = 7 if style == "2023" else draw(st.integers(0, 7))
        unit = 10 ** (9 - digits)
        ns = draw(st.integers(0, 3 * 86_400 * 10**9 // unit)) * unit
        local = AZURE_BASE + timedelta(seconds=ns // 10**9, minutes=offset_minutes)
        text = local.strftime("%Y-%m-%d %H:%M:%S")
        if digits:
            text += "." + f"{ns % 10**9:09d}"[:digits]
        if style == "2024":
            sign = "+" if offset_minutes >= 0 else "-"
            text += f"{sign}{abs(offset_minutes) // 60:02d}:{abs(offset_minutes) % 60:02d}"
        rows.append([text, str(draw(prompt_tokens)), str(draw(output_tokens))])
        times.append(ns)
    header = AZURE_HEADER.split(",")
    return Case(header, tuple(header), rows, times, [int(r[1]) for r in rows], [int(r[2]) for r in rows])


@st.composite
def burstgpt_cases(draw: st.DrawFn) -> Case:
    rows, times = [], []
    for _ in range(draw(st.integers(1, 15))):
        digits = draw(st.integers(0, 9))
        ns = draw(st.integers(0, 10**7 * 10**9 // 10 ** (9 - digits))) * 10 ** (9 - digits)
        stamp = str(ns // 10**9) + ("." + f"{ns % 10**9:09d}"[:digits] if digits else "")
        prompt, output = draw(prompt_tokens), draw(output_tokens)
        model = draw(st.sampled_from(["ChatGPT", "GPT-4"]))
        log = draw(st.sampled_from(["Conversation log", "API log"]))
        rows.append([stamp, model, str(prompt), str(output), str(prompt + output), log])
        times.append(ns)
    columns = ("Timestamp", "Request tokens", "Response tokens")
    return Case(
        BURSTGPT_HEADER.split(","), columns, rows, times, [int(r[2]) for r in rows], [int(r[3]) for r in rows]
    )


@st.composite
def vidur_cases(draw: st.DrawFn) -> Case:
    # Arrival times as pandas writes floats (repr), so they are exact only to the reader's 1 ns resolution.
    seconds = draw(st.lists(st.floats(0, 1e5, allow_nan=False), min_size=1, max_size=15))
    rows = [
        [str(i), repr(t), str(draw(prompt_tokens)), str(draw(output_tokens))] for i, t in enumerate(seconds)
    ]
    times = [round(Fraction(repr(t)) * 10**9) for t in seconds]
    header = ["", "arrived_at", "num_prefill_tokens", "num_decode_tokens"]
    return Case(header, tuple(header[1:]), rows, times, [int(r[2]) for r in rows], [int(r[3]) for r in rows])


@st.composite
def mooncake_cases(draw: st.DrawFn) -> Case:
    rows = []
    for _ in range(draw(st.integers(1, 15))):
        rows.append(
            {
                "timestamp": draw(st.integers(0, 10**8)),
                "input_length": draw(prompt_tokens),
                "output_length": draw(output_tokens),
                "hash_ids": draw(st.lists(st.integers(0, 2**40), max_size=8)),
            }
        )
    return Case(
        None,
        ("timestamp", "input_length", "output_length"),
        rows,
        [r["timestamp"] * 10**6 for r in rows],
        [r["input_length"] for r in rows],
        [r["output_length"] for r in rows],
        [tuple(r["hash_ids"]) for r in rows],
    )


CSV_CASE = st.one_of(azure_cases(), burstgpt_cases(), vidur_cases())
ANY_CASE = st.one_of(CSV_CASE, mooncake_cases())


@settings(max_examples=200, deadline=None)
@given(case=ANY_CASE, newline=st.sampled_from(["\n", "\r\n"]), final_newline=st.booleans())
def test_round_trip_reads_back_what_was_written(
    tmp_path_factory: pytest.TempPathFactory, case: Case, newline: str, final_newline: bool
) -> None:
    path = write(tmp_path_factory.mktemp("rt"), "t", case.text(newline, final_newline))
    trace = read_trace(path)

    order = sorted(range(len(case.rows)), key=lambda i: case.times_ns[i])  # stable, like the reader
    origin = case.times_ns[order[0]]
    expected = [
        (
            str(i + case.first_data_line()),
            float(Fraction(case.times_ns[i] - origin, 10**9)),
            case.prompts[i],
            case.outputs[i],
        )
        for i in order
    ]
    assert rows_of(trace) == expected
    if case.hashes is not None:
        assert [r.prefix_block_hashes for r in trace.requests] == [case.hashes[i] for i in order]
    assert trace.excluded == {} and trace.modified == {}


BAD_COUNTS = ["", "abc", "-1", "1.5", "1e3", "NaN", "0x10", "٣x"]
BAD_TIMES = {
    "TIMESTAMP": [
        "",
        "abc",
        "2023-11-16",
        "2023-13-16 18:17:03.1",
        "2023-11-16 25:17:03.1",
        "2023-11-16 18:17:03.",
        "2023-11-16 18:17:03:5",
        "2023-11-16 18:17:03.1234567890",
        "2023-11-16 18:17:03.12+0000",
        "2023-11-16 18:17:03.12+ab:00",
    ],
    "Timestamp": ["", "abc", "nan", "inf", "1.2.3", "--1", "1e", "0x10"],
    "arrived_at": ["", "abc", "nan", "-inf", "1.2.3", "--1", "1e"],
}
BAD_JSON_VALUES = {
    "timestamp": ["3", None, True, [1], {}],
    "input_length": [0, -1, 1.5, "3", None, True],
    "output_length": [-1, 1.5, "3", None, False],
    "hash_ids": ["x", [1.5], [None], 3, {}],
}


@settings(max_examples=300, deadline=None)
@given(case=ANY_CASE, data=st.data())
def test_one_corrupt_field_is_reported_with_its_line_and_name(
    tmp_path_factory: pytest.TempPathFactory, case: Case, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(case.rows) - 1))
    row = case.rows[index]
    if case.header is None:
        field = data.draw(st.sampled_from(sorted(BAD_JSON_VALUES)))
        if data.draw(st.booleans()) and field != "hash_ids":  # hash_ids is optional
            del row[field]
        else:
            row[field] = data.draw(st.sampled_from(BAD_JSON_VALUES[field]))
    else:
        field = data.draw(st.sampled_from(case.columns))
        bad = BAD_TIMES[field] if field == case.columns[0] else BAD_COUNTS
        row[case.header.index(field)] = data.draw(st.sampled_from(bad))
    path = write(tmp_path_factory.mktemp("bad"), "t", case.text())

    with pytest.raises(TraceError) as error:
        read_trace(path)
    assert (error.value.line, error.value.field) == (index + case.first_data_line(), field)
    assert f":{error.value.line}: field '{field}'" in str(error.value)


@settings(max_examples=100, deadline=None)
@given(case=CSV_CASE, data=st.data())
def test_a_row_with_a_field_too_many_or_too_few_is_reported(
    tmp_path_factory: pytest.TempPathFactory, case: Case, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(case.rows) - 1))
    if data.draw(st.booleans()):
        case.rows[index].append("7")
        expected_field = None
    else:
        case.rows[index].pop()
        expected_field = case.header[-1]
    with pytest.raises(TraceError) as error:
        read_trace(write(tmp_path_factory.mktemp("cols"), "t", case.text()))
    assert (error.value.line, error.value.field) == (index + 2, expected_field)


@settings(max_examples=200, deadline=None)
@given(
    case=burstgpt_cases(),
    failed=st.sets(st.integers(0, 14)),
    start=st.none() | st.floats(0, 1e7),
    length=st.none() | st.floats(1e-3, 1e7),
    limit=st.none() | st.integers(0, 20),
    include_failed=st.booleans(),
)
def test_every_row_is_accounted_for(
    tmp_path_factory: pytest.TempPathFactory,
    case: Case,
    failed: set[int],
    start: float | None,
    length: float | None,
    limit: int | None,
    include_failed: bool,
) -> None:
    for i in failed & set(range(len(case.rows))):
        case.rows[i][3] = "0"
    end = None if length is None else (start or 0.0) + length
    path = write(tmp_path_factory.mktemp("acct"), "t", case.text())
    trace = read_trace(path, start=start, end=end, limit=limit, include_failed=include_failed)

    assert len(trace) + sum(trace.excluded.values()) == len(case.rows)
    assert limit is None or len(trace) <= limit
    assert all(0.0 <= r.time < (end or math.inf) - (start or 0.0) + 1e-9 for r in trace.requests)
    assert [r.time for r in trace.requests] == sorted(r.time for r in trace.requests)
    assert all(r.output_tokens >= 1 for r in trace.requests)
    assert trace.modified.get(Reason.ZERO_OUTPUT, 0) == sum(
        1 for r in trace.requests if case.rows[int(r.request_id) - 2][3] == "0"
    )


# --- gzip, clocks beyond range, arbitrary bytes (issue 13, item 9) ------------------------------------------


@settings(max_examples=100, deadline=None)
@given(case=ANY_CASE)
def test_a_gzipped_trace_reads_as_its_plain_text(
    tmp_path_factory: pytest.TempPathFactory, case: Case
) -> None:
    directory = tmp_path_factory.mktemp("gz")
    plain = write(directory, "t", case.text())
    # Detected from the bytes, not the name: a .gz suffix is neither needed nor trusted.
    compressed = write(directory, "t.data", gzip.compress(case.text().encode()))
    assert read_trace(compressed).requests == read_trace(plain).requests


def test_a_truncated_or_corrupt_gzipped_trace_is_a_trace_error(tmp_path: Path) -> None:
    rows = "".join(f"{t},{100 + t},{t + 1}\n" for t in range(2000))
    data = gzip.compress(("arrived_at,num_prefill_tokens,num_decode_tokens\n" + rows).encode())
    for name, content in (("cut.gz", data[:-100]), ("bad.gz", data[:20] + b"\xff" * 30 + data[50:])):
        path = write(tmp_path, name, content)
        with pytest.raises(TraceError, match="^" + re.escape(str(path))):
            read_trace(path)


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (
            '{"timestamp": 0, "input_length": 5, "output_length": 1}\n'
            '{"timestamp": 1e300, "input_length": 5, "output_length": 1}\n',
            "timestamp",
        ),
        ('{"timestamp": 1e308, "input_length": 5, "output_length": 1}\n', "timestamp"),
        (
            '{"timestamp": 0, "input_length": 5, "output_length": 1}\n'
            '{"timestamp": ' + "9" * 400 + ', "input_length": 5, "output_length": 1}\n',
            "timestamp",
        ),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,5,1\n1e400,5,1\n", "arrived_at"),
        (f"{BURSTGPT_HEADER}\n0,ChatGPT,4,1,5,API log\n-1e30,ChatGPT,4,1,5,API log\n", "Timestamp"),
    ],
)
def test_a_time_beyond_any_clock_is_a_trace_error_naming_line_and_field(
    tmp_path: Path, content: str, field: str
) -> None:
    path = write(tmp_path, "t", content)
    with pytest.raises(TraceError) as error:
        read_trace(path)
    assert (error.value.line, error.value.field) == (content.count("\n"), field)


def test_a_json_integer_too_long_to_convert_is_a_trace_error(tmp_path: Path) -> None:
    path = write(tmp_path, "t", '{"timestamp": 0, "input_length": ' + "9" * 5000 + ', "output_length": 1}\n')
    with pytest.raises(TraceError, match=re.escape(f"{path}:1: ")):
        read_trace(path)


def test_a_directory_is_a_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="^" + re.escape(str(tmp_path))):
        read_trace(tmp_path)


@settings(max_examples=300, deadline=None)
@given(content=st.binary(max_size=400), compress=st.booleans())
def test_arbitrary_bytes_give_a_trace_or_a_trace_error(
    tmp_path_factory: pytest.TempPathFactory, content: bytes, compress: bool
) -> None:
    path = write(tmp_path_factory.mktemp("fuzz"), "t", gzip.compress(content) if compress else content)
    try:
        trace = read_trace(path)
    except TraceError as error:
        assert str(error).startswith(str(path))
    else:
        assert all(math.isfinite(r.time) and r.time >= 0 for r in trace.requests)


@settings(max_examples=200, deadline=None)
@given(case=ANY_CASE, data=st.data())
def test_any_truncation_or_byte_flip_gives_a_trace_or_a_trace_error(
    tmp_path_factory: pytest.TempPathFactory, case: Case, data: st.DataObject
) -> None:
    content = bytearray(case.text().encode())
    for _ in range(data.draw(st.integers(0, 3))):
        content[data.draw(st.integers(0, len(content) - 1))] = data.draw(st.integers(0, 255))
    content = content[: data.draw(st.integers(0, len(content)))]
    if data.draw(st.booleans()):
        content = bytearray(gzip.compress(bytes(content)))
        content = content[: data.draw(st.integers(0, len(content)))]
    path = write(tmp_path_factory.mktemp("cut"), "t", bytes(content))
    try:
        trace = read_trace(path)
    except TraceError as error:
        assert str(error).startswith(str(path))
    else:
        assert all(math.isfinite(r.time) and r.time >= 0 for r in trace.requests)
