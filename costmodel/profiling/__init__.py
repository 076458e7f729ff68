"""Measured batch step times: a random-weight model built from a Hugging Face config, timed with torch.

`run_profile` builds the model of an architecture with a few of its decoder layers, times its forward pass
over a jittered grid of batch compositions (prefill chunks, decode batches, chunked-prefill mixes; short to
long contexts), scales the times to the full layer count, fits the linear model and reports its hold-out error
per kind of batch, beside the roofline prior's and that of INFERMAX's form without the per-request term (what
that term buys on this device). `refit_profile_run` refits a saved profile to the measurements it carries.

One module per concern:
  grid        the batch compositions timed (`BatchShape`, `batch_grid`);
  model       the random-weight decoder in plain torch and a step's inputs (`RandomWeightModel`);
  timing      a step timed in the device's own time, and a grid measured (`time_step`, `measure`);
  validation  errors per kind of batch, fitted and held out (`kind_errors`);
  runs        a whole run, its file and its refit (`run_profile`, `save_profile_run`, `refit_profile_run`);
  device      the device's name and its hardware-table entry.
torch is an optional dependency (the `profile` extra): importing this package without it raises
ModuleNotFoundError for torch, which `shadow profile` turns into an install hint.
"""

from vllm_shadow.costmodel.profiling.device import describe_device, device_hardware_name, match_hardware_name
from vllm_shadow.costmodel.profiling.grid import (
    BATCH_KINDS,
    DECODE_HEAVY,
    MIXED,
    PREFILL_HEAVY,
    BatchShape,
    batch_grid,
)
from vllm_shadow.costmodel.profiling.model import (
    DECODE_PADDING,
    DECODE_PADDING_KEYS,
    DTYPES,
    KVCache,
    RandomWeightModel,
    StepInputs,
    check_supported,
)
from vllm_shadow.costmodel.profiling.runs import (
    ProfileRun,
    ProfileSettings,
    load_measurements,
    refit_profile_run,
    run_profile,
    save_profile_run,
)
from vllm_shadow.costmodel.profiling.timing import Measurement, Stopwatch, Timing, measure, time_step
from vllm_shadow.costmodel.profiling.validation import (
    KindErrors,
    feature_matrix,
    holdout_errors,
    kind_errors,
)

__all__ = [
    "BATCH_KINDS",
    "DECODE_HEAVY",
    "DECODE_PADDING",
    "DECODE_PADDING_KEYS",
    "DTYPES",
    "MIXED",
    "PREFILL_HEAVY",
    "BatchShape",
    "KVCache",
    "KindErrors",
    "Measurement",
    "ProfileRun",
    "ProfileSettings",
    "RandomWeightModel",
    "StepInputs",
    "Stopwatch",
    "Timing",
    "batch_grid",
    "check_supported",
    "describe_device",
    "device_hardware_name",
    "feature_matrix",
    "holdout_errors",
    "kind_errors",
    "load_measurements",
    "match_hardware_name",
    "measure",
    "refit_profile_run",
    "run_profile",
    "save_profile_run",
    "time_step",
]
