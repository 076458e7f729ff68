"""Readers for public LLM request traces, turned into `RequestArrival` lists.

Formats are detected from the first line of the file, never from its name:

- ``azure``: Azure LLM inference traces, header ``TIMESTAMP,ContextTokens,GeneratedTokens``. Both the 2023
  timestamps (``2023-11-16 18:17:03.9799600``) and the 2024 ones (``2024-05-10 00:00:00.0078+00:00``, any
  number of fractional digits, any UTC offset) are accepted; a timestamp without an offset is taken as UTC.
- ``mooncake``: Mooncake JSONL, one object a line with ``timestamp`` (milliseconds), ``input_length``,
  ``output_length`` and optionally ``hash_ids`` (one id per 512-token prompt block).
- ``burstgpt``: BurstGPT CSV (``Timestamp`` in seconds, ``Request tokens``, ``Response tokens``, ...).
  A row with 0 response tokens is a failed request.
- ``vidur``: Vidur processed traces (``arrived_at`` in seconds, ``num_prefill_tokens``,
  ``num_decode_tokens``).

Columns are found by name, so extra columns (Vidur's unnamed index, BurstGPT's session columns) are fine.
A gzip-compressed file (recognised by its first bytes, whatever its name) is read as its decompressed text.

Conventions every reader follows:

- A time beyond a million years from the epoch (``MAX_TIME_S``) is malformed: no trace spans that, and the
  float seconds a simulator works in could not hold it.
- Times are seconds since the earliest row of the file, kept as integer nanoseconds until the end so that
  sorting and re-basing are exact; rows are sorted by time, ties keep file order.
- A request id is the 1-based line number of its row in the file, the same number a `TraceError` reports.
- A prompt of 0 tokens is malformed (`TraceError`). An output of 0 tokens is clamped to 1, because a served
  request produces at least one token; each clamp is counted in `Trace.modified`. BurstGPT's failed requests
  are the exception: they are excluded unless ``include_failed=True`` (then clamped like any other).
- Every row is accounted for: ``len(trace) + sum(trace.excluded.values())`` is the number of rows in the file.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from functools import lru_cache
from importlib.resources import files
from operator import attrgetter
from pathlib import Path
from types import MappingProxyType
from typing import IO, NamedTuple

from vllm_shadow.adapters.events import RequestArrival

MOONCAKE_BLOCK_TOKENS = 512  # prompt tokens covered by one Mooncake hash id
_NS_PER_S = 1_000_000_000
MAX_TIME_S = 31_557_600_000_000  # a million years: the bound on any timestamp, either side of the epoch
_MAX_TIME_NS = MAX_TIME_S * _NS_PER_S
_GZIP_MAGIC = b"\x1f\x8b"


class TraceError(ValueError):
    """A malformed trace file; the message names the file, the 1-based line and the field."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, field: str | None, problem: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: field {field!r}: {problem}" if field else f"{where}: {problem}")


class Reason(StrEnum):
    """Why a row is missing from a `Trace`, or why a request differs from its row (the counters' keys)."""

    FAILED = "failed request (0 response tokens)"
    BEFORE_START = "before the time slice"
    AFTER_END = "at or after the end of the time slice"
    OVER_LIMIT = "beyond the request limit"
    ZERO_OUTPUT = "0 output tokens, clamped to 1"
    PROMPT_CAPPED = "prompt tokens capped"
    OUTPUT_CAPPED = "output tokens capped"


@dataclass(frozen=True, slots=True)
class Trace:
    """Requests read from a file (or generated), with an account of what was left out or changed."""

    source: Path | None  # None for synthetic traces
    format: str
    requests: list[RequestArrival] = field(repr=False)  # sorted by time, ties in file order
    excluded: dict[str, int] = field(default_factory=dict)  # rows not in `requests`, by `Reason`
    modified: dict[str, int] = field(default_factory=dict)  # requests that differ from their row
    # Prompt tokens per `prefix_block_hashes` entry; None when the trace has no hashes.
    block_tokens: int | None = None

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def span(self) -> float:
        """Seconds from the first arrival to the last."""
        return self.requests[-1].time - self.requests[0].time if self.requests else 0.0


class _Row(NamedTuple):
    time_ns: int
    line: int
    prompt: int
    output: int
    hashes: tuple[int, ...] = ()


# --- fields ---------------------------------------------------------------------------------------


def _to_int(text: str) -> int:
    """The integer in `text`, or -1 when there is none (callers reject negatives anyway)."""
    try:
        return int(text)
    except ValueError:
        return -1


