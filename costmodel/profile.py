"""Cost profiles: a fitted linear cost model with what it is for and how far to trust it, as a JSON file.

`shadow replay --cost-profile FILE` loads one. The file names its model, hardware and tensor-parallel degree,
so a caller can refuse a profile made for another deployment, and carries the fit's hold-out error, so every
number computed with it can show its uncertainty.

Version 2 added the per-request coefficient e to "coefficients" (see `vllm_shadow.costmodel.linear`). Version 1 files,
whose coefficients are a, b, c and d, still load, with e = 0: the model they were fitted with.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from vllm_shadow.costmodel.file_errors import FieldError, json_text
from vllm_shadow.costmodel.linear import LinearCostModel, cross_validated_mape, fit_linear

FORMAT = "shadow-cost-profile"
VERSION = 2
READABLE_VERSIONS = (1, 2)


class ProfileError(FieldError):
    """A file that is no readable cost profile; the message names the file (if any) and the field."""


def _field(data: Mapping[str, Any], key: str) -> Any:
    if key not in data:
        raise ProfileError(None, key, "missing")
    return data[key]


def _string(data: Mapping[str, Any], key: str) -> str:
    value = _field(data, key)
    if type(value) is not str:
        raise ProfileError(None, key, f"expected a string, got {json_text(value)}")
    return value


def _count(data: Mapping[str, Any], key: str, *, positive: bool) -> int:
    value = _field(data, key)
    # `type(...) is int` because bool is an int subclass.
    if type(value) is not int or value < int(positive):
        kind = "a positive" if positive else "a non-negative"
        raise ProfileError(None, key, f"expected {kind} integer, got {json_text(value)}")
    return value


def _coefficients(data: Mapping[str, Any]) -> LinearCostModel:
    values = _field(data, "coefficients")
    if type(values) is not dict:
        raise ProfileError(None, "coefficients", f"expected a JSON object, got {json_text(values)}")
    for name, value in values.items():
        if type(value) not in (int, float) or not abs(value) < math.inf:  # no float(): ints may be huge
            problem = f"{name} must be a finite number, got {json_text(value)}"
            raise ProfileError(None, "coefficients", problem)
    try:
        return LinearCostModel.from_dict(values)
    except (ValueError, OverflowError) as error:  # unknown or missing keys, a negative or huge value
        raise ProfileError(None, "coefficients", str(error)) from None


@dataclass(frozen=True, slots=True)
class CostProfile:
    model: str
    hardware: str
    tp: int
    cost: LinearCostModel
    holdout_mape: float | None  # cross-validated mean absolute percentage error; None when not measured
    samples: int  # batch timings the coefficients were fitted to
    provenance: str  # where the timings came from: "roofline prior", "vLLM 0.32 on 1xH100, trace X", ...

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "hardware": self.hardware,
            "tp": self.tp,
            "coefficients": self.cost.to_dict(),
            "holdout_mape": self.holdout_mape,
            "samples": self.samples,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostProfile:
        """Raises `ProfileError` (a ValueError naming the field) on anything but a readable profile."""
        if not isinstance(data, Mapping):
            raise ProfileError(None, None, f"expected a JSON object, got {json_text(data)}")
        if data.get("format") != FORMAT or data.get("version") not in READABLE_VERSIONS:
            versions = " or ".join(map(str, READABLE_VERSIONS))
            raise ProfileError(
                None,
                None,
                f"not a {FORMAT} version {versions} file (format={data.get('format')!r}, "
                f"version={data.get('version')!r})",
            )
        cost = _coefficients(data)
        if data["version"] == 1 and "e" in data["coefficients"]:
            raise ProfileError(
                None, "coefficients", f"a {FORMAT} version 1 file has no per-request coefficient e"
            )
        holdout = _field(data, "holdout_mape")
        # A hold-out error is a fraction; the bound keeps float() from overflowing on a huge integer.
        if holdout is not None and (type(holdout) not in (int, float) or not 0 <= holdout < 1e300):
            problem = f"expected a finite number >= 0 or null, got {json_text(holdout)}"
            raise ProfileError(None, "holdout_mape", problem)
        return cls(
            model=_string(data, "model"),
            hardware=_string(data, "hardware"),
            tp=_count(data, "tp", positive=True),
            cost=cost,
            holdout_mape=None if holdout is None else float(holdout),
            samples=_count(data, "samples", positive=False),
            provenance=_string(data, "provenance"),
        )


def fit_profile(
    features: ArrayLike, times: ArrayLike, *, model: str, hardware: str, tp: int, provenance: str
) -> CostProfile:
    """Fit the linear model to measured (T, K, P, R) features and step times (BIC selects which of d and e it
    keeps), and measure its hold-out error."""
    cost = fit_linear(features, times)
    holdout = cross_validated_mape(features, times)
    return CostProfile(model, hardware, tp, cost, holdout, len(np.asarray(times)), provenance)


def save_profile(profile: CostProfile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_dict(), indent=2) + "\n")


def load_profile(path: str | Path) -> CostProfile:
    """The profile in `path`; `ProfileError` naming the file (and field) when it holds none."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise
    except OSError as error:  # a directory, no permission
        raise ProfileError(path, None, f"cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ProfileError(path, None, f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    except ValueError as error:  # JSONDecodeError, and integers too long to convert
        raise ProfileError(path, None, f"not JSON: {error}") from None
    try:
        return CostProfile.from_dict(data)
    except ProfileError as error:
        raise ProfileError(path, error.field, error.problem) from None
