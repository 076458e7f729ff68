"""Record an event stream to a file and read it back as the same dataclasses.

Format: JSON lines, gzip-compressed when the name ends in `.gz`. Line 1 is a header
`{"format": "shadow-events", "version": 1}`; every other line is one event, its dataclass fields plus a `type`
tag (`arrival`, `finish`, `step`, `info`). Batches' senders and drop counts are kept as `batch` lines so that
a replay knows what was lost. A reader error names the file and line.

A recording whose writer was killed (kill -9, a crash) ends mid-line, or, gzipped, without the end-of-stream
marker: it is read up to its last complete line and a `RecordingTruncatedWarning` names where it stops. Every
other damage (not gzip, not UTF-8, not JSON, a wrong field) is a `RecordingError`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from vllm_shadow.adapters.events import (
    EngineInfo,
    EngineStep,
    Event,
    RequestArrival,
    RequestFinish,
    SchedulerSettings,
)
from vllm_shadow.adapters.publisher import EventBatch

FORMAT = "shadow-events"
VERSION = 1

_TAGS: dict[type, str] = {
    RequestArrival: "arrival",
    RequestFinish: "finish",
    EngineStep: "step",
    EngineInfo: "info",
}
_TYPES = {tag: cls for cls, tag in _TAGS.items()}
_FIELDS = {cls: {f.name for f in dataclasses.fields(cls)} for cls in _TAGS}
_TUPLE_FIELDS = {"prefix_block_hashes", "block_hashes", "preempted", "resumed", "finished"}


def _is_int(v: object) -> bool:
    return type(v) is int


def _is_float(v: object) -> bool:
    return type(v) in (int, float)


def _is_str(v: object) -> bool:
    return type(v) is str


def _is_opt_int(v: object) -> bool:
    return v is None or type(v) is int


def _is_ints(v: object) -> bool:
    return type(v) is list and all(type(x) is int for x in v)


def _is_strs(v: object) -> bool:
    return type(v) is list and all(type(x) is str for x in v)


def _is_token_map(v: object) -> bool:
    return type(v) is dict and all(type(n) is int for n in v.values())


def _is_object(v: object) -> bool:
    return type(v) is dict


def _is_finite(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)  # type: ignore[arg-type]


def _is_duration(v: object) -> bool:
    return _is_finite(v) and v >= 0  # type: ignore[operator]


# What a number must be beyond its JSON type: json.loads takes NaN and Infinity, which would poison every sum.
_EXPECTED = {_is_finite: "a finite number", _is_duration: "a finite number of seconds >= 0"}

# JSON types per field: a recording is outside input, and a wrong type must fail at its line, not in a replay.
_CHECKS = {
    RequestArrival: dict(
        request_id=_is_str,
        time=_is_finite,
        prompt_tokens=_is_int,
        output_tokens=_is_opt_int,
        max_tokens=_is_opt_int,
        priority=_is_int,
        prefix_block_hashes=_is_ints,
        block_hashes=_is_ints,
    ),
    RequestFinish: dict(
        request_id=_is_str, time=_is_finite, output_tokens=_is_int, reason=_is_str, block_hashes=_is_ints
    ),
    EngineStep: dict(
        step=_is_int,
        start_time=_is_finite,
        duration=_is_duration,
        scheduled_tokens=_is_token_map,
        preempted=_is_strs,
        resumed=_is_strs,
        finished=_is_strs,
        kv_blocks_used=_is_int,
        cached_tokens=_is_token_map,
    ),
    EngineInfo: dict(
        model=_is_str,
        block_size=_is_int,
        num_kv_blocks=_is_int,
        scheduler=_is_object,
        engine=_is_str,
        model_config=_is_object,
        tensor_parallel_size=_is_int,
    ),
}


class RecordingError(ValueError):
    """A damaged or foreign recording; the message names the file, the 1-based line and, if known, the field."""

    def __init__(
        self, path: str | os.PathLike[str], line: int | None, problem: str, field: str | None = None
    ) -> None:
        super().__init__(f"{path}: {problem}" if line is None else f"{path}:{line}: {problem}")
        self.path = str(path)
        self.line = line
        self.field = field


class RecordingTruncatedWarning(UserWarning):
    """A recording cut short by its writer's death: read up to its last complete line, `line` is the first lost."""

    def __init__(self, path: str | os.PathLike[str], line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path = str(path)
        self.line = line


class _FieldError(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field


def _open(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")
    return path.open(mode, encoding="utf-8")


def event_to_json(event: Event) -> dict[str, Any]:
    tag = _TAGS.get(type(event))
    if tag is None:
        raise TypeError(f"not a schema event: {type(event).__name__}")
    # asdict() deep-copies; shallow field access keeps the dict order of scheduled_tokens and is cheaper.
    out: dict[str, Any] = {"type": tag}
    for name in _FIELDS[type(event)]:
        value = getattr(event, name)
        out[name] = dataclasses.asdict(value) if isinstance(value, SchedulerSettings) else value
    return out


def event_from_json(obj: dict[str, Any]) -> Event:
    """Inverse of `event_to_json`; raises ValueError (KeyError, TypeError included) on a malformed object."""
    cls = _TYPES.get(obj.get("type", ""))
    if cls is None:
        raise ValueError(f"unknown event type {obj.get('type')!r}")
    kwargs = {k: v for k, v in obj.items() if k != "type"}
    unknown = kwargs.keys() - _FIELDS[cls]
    if unknown:
        raise ValueError(f"unknown {obj['type']} fields {sorted(unknown)}")
    checks = _CHECKS[cls]
    for name, value in kwargs.items():
        check = checks[name]
        if not check(value):
            field = f"{obj['type']}.{name}"
            if check in _EXPECTED and _is_float(value):
                raise _FieldError(field, f"{field} must be {_EXPECTED[check]}, got {json.dumps(value)}")
            raise _FieldError(field, f"{field} has the wrong type: {json.dumps(value)[:80]}")
    for name in _TUPLE_FIELDS & kwargs.keys():
        kwargs[name] = tuple(kwargs[name])
    if "scheduler" in kwargs:
        kwargs["scheduler"] = SchedulerSettings(**kwargs["scheduler"])
    return cls(**kwargs)


class Recorder:
    """A batch sink that appends every event to a recording. Thread-safe; `close()` flushes the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file = _open(self.path, "w")
        self._file.write(json.dumps({"format": FORMAT, "version": VERSION}) + "\n")

    def __repr__(self) -> str:
        return f"Recorder({str(self.path)!r})"

    def __call__(self, batch: EventBatch) -> None:
        lines = [
            json.dumps(
                {
                    "type": "batch",
                    "source": batch.source,
                    "sequence": batch.sequence,
                    "dropped": batch.dropped,
                }
            )
        ]
        lines.extend(json.dumps(event_to_json(e)) for e in batch.events)
        with self._lock:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()

    def write(self, events: list[Event]) -> None:
        self(EventBatch(list(events)))

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The complete lines of a recording, numbered from 1; a cut end is warned about, not raised."""
    try:
        raw = path.open("rb")
    except IsADirectoryError:
        raise RecordingError(path, None, "is a directory, not a recording") from None
    except OSError as exc:
        raise RecordingError(path, None, f"cannot be read: {exc.strerror or exc}") from None
    number = 0
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
    with raw, stream:
        try:
            for data in stream:
                if not data.endswith(b"\n"):  # the last line, unfinished unless it parses
                    try:
                        json.loads(data)
                    except ValueError:
                        _cut(path, number, "the last line is unfinished")
                        return
                number += 1
                try:
                    yield number, data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    problem = f"not UTF-8 text ({exc.reason} at byte {exc.start + 1} of the line)"
                    raise RecordingError(path, number, problem) from None
        except EOFError:  # a gzip stream without its end marker: the recorder was never closed
            _cut(path, number, "the compressed stream ends early")
        except gzip.BadGzipFile as exc:
            raise RecordingError(path, None, f"not gzip-compressed, though named .gz ({exc})") from None
        except zlib.error as exc:
            raise RecordingError(path, number + 1, f"corrupt gzip data ({exc})") from None


def _cut(path: Path, complete: int, what: str) -> None:
    if complete == 0:
        raise RecordingError(path, 1, f"cut short before the end of its header ({what})")
    message = f"recording cut short ({what}; was its writer killed?): read up to line {complete}"
    warnings.warn(RecordingTruncatedWarning(path, complete + 1, message), stacklevel=5)


def _read(path: Path) -> Iterator[EventBatch | Event]:
    """Batch headers (events empty) and events, as they come; `RecordingError` (path:line) on a bad line."""
    seen_header = seen_batch = False
    for number, text in _lines(path):
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise RecordingError(path, number, f"not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise RecordingError(path, number, "expected a JSON object")
        if number == 1:
            if obj.get("format") != FORMAT or obj.get("version") != VERSION:
                raise RecordingError(
                    path, 1, f"not a {FORMAT} v{VERSION} recording header: {text.strip()[:80]}"
                )
            seen_header = True
            continue
        if obj.get("type") == "batch":
            try:
                yield EventBatch([], str(obj["source"]), int(obj["sequence"]), int(obj["dropped"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise RecordingError(path, number, f"malformed batch line: {exc!r}") from None
            seen_batch = True
            continue
        if not seen_batch:
            raise RecordingError(path, number, "event before any batch line")
        try:
            yield event_from_json(obj)
        except (KeyError, TypeError, ValueError) as exc:
            field = exc.field if isinstance(exc, _FieldError) else None
            raise RecordingError(path, number, f"malformed event: {exc}", field) from None
    if not seen_header:
        raise RecordingError(path, 1, f"empty file: expected a {FORMAT} v{VERSION} header")


def read_batches(path: str | os.PathLike[str]) -> Iterator[EventBatch]:
    """The recorded batches with their events (a batch is yielded once it is complete)."""
    batch: EventBatch | None = None
    for item in _read(Path(path)):
        if isinstance(item, EventBatch):
            if batch is not None:
                yield batch
            batch = item
        else:
            assert batch is not None  # _read guarantees a batch line first
            batch.events.append(item)
    if batch is not None:
        yield batch


def read_events(path: str | os.PathLike[str]) -> Iterator[Event]:
    """The recorded events in order, each as soon as its line is read."""
    for item in _read(Path(path)):
        if not isinstance(item, EventBatch):
            yield item