_EPOCH = datetime(1970, 1, 1)
_ONE_SECOND = timedelta(seconds=1)
_DATE_TIME = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d", re.ASCII)


@lru_cache(maxsize=4096)
def _whole_second_ns(text: str) -> int:
    """Nanoseconds since the epoch of ``YYYY-MM-DD HH:MM:SS`` (UTC)."""
    # Rows come several per second and nearly in order, so this cache leaves one datetime parse per second.
    if not _DATE_TIME.fullmatch(text):
        raise ValueError(text)
    return (datetime.fromisoformat(text) - _EPOCH) // _ONE_SECOND * _NS_PER_S


@lru_cache(maxsize=64)
def _utc_offset_ns(text: str) -> int:
    """Nanoseconds in a ``+HH:MM`` or ``-HH:MM`` UTC offset."""
    hours, minutes = text[1:3], text[4:]
    if not (hours.isdigit() and minutes.isdigit()):
        raise ValueError(text)
    return (int(hours) * 3600 + int(minutes) * 60) * _NS_PER_S * (1 if text[0] == "+" else -1)


def _azure_time_ns(text: str) -> int:
    """Nanoseconds since the epoch of an Azure timestamp, exact for up to 9 fractional digits."""
    # Hand-parsed rather than datetime.fromisoformat per row: that is slower, and it drops a 7th digit.
    rest = text[19:]  # what follows the whole seconds: a fraction, then maybe a UTC offset
    offset_ns = 0
    if rest[-6:-5] in ("+", "-") and rest[-3:-2] == ":":
        offset_ns = _utc_offset_ns(rest[-6:])
        rest = rest[:-6]
    elif rest[-1:] == "Z":
        rest = rest[:-1]
    ns = _whole_second_ns(text[:19]) - offset_ns
    if rest:
        frac = rest[1:]
        if rest[0] != "." or not frac.isdigit() or len(frac) > 9:
            raise ValueError(text)
        ns += int(frac) * 10 ** (9 - len(frac))
    return ns


def _in_range(ns: int) -> int:
    if not -_MAX_TIME_NS <= ns <= _MAX_TIME_NS:
        raise ValueError(ns)
    return ns


def _seconds_ns(text: str) -> int:
    """Nanoseconds in a decimal number of seconds, rounded to the nanosecond."""
    whole, dot, frac = text.partition(".")
    if whole.isdigit() and (not dot or (frac.isdigit() and len(frac) <= 9)):
        return _in_range(int(whole) * _NS_PER_S + (int(frac) * 10 ** (9 - len(frac)) if frac else 0))
    # The rare forms (a sign, an exponent, the 17 digits pandas writes for a float) take exact decimals.
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(text) from None
    if not value.is_finite() or abs(value) > MAX_TIME_S:
        raise ValueError(text)
    return int((value * _NS_PER_S).to_integral_value())


def _count_error(path: Path, line: int, field: str, text: str, *, positive: bool) -> TraceError:
    kind = "a positive" if positive else "a non-negative"
    return TraceError(path, line, field, f"expected {kind} integer, got {text!r}")


# --- CSV formats ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CsvFormat:
    name: str
    time_column: str
    prompt_column: str
    output_column: str
    parse_time_ns: Callable[[str], int]
    time_expected: str  # completes "expected ..." in error messages
    zero_output_is_failure: bool = False

    @property
    def columns(self) -> tuple[str, str, str]:
        return self.time_column, self.prompt_column, self.output_column


_AZURE = _CsvFormat(
    "azure",
    "TIMESTAMP",
    "ContextTokens",
    "GeneratedTokens",
    _azure_time_ns,
    "a timestamp like '2023-11-16 18:17:03.9799600' or '2024-05-10 00:00:00.0078+00:00'",
)
_BURSTGPT = _CsvFormat(
    "burstgpt",
    "Timestamp",
    "Request tokens",
    "Response tokens",
    _seconds_ns,
    "a number of seconds",
    zero_output_is_failure=True,
)
_VIDUR = _CsvFormat(
    "vidur", "arrived_at", "num_prefill_tokens", "num_decode_tokens", _seconds_ns, "a number of seconds"
)
_CSV_FORMATS = (_AZURE, _BURSTGPT, _VIDUR)


