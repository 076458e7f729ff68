"""A consistent copy of what the shadow knows, taken under its lock: what the exporter, `shadow status` and
the demo's live view read. Plain frozen dataclasses, so a snapshot crosses Ray and becomes JSON as is."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from vllm_shadow.adapters.events import EngineInfo
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.evaluation.recommend import Verdict
from vllm_shadow.evaluation.results import WindowEvaluation
from vllm_shadow.tracking.recompute import RecomputeTax
from vllm_shadow.tracking.sequencing import SequenceStats
from vllm_shadow.tracking.tracker import TrackerStats

# Evaluation wall time buckets (seconds): from a few simulations to a CP-SAT solve at its limit.
EVALUATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(slots=True)
class Histogram:
    bounds: tuple[float, ...] = EVALUATION_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(EVALUATION_BUCKETS) + 1))  # last: +Inf
    total: float = 0.0

    def observe(self, value: float) -> None:
        index = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[index] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs, Prometheus style."""
        out, running = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total)


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    model_name: str
    engine: str
    source: str  # the sender (host:pid of the engine process)
    mode: str  # "steps" (mirror) or "requests" (OTLP spans, stat logger)
    info: EngineInfo
    current: str  # label of the engine's configuration
    current_flags: tuple[str, ...]
    candidates: tuple[str, ...]
    cost_prior: str
    cost: LinearCostModel  # as calibrated now
    cost_error: float  # the calibrator's running relative error
    calibration_steps: int
    tracker: TrackerStats
    sequence: SequenceStats
    live_requests: int
    pending_windows: int
    restarts: int
    ingest_lag_seconds: float
    windows_evaluated: int
    evaluation_skipped: dict[str, int]
    candidate_failures: int
    optimal_failures: int
    evaluation_seconds: Histogram
    last: WindowEvaluation | None
    recent: tuple[
        WindowEvaluation, ...
    ]  # the recommendation's evidence: recent windows, current configuration
    # Sums over evaluated windows (since the configuration last changed): simulated GPU seconds per candidate
    # (the current configuration's self replay included), measured busy time, and the optimal bound.
    simulated_gpu_seconds: dict[str, float]
    actual_gpu_seconds: float
    optimal_bound_gpu_seconds: float  # unconstrained: latency ignored
    verdict: Verdict | None
    # The bound at equal or better latency, summed like the others, and what recompute preemptions cost the
    # engine in the evaluated windows' steps.
    optimal_constrained_bound_gpu_seconds: float = 0.0
    recompute: RecomputeTax = field(default_factory=RecomputeTax)

    @property
    def windows_skipped(self) -> dict[str, int]:
        merged = dict(self.tracker.windows_skipped)
        for reason, n in self.evaluation_skipped.items():
            merged[reason] = merged.get(reason, 0) + n
        return merged


@dataclass(frozen=True, slots=True)
class ShadowSnapshot:
    taken_at: float
    started_at: float
    engines: tuple[EngineSnapshot, ...]
    batches: dict[str, int]  # by transport
    events: dict[str, int]  # by transport
    refused: dict[str, dict[str, int]]  # transport -> reason -> batches refused before decoding
    unattributed_drops: dict[str, int]  # events no engine could be named for, by reason
    queued_windows: int
    in_flight_windows: int
    windows_evaluated: int
    addresses: dict[str, str] = field(default_factory=dict)  # what the service listens on
    sources: int = 0  # senders tracked now (engines: len(engines))
    sources_evicted: int = 0  # senders forgotten after a silence, to make room for new ones
    engines_evicted: int = 0  # engines forgotten after a silence, to make room for new ones


def to_json(value: Any) -> Any:
    """A snapshot (or any part) as JSON values: dataclasses become objects, nan and inf become null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
