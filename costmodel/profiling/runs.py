"""A whole profile run: measure an architecture over the grid, fit and validate the linear model; and the run
file that carries the profile with its settings, validation and measurements, so that it can be refitted."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm_shadow.costmodel.architecture import ModelArchitecture
from vllm_shadow.costmodel.hardware import Hardware
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.costmodel.profile import CostProfile, fit_profile
from vllm_shadow.costmodel.profiling.device import describe_device
from vllm_shadow.costmodel.profiling.grid import batch_grid
from vllm_shadow.costmodel.profiling.model import DTYPES, RandomWeightModel
from vllm_shadow.costmodel.profiling.timing import Measurement, Stopwatch, measure
from vllm_shadow.costmodel.profiling.validation import KindErrors, feature_matrix, kind_errors


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    device: str = "cpu"
    dtype: str = "bfloat16"
    layers: int | None = None  # decoder layers to build; None: min(4, the model's)
    # CPU only. One thread by default: its CPU time is a step's own time even on a shared machine (see
    # Stopwatch); more threads model a multi-threaded CPU engine but need the machine to themselves.
    threads: int = 1
    warmup: int = 2
    repeats: int = 5
    max_batched_tokens: int = 2048
    max_context: int = 4096
    max_decodes: int = 256
    seed: int = 0

    def layers_for(self, arch: ModelArchitecture) -> int:
        return min(4 if self.layers is None else self.layers, arch.num_layers)


@dataclass(frozen=True, slots=True)
class ProfileRun:
    profile: CostProfile
    measurements: tuple[Measurement, ...]
    errors: tuple[KindErrors, ...]
    prior: LinearCostModel | None
    prior_hardware: str | None
    settings: ProfileSettings


def run_profile(
    arch: ModelArchitecture,
    settings: ProfileSettings | None = None,
    *,
    hardware: Hardware | None = None,
    prior: LinearCostModel | None = None,
    command: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> ProfileRun:
    """Measure `arch` on the settings' device, fit the linear model, and validate it and the `prior` (the
    roofline prior of `hardware`, when given) per batch kind. The profile is named after `hardware` when
    given, else after the device."""
    settings = settings or ProfileSettings()
    if settings.dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {settings.dtype!r}; supported: {', '.join(DTYPES)}")
    if settings.threads < 1:
        raise ValueError(f"threads must be at least 1, got {settings.threads}")
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda, but torch sees no CUDA device")
    layers = settings.layers_for(arch)
    settings = replace(settings, layers=layers)  # recorded as resolved
    batches = batch_grid(
        arch,
        max_batched_tokens=settings.max_batched_tokens,
        max_context=settings.max_context,
        max_decodes=settings.max_decodes,
        seed=settings.seed,
    )
    with _cpu_threads(settings.threads if device.type == "cpu" else None):
        clock, device_name = Stopwatch(device).name, describe_device(device)
        model = RandomWeightModel(
            arch, layers, device=device, dtype=DTYPES[settings.dtype], seed=settings.seed
        )
        measurements = measure(
            model,
            batches,
            warmup=settings.warmup,
            repeats=settings.repeats,
            seed=settings.seed,
            progress=progress,
        )
        del model  # free the weights and cache before fitting

    features = feature_matrix([m.batch for m in measurements])
    times = np.array([m.seconds for m in measurements])
    provenance = (
        f"shadow profile: {device_name}, torch {torch.__version__}, {settings.dtype}, "
        f"{layers} of {arch.num_layers} decoder layers built and timed (scaled to {arch.num_layers}), "
        f"{len(measurements)} batch shapes, each the median of {settings.repeats} timed runs after "
        f"{settings.warmup} untimed, {clock}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d}"
        + (f"; command: {command}" if command else "")
    )
    profile = fit_profile(
        features,
        times,
        model=arch.name,
        hardware=hardware.name if hardware else device_name,
        tp=1,
        provenance=provenance,
    )
    errors = kind_errors(measurements, profile.cost, prior)
    return ProfileRun(
        profile, tuple(measurements), tuple(errors), prior, hardware.name if hardware else None, settings
    )


@contextmanager
def _cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set for the block and restored after (it is process-wide)."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def save_profile_run(run: ProfileRun, path: str | Path) -> None:
    """The cost profile `load_profile` reads, with the settings, validation and measurements behind it
    (extra keys, which `load_profile` ignores): the file is its own evidence and can be refitted. One
    measurement a line keeps the file short and its diffs readable."""
    head = run.profile.to_dict() | {
        "settings": asdict(run.settings),
        "prior": None
        if run.prior is None
        else {"hardware": run.prior_hardware, "coefficients": run.prior.to_dict()},
        "validation": [asdict(row) for row in run.errors],
    }
    lines = ",\n".join("    " + json.dumps(m.to_dict(), separators=(",", ":")) for m in run.measurements)
    text = json.dumps(head, indent=2).removesuffix("\n}") + ',\n  "measurements": [\n' + lines + "\n  ]\n}\n"
    Path(path).write_text(text)


def load_measurements(path: str | Path) -> list[Measurement]:
    """The measurements a profile file written by `save_profile_run` carries."""
    return _measurements(json.loads(Path(path).read_text()), path)


def refit_profile_run(
    path: str | Path,
    *,
    prior: LinearCostModel | None = None,
    prior_hardware: str | None = None,
    note: str = "",
) -> ProfileRun:
    """A profile file written by `save_profile_run` (any format version), refitted to the measurements it
    carries without measuring again: for when the cost model's form or its fit changes. Measurements,
    settings, model, hardware and tensor-parallel degree are kept; the provenance keeps how the measurements
    were made and adds that the coefficients were refitted, when, and `note`. The validation is redone
    against `prior` (the file's own prior was fitted in the old form too); None leaves it out."""
    data = json.loads(Path(path).read_text())
    measurements = _measurements(data, path)
    refitted = (
        f"refitted {datetime.datetime.now(datetime.UTC):%Y-%m-%d} to these measurements, not re-measured"
    )
    profile = fit_profile(
        feature_matrix([m.batch for m in measurements]),
        np.array([m.seconds for m in measurements]),
        model=str(data["model"]),
        hardware=str(data["hardware"]),
        tp=int(data["tp"]),
        provenance=f"{data['provenance']}; {refitted}" + (f": {note}" if note else ""),
    )
    errors = kind_errors(measurements, profile.cost, prior)
    settings = ProfileSettings(**data["settings"])
    return ProfileRun(profile, tuple(measurements), tuple(errors), prior, prior_hardware, settings)


def _measurements(data: dict[str, Any], path: str | Path) -> list[Measurement]:
    if "measurements" not in data:
        raise ValueError(f"{path} carries no measurements (not written by `shadow profile`)")
    return [Measurement.from_dict(m) for m in data["measurements"]]