def _read_csv(path: Path, fmt: _CsvFormat, lines: Iterable[str]) -> list[_Row]:
    reader = csv.reader(lines)
    header = [name.strip() for name in next(reader)]
    time_i, prompt_i, output_i = (header.index(column) for column in fmt.columns)
    width = len(header)
    rows = []
    for fields in reader:
        line = reader.line_num
        if len(fields) != width:
            if not fields:  # a blank line, e.g. a trailing one
                continue
            if len(fields) < width:
                problem = f"missing (the line has {len(fields)} of {width} fields)"
                raise TraceError(path, line, header[len(fields)], problem)
            raise TraceError(path, line, None, f"expected {width} fields as in the header, got {len(fields)}")
        try:
            time_ns = fmt.parse_time_ns(fields[time_i])
        except ValueError:
            problem = f"expected {fmt.time_expected}, got {fields[time_i]!r}"
            raise TraceError(path, line, fmt.time_column, problem) from None
        prompt = _to_int(fields[prompt_i])
        if prompt <= 0:
            raise _count_error(path, line, fmt.prompt_column, fields[prompt_i], positive=True)
        output = _to_int(fields[output_i])
        if output < 0:
            raise _count_error(path, line, fmt.output_column, fields[output_i], positive=False)
        rows.append(_Row(time_ns, line, prompt, output))
    return rows


# --- Mooncake JSONL -------------------------------------------------------------------------------


