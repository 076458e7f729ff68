"""Timing a step in the device's own time, and measuring a grid of batches with it.

- Timed: from token ids on the device to sampled token ids. Not timed: the engine's scheduling and input
  preparation on the CPU, which online calibration adds through the intercept.
- Eager mode throughout: on a GPU, small decode steps are launch-bound here where vLLM replays CUDA
  graphs, so a GPU profile overstates them (the calibrator corrects that from the engine's own steps).
- Repetitions are median-timed after warm-up runs of the same shape, in the device's own time (CUDA
  events on a GPU; on a CPU, the thread's CPU time when torch runs one thread: see `Stopwatch`), and
  shapes are measured in a shuffled order so that slow drift in the machine's load spreads over the grid
  instead of lining up with one of its axes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vllm_shadow.costmodel.profiling.grid import BatchShape
from vllm_shadow.costmodel.profiling.model import KVCache, RandomWeightModel, StepInputs


@dataclass(frozen=True, slots=True)
class Timing:
    """Per repetition: seconds of the whole forward pass of the built layers, and of the layers alone."""

    total_s: tuple[float, ...]
    layers_s: tuple[float, ...]

    def scaled_s(self, layer_factor: float) -> tuple[float, ...]:
        """Per repetition, the step time of a model with `layer_factor` times the built layers: the layers
        are identical, so each further copy costs what the built ones cost on average."""
        extra = layer_factor - 1.0
        return tuple(
            total + extra * layers for total, layers in zip(self.total_s, self.layers_s, strict=True)
        )


class Stopwatch:
    """Timestamps in the clock that gives the device's own time for a step:
    GPU                   CUDA events: kernels run asynchronously, so a host clock would time launches;
    CPU, one torch thread the thread's CPU time: torch returns when the work is done, and the CPU time
                          leaves out the time other processes hold the core (which doubles wall times on a
                          loaded machine) while keeping the step's own memory stalls and page faults;
    CPU, several threads  wall time, since the other threads' work is not in the caller's CPU time. It
                          needs an idle machine: one descheduled thread stalls every barrier of a parallel
                          kernel (wall times 10-40x the idle ones were seen on a loaded 2-core machine).
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._cpu_time = not self._cuda and torch.get_num_threads() == 1
        self.name = "CUDA events" if self._cuda else "thread CPU time" if self._cpu_time else "wall clock"

    def mark(self) -> Any:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.thread_time() if self._cpu_time else time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3 if self._cuda else end - start

    def synchronize(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()


def time_step(
    model: RandomWeightModel, step: StepInputs, cache: KVCache, *, warmup: int = 2, repeats: int = 5
) -> Timing:
    """Time `repeats` runs of one step after `warmup` untimed ones (kernel selection, allocator and cache
    warm-up happen there)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    clock = Stopwatch(model.device)
    total, layers = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            model.sample(model.forward(step, cache))
        clock.synchronize()
        for _ in range(repeats):
            start = clock.mark()
            hidden = model.embed(step)
            layers_start = clock.mark()
            hidden = model.run_layers(hidden, step, cache)
            layers_end = clock.mark()
            model.sample(model.logits(hidden, step))
            end = clock.mark()
            clock.synchronize()
            total.append(clock.seconds(start, end))
            layers.append(clock.seconds(layers_start, layers_end))
    return Timing(tuple(total), tuple(layers))


@dataclass(frozen=True, slots=True)
class Measurement:
    batch: BatchShape
    seconds: float  # median over repetitions of the step time scaled to the full layer count
    repeats_s: tuple[float, ...]  # each repetition's scaled step time: the spread shows the noise

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.batch.to_runs(),
            "kind": self.batch.kind,
            "seconds": _significant(self.seconds),
            "repeats_s": [_significant(s) for s in self.repeats_s],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        return cls(
            BatchShape.from_runs(data["requests"]),
            float(data["seconds"]),
            tuple(float(s) for s in data["repeats_s"]),
        )


def measure(
    model: RandomWeightModel,
    batches: Sequence[BatchShape],
    *,
    warmup: int = 2,
    repeats: int = 5,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[Measurement]:
    """Step times of `batches` (in their order), scaled from the built layers to the architecture's count.
    One cache of the largest slot count and length serves every batch, so memory stays at the largest
    batch's footprint."""
    if not batches:
        return []
    cache = model.allocate_cache(
        max(len(b.requests) for b in batches), max(new + ctx for b in batches for new, ctx in b.requests)
    )
    factor = model.arch.num_layers / model.layers
    results: list[Measurement | None] = [None] * len(batches)
    for done, i in enumerate(np.random.default_rng(seed).permutation(len(batches)), start=1):
        timing = time_step(model, model.prepare(batches[i]), cache, warmup=warmup, repeats=repeats)
        scaled = timing.scaled_s(factor)
        results[i] = Measurement(batches[i], statistics.median(scaled), scaled)
        if progress is not None:
            progress(done, len(batches))
    return [m for m in results if m is not None]


def _significant(seconds: float) -> float:
    """Six significant digits: a thousand times finer than the run-to-run noise."""
    return float(f"{seconds:.6g}")
