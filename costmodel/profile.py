"""Cost profiles: a fitted linear cost model with what it is for and how far to trust it, as a JSON file.

`shadow replay --cost-profile FILE` loads one. The file names its model, hardware and tensor-parallel degree,
so a caller can refuse a profile made for another deployment, and carries the fit's hold-out error, so every
number computed with it can show its uncertainty.

Version 2 added the per-request coefficient e to "coefficients" (see `vllm_shadow.costmodel.linear`). Version 1 files,
whose coefficients are a, b, c and d, still load, with e = 0: the model they were fitted with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from vllm_shadow.costmodel.linear import LinearCostModel, cross_validated_mape, fit_linear

FORMAT = "shadow-cost-profile"
VERSION = 2
READABLE_VERSIONS = (1, 2)


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
        if data.get("format") != FORMAT or data.get("version") not in READABLE_VERSIONS:
            versions = " or ".join(map(str, READABLE_VERSIONS))
            raise ValueError(
                f"not a {FORMAT} version {versions} file (format={data.get('format')!r}, "
                f"version={data.get('version')!r})"
            )
        if data["version"] == 1 and "e" in data["coefficients"]:
            raise ValueError(f"a {FORMAT} version 1 file has no per-request coefficient e")
        holdout = data["holdout_mape"]
        return cls(
            model=str(data["model"]),
            hardware=str(data["hardware"]),
            tp=int(data["tp"]),
            cost=LinearCostModel.from_dict(data["coefficients"]),
            holdout_mape=None if holdout is None else float(holdout),
            samples=int(data["samples"]),
            provenance=str(data["provenance"]),
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
    return CostProfile.from_dict(json.loads(Path(path).read_text()))