def _json_text(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_count(path: Path, line: int, obj: dict, key: str, *, positive: bool) -> int:
    if key not in obj:
        raise TraceError(path, line, key, "missing")
    value = obj[key]
    # `type(...) is int` because bool is an int subclass, and `true` is no token count.
    if type(value) is not int or value < 0 or (positive and value == 0):
        raise _count_error(path, line, key, _json_text(value), positive=positive)
    return value


def _json_time_ns(path: Path, line: int, obj: dict) -> int:
    if "timestamp" not in obj:
        raise TraceError(path, line, "timestamp", "missing")
    ms = obj["timestamp"]
    # abs() < bound compares an int exactly, with no float conversion to overflow; NaN fails it too.
    if type(ms) in (int, float) and abs(ms) <= MAX_TIME_S * 1000:
        return ms * 1_000_000 if type(ms) is int else round(ms * 1_000_000)
    expected = f"a number of milliseconds within ±{MAX_TIME_S * 1000:.0e}"
    raise TraceError(path, line, "timestamp", f"expected {expected}, got {_json_text(ms)}")


def _read_mooncake(path: Path, lines: Iterable[str]) -> list[_Row]:
    rows = []
    for line, text in enumerate(lines, 1):
        if not text or text.isspace():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as error:
            problem = f"invalid JSON: {error.msg} at character {error.pos + 1}"
            raise TraceError(path, line, None, problem) from None
        except ValueError as error:  # an integer too long to convert
            raise TraceError(path, line, None, f"invalid JSON: {error}") from None
        if type(obj) is not dict:
            raise TraceError(path, line, None, f"expected a JSON object, got {_json_text(obj)}")
        time_ns = _json_time_ns(path, line, obj)
        prompt = _json_count(path, line, obj, "input_length", positive=True)
        output = _json_count(path, line, obj, "output_length", positive=False)
        hash_ids = obj.get("hash_ids", [])
        if type(hash_ids) is not list or not all(type(h) is int for h in hash_ids):
            problem = f"expected a list of integers, got {_json_text(hash_ids)}"
            raise TraceError(path, line, "hash_ids", problem)
        rows.append(_Row(time_ns, line, prompt, output, tuple(hash_ids)))
    return rows


# --- detection ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Parsed:
    format: str
    rows: list[_Row]  # in file order
    zero_output_is_failure: bool
    block_tokens: int | None


def _open_text(path: Path) -> IO[str]:
    """The file as text, decompressed when its first bytes are gzip's."""
    with path.open("rb") as probe:
        compressed = probe.read(2) == _GZIP_MAGIC
    if compressed:
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")


def _parse(path: Path) -> _Parsed:
    with _open_text(path) as f:
        first = f.readline()
        if not first:
            raise TraceError(path, 1, None, "empty file: expected a CSV header or a JSON line")
        lines = itertools.chain([first], f)
        if first.lstrip().startswith("{"):
            return _Parsed("mooncake", _read_mooncake(path, lines), False, MOONCAKE_BLOCK_TOKENS)
        header = {name.strip() for name in next(csv.reader([first]), [])}
        for fmt in _CSV_FORMATS:
            if header.issuperset(fmt.columns):
                return _Parsed(fmt.name, _read_csv(path, fmt, lines), fmt.zero_output_is_failure, None)
    known = "; ".join(f"{fmt.name} ({','.join(fmt.columns)})" for fmt in _CSV_FORMATS)
    problem = f"unrecognised header {first.strip()[:80]!r}; expected Mooncake JSONL or a CSV with {known}"
    raise TraceError(path, 1, None, problem)


# --- selection ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Selection:
    """The options of `read_trace`, checked."""

    start: float | None
    end: float | None
    limit: int | None
    rate_scale: float
    max_prompt_tokens: int | None
    max_output_tokens: int | None
    include_failed: bool

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if not (math.isfinite(self.rate_scale) and self.rate_scale > 0):
            raise ValueError(f"rate_scale must be a finite number > 0, got {self.rate_scale!r}")
        for name in ("max_prompt_tokens", "max_output_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


def _counts(counter: Counter[str]) -> dict[str, int]:
    # Plain str keys print cleanly and still compare equal to the `Reason` members.
    return {str(reason): n for reason, n in counter.items() if n}


def _select(parsed: _Parsed, sel: _Selection) -> tuple[list[_Row], int, dict[str, int]]:
    """The rows `sel` keeps, sorted; the time (ns) that becomes 0; the exclusion counts."""
    rows = sorted(parsed.rows, key=attrgetter("time_ns"))  # stable: equal times keep file order
    origin_ns = rows[0].time_ns if rows else 0
    base_ns = origin_ns + round((sel.start or 0.0) * _NS_PER_S)
    excluded: Counter[str] = Counter()

    def keep(reason: Reason, condition: Callable[[_Row], bool]) -> None:
        nonlocal rows
        kept = [row for row in rows if condition(row)]
        excluded[reason] += len(rows) - len(kept)
        rows = kept

    if parsed.zero_output_is_failure and not sel.include_failed:
        keep(Reason.FAILED, lambda row: row.output > 0)
    if sel.start is not None:
        keep(Reason.BEFORE_START, lambda row: row.time_ns >= base_ns)
    if sel.end is not None:
        end_ns = origin_ns + round(sel.end * _NS_PER_S)
        keep(Reason.AFTER_END, lambda row: row.time_ns < end_ns)
    if sel.limit is not None and len(rows) > sel.limit:
        excluded[Reason.OVER_LIMIT] += len(rows) - sel.limit
        rows = rows[: sel.limit]
    return rows, base_ns, _counts(excluded)


def _to_requests(
    rows: list[_Row], base_ns: int, sel: _Selection, block_tokens: int | None
) -> tuple[list[RequestArrival], dict[str, int]]:
    modified: Counter[str] = Counter()
    requests = []
    for time_ns, line, prompt, output, hashes in rows:
        # int / int is correctly rounded, so an unscaled time is the exact time to the nearest float.
        time = (time_ns - base_ns) / _NS_PER_S
        if sel.rate_scale != 1.0:
            time /= sel.rate_scale
        if output == 0:
            output = 1
            modified[Reason.ZERO_OUTPUT] += 1
        if sel.max_prompt_tokens is not None and prompt > sel.max_prompt_tokens:
            prompt = sel.max_prompt_tokens
            if block_tokens:  # keep the ids of the blocks the shortened prompt still touches
                hashes = hashes[: -(-prompt // block_tokens)]
            modified[Reason.PROMPT_CAPPED] += 1
        if sel.max_output_tokens is not None and output > sel.max_output_tokens:
            output = sel.max_output_tokens
            modified[Reason.OUTPUT_CAPPED] += 1
        requests.append(RequestArrival(str(line), time, prompt, output, prefix_block_hashes=hashes))
    return requests, _counts(modified)


def read_trace(
    path: str | os.PathLike[str],
    *,
    start: float | None = None,
    end: float | None = None,
    limit: int | None = None,
    rate_scale: float = 1.0,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
    include_failed: bool = False,
) -> Trace:
    """Read a trace file in any supported format (detected from its first line).

    `start` and `end` keep the rows arriving in [start, end), in seconds since the earliest row, and shift
    times so that `start` becomes 0. `limit` then keeps the first N requests. `rate_scale` divides the
    re-based times (2.0 = twice the arrival rate). The caps shorten longer prompts and outputs; a capped
    Mooncake prompt keeps the hash ids of the blocks it still covers. `include_failed` keeps BurstGPT's
    failed requests. Raises `TraceError` on malformed input and `ValueError` on bad options.
    """
    sel = _Selection(start, end, limit, rate_scale, max_prompt_tokens, max_output_tokens, include_failed)
    path = Path(path)
    try:
        parsed = _parse(path)
    except UnicodeDecodeError as error:
        raise TraceError(path, None, None, f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    except EOFError:  # a gzip stream without its end marker
        raise TraceError(path, None, None, "compressed stream ends early (a truncated .gz?)") from None
    except (gzip.BadGzipFile, zlib.error) as error:
        raise TraceError(path, None, None, f"corrupt gzip data ({error})") from None
    except csv.Error as error:  # e.g. a field over the csv module's size limit
        raise TraceError(path, None, None, f"malformed CSV: {error}") from None
    except (IsADirectoryError, PermissionError) as error:
        raise TraceError(path, None, None, f"cannot be read: {error.strerror}") from None
    rows, base_ns, excluded = _select(parsed, sel)
    requests, modified = _to_requests(rows, base_ns, sel, parsed.block_tokens)
    return Trace(path, parsed.format, requests, excluded, modified, parsed.block_tokens)


# --- prefix identity -----------------------------------------------------------------------------


def block_hashes_for(
    prefix_block_hashes: tuple[int, ...], prompt_tokens: int, trace_block_tokens: int, block_size: int
) -> tuple[int, ...]:
    """The prefix-cache identity of a request's full blocks of `block_size` prompt tokens (what vLLM publishes
    as `Request.block_hashes`), from a trace's ids of `trace_block_tokens`-token blocks (Mooncake: 512).

    A trace id is a chained hash: equal ids at position i mean equal prompts up to the end of trace block i.
    Engine block k (tokens k*block_size .. (k+1)*block_size - 1) is then identified by the id of the trace block
    holding its last token, i, together with k: every token of block k lies at or before the end of trace block
    i, so (id_i, k) fixes the whole prefix up to block k, and the chain carries over. The pair is packed into
    one int, id_i * 2**32 + k, which is exact (no two pairs share an int for k < 2**32).
    A trace block the prompt covers only in part (the last, usually) is never shared: its ids say nothing about
    which of its tokens the prompt holds, so the hashes stop at the first engine block whose last token lies in
    it (those blocks stay private to the request: cached for its own resume, as vLLM caches them, never hit by
    another). So do they at the first engine block past the ids the trace gives.
    """
    num_full_trace_blocks = min(prompt_tokens // trace_block_tokens, len(prefix_block_hashes))
    shareable_tokens = num_full_trace_blocks * trace_block_tokens
    return tuple(
        (prefix_block_hashes[((k + 1) * block_size - 1) // trace_block_tokens] << _SUB_BLOCK_BITS) + k
        for k in range(shareable_tokens // block_size)
    )


_SUB_BLOCK_BITS = 32


def with_block_hashes(trace: Trace, block_size: int) -> list[RequestArrival]:
    """The trace's requests with `block_hashes` for an engine of `block_size`-token blocks (see
    `block_hashes_for`); the requests themselves when the trace carries no prefix ids."""
    if not trace.block_tokens:
        return trace.requests
    return [
        replace(
            r,
            block_hashes=block_hashes_for(
                r.prefix_block_hashes, r.prompt_tokens, trace.block_tokens, block_size
            ),
        )
        for r in trace.requests
    ]


# --- bundled data ---------------------------------------------------------------------------------


BUNDLED_TRACES: Mapping[str, str] = MappingProxyType(
    {
        "azure-conv": "AzureLLMInferenceTrace_conv_2023.csv",
        "azure-conv-2023": "AzureLLMInferenceTrace_conv_2023.csv",
        "azure-code": "AzureLLMInferenceTrace_code_2023.csv",
        "azure-code-2023": "AzureLLMInferenceTrace_code_2023.csv",
        "mooncake-conv": "mooncake_conversation_trace.jsonl",
    }
)


def bundled_trace(name: str) -> Path:
    """The path of a trace shipped with the package (names in `BUNDLED_TRACES`; attribution in NOTICE.md)."""
    try:
        filename = BUNDLED_TRACES[name]
    except KeyError:
        raise ValueError(f"no bundled trace {name!r}; bundled traces: {', '.join(BUNDLED_TRACES)}") from None
    resource = files("vllm_shadow.adapters") / "data" / "traces" / filename
    # The readers need a real file; a zipped install would hand back a zip entry instead.
    if not isinstance(resource, Path) or not resource.is_file():
        raise FileNotFoundError(f"bundled trace {name!r} is not a file on disk: {resource}")
    return resource


def resolve_trace(name_or_path: str | os.PathLike[str]) -> Path:
    """The path of a bundled trace name or of a trace file. Bundled names win: write ``./name`` for a file."""
    if isinstance(name_or_path, str) and name_or_path in BUNDLED_TRACES:
        return bundled_trace(name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(name_or_path)!r} is neither a bundled trace ({', '.join(BUNDLED_TRACES)}) nor a file"
        )
    return path
