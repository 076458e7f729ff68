"""A snapshot back from its JSON form (`snapshot.to_json`): how `shadow status` reads what a running shadow
publishes without joining its Ray cluster.

The decoding follows the dataclasses' own type hints, so a field added to a snapshot type needs no change here.
JSON has no NaN: `to_json` writes a non-finite float as null, and null comes back as NaN where a float is due.
Only JSON is read, never pickle: the data comes from another process.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections import Counter
from functools import cache
from typing import Any, TypeVar

from vllm_shadow.readout.snapshot import ShadowSnapshot

T = TypeVar("T")


class SnapshotFormatError(ValueError):
    """The JSON does not have the shape of a snapshot."""


def snapshot_from_json(value: Any) -> ShadowSnapshot:
    return _decode(ShadowSnapshot, value, "snapshot")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode(kind: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value, where)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise SnapshotFormatError(f"{where}: expected an object, got {type(value).__name__}")
        hints = _hints(kind)
        return kind(
            **{
                f.name: _decode(hints[f.name], value[f.name], f"{where}.{f.name}")
                for f in dataclasses.fields(kind)
                if f.name in value
            }
        )
    if kind is float:
        return math.nan if value is None else float(value)
    if kind in (int, str, bool):
        if not isinstance(value, kind):
            raise SnapshotFormatError(f"{where}: expected {kind.__name__}, got {type(value).__name__}")
        return value
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v, f"{where}[]") for v in value)
        return tuple(_decode(a, v, f"{where}[]") for a, v in zip(args, value, strict=True))
    if origin is list:
        return [_decode(args[0], v, f"{where}[]") for v in value]
    if origin is Counter:  # Counter[K]: the counts are ints
        return Counter({k: _decode(int, v, f"{where}.{k}") for k, v in value.items()})
    if origin is dict:
        return {k: _decode(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if kind is dict or kind is typing.Any:
        return value  # free-form (a model's config.json)
    raise SnapshotFormatError(f"{where}: cannot decode a {kind!r}")
