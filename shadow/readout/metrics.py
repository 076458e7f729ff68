"""The shadow's metrics, computed from a snapshot: the families of `metric_table`, filled with its values and
rendered for Prometheus (`exporter`) and for Ray (`ray_metrics`).

A family appears with its first sample, so that a series that has no value yet (no window evaluated, a
non-finite error) is absent rather than NaN; counters by reason carry every reason from the start.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vllm_shadow.evaluation.results import ENGINE_LATENCY, METRICS, OptimalOutcome
from vllm_shadow.readout.metric_table import MetricSpec, spec
from vllm_shadow.readout.snapshot import EngineSnapshot, ShadowSnapshot
from vllm_shadow.tracking.reasons import DropReason, LostRequestReason

QUANTILES = ("0.5", "0.9", "0.99")


@dataclass(frozen=True, slots=True)
class Sample:
    labels: tuple[str, ...]  # values, in the family's label order
    value: float


@dataclass(frozen=True, slots=True)
class HistogramSample:
    labels: tuple[str, ...]
    buckets: tuple[tuple[str, int], ...]  # (le, cumulative count), ending with +Inf
    total: float


@dataclass(slots=True)
class Family:
    spec: MetricSpec
    samples: list[Sample] = field(default_factory=list)
    histograms: list[HistogramSample] = field(default_factory=list)

    def add(self, labels: Iterable[str], value: float) -> None:
        self.samples.append(Sample(tuple(labels), float(value)))

    def add_by_reason(self, labels: tuple[str, ...], counts: Mapping[str, float]) -> None:
        """One sample per reason the table declares, 0 where `counts` has none; a reason missing from the
        table is still exported rather than lost (and the tests catch it)."""
        assert self.spec.reasons is not None, f"{self.spec.name} has no reason label"
        known = [str(reason) for reason in self.spec.reasons]
        for reason in known + sorted(str(r) for r in counts if r not in known):
            self.add((*labels, reason), counts.get(reason, 0))


class _Families:
    def __init__(self) -> None:
        self.by_name: dict[str, Family] = {}

    def __call__(self, name: str) -> Family:
        """The family of `vllm_shadow_<name>`, as the table declares it."""
        family = self.by_name.get(name)
        if family is None:
            family = self.by_name[name] = Family(spec(name))
        return family


def _finite(value: float) -> bool:
    return value is not None and not math.isnan(value) and not math.isinf(value)


def metric_families(snapshot: ShadowSnapshot) -> list[Family]:
    f = _Families()
    f("start_time_seconds").add((), snapshot.started_at)
    received = f("batches_received_total")
    for transport, n in sorted(snapshot.batches.items()):
        received.add((transport,), n)
    events = f("events_received_total")
    for transport, n in sorted(snapshot.events.items()):
        events.add((transport,), n)
    refused = f("batches_refused_total")
    for transport, reasons in sorted(snapshot.refused.items()):
        refused.add_by_reason((transport,), reasons)
    f("events_unattributed_total").add_by_reason((), snapshot.unattributed_drops)
    queue = f("evaluation_windows")
    queue.add(("queued",), snapshot.queued_windows)
    queue.add(("in_flight",), snapshot.in_flight_windows)
    f("tracked_engines").add((), len(snapshot.engines))
    f("tracked_sources").add((), snapshot.sources)
    f("engines_evicted_total").add((), snapshot.engines_evicted)
    f("sources_evicted_total").add((), snapshot.sources_evicted)
    for engine in snapshot.engines:
        _engine_families(f, engine)
    return list(f.by_name.values())


def _engine_families(f: _Families, e: EngineSnapshot) -> None:
    key = (e.model_name, e.engine)
    t = e.tracker
    f("config_info").add(
        (
            *key,
            e.current,
            " ".join(e.current_flags),
            str(e.info.num_kv_blocks),
            str(e.info.block_size),
            e.mode,
        ),
        1,
    )
    f("engine_restarts_total").add(key, e.restarts)
    kinds = f("engine_events_total")
    for kind in ("arrival", "finish", "step", "info"):
        kinds.add((*key, kind), t.events.get(kind, 0))
    f("engine_steps_total").add(key, t.steps)
    f("actual_gpu_seconds_total").add(key, t.actual_gpu_seconds)
    f("requests_arrived_total").add(key, t.requests_arrived)
    f("requests_finished_total").add(key, t.requests_finished)
    f("requests_lost_total").add_by_reason(
        key,
        {
            LostRequestReason.TIMED_OUT: t.requests_timed_out,
            LostRequestReason.ABANDONED: t.requests_abandoned,
            LostRequestReason.REJECTED: t.requests_rejected,
            LostRequestReason.UNKNOWN: t.unknown_requests,
            LostRequestReason.LATE: t.late_requests,
        },
    )
    f("events_dropped_total").add_by_reason(
        key,
        {
            DropReason.SENDER_QUEUE: e.sequence.sender_dropped,
            DropReason.LATE: e.sequence.late_events,
            DropReason.STRAY: e.sequence.stray_events,
        },
    )
    f("batches_lost_total").add(key, e.sequence.lost_batches)
    f("sender_batches_lost_total").add(key, e.sequence.sender_lost_batches)
    f("live_requests").add(key, e.live_requests)
    f("pending_windows").add(key, e.pending_windows)
    if _finite(e.ingest_lag_seconds):
        f("ingest_lag_seconds").add(key, e.ingest_lag_seconds)
    if _finite(e.cost_error):
        f("cost_model_error_ratio").add(key, e.cost_error)
    f("windows_evaluated_total").add(key, e.windows_evaluated)
    f("windows_skipped_total").add_by_reason(key, e.windows_skipped)
    failures = f("evaluation_failures_total")
    failures.add((*key, "candidate"), e.candidate_failures)
    failures.add((*key, "optimal"), e.optimal_failures)
    histogram = f("evaluation_seconds")
    histogram.histograms.append(
        HistogramSample(key, tuple(e.evaluation_seconds.cumulative()), e.evaluation_seconds.total)
    )
    simulated = f("simulated_gpu_seconds_total")
    for label, seconds in sorted(e.simulated_gpu_seconds.items()):
        simulated.add((*key, label), seconds)
    f("evaluated_gpu_seconds_total").add(key, e.actual_gpu_seconds)
    f("optimal_bound_gpu_seconds_total").add(key, e.optimal_bound_gpu_seconds)
    f("optimal_constrained_bound_gpu_seconds_total").add(key, e.optimal_constrained_bound_gpu_seconds)
    f("recompute_gpu_seconds_total").add(key, e.recompute.gpu_seconds)
    f("recomputed_tokens_total").add(key, e.recompute.recomputed_tokens)
    f("preemptions_total").add(key, e.recompute.preemptions)
    if e.last is not None:
        _window_families(f, e, key)
    _recommendation_families(f, e, key)


def _window_families(f: _Families, e: EngineSnapshot, key: tuple[str, str]) -> None:
    w = e.last
    assert w is not None
    fid = w.fidelity
    f("window_requests").add(key, w.requests)
    f("window_actual_gpu_seconds").add(key, w.actual_gpu_seconds)
    simulated = f("window_simulated_gpu_seconds")
    gap = f("window_gap_ratio")
    ttft = f("window_ttft_seconds")
    tpot = f("window_tpot_seconds")
    slo = f("window_slo_attainment_ratio")
    for outcome in w.outcomes():
        labels = (*key, outcome.label)
        if _finite(outcome.gpu_seconds):
            simulated.add(labels, outcome.gpu_seconds)
        for metric in METRICS:
            value = w.gap(outcome.label, metric)
            if _finite(value):
                gap.add((*labels, metric), value)
        if outcome.latency is not None:
            for family, values in ((ttft, outcome.latency.ttft), (tpot, outcome.latency.tpot)):
                for q, v in zip(QUANTILES, values, strict=True):
                    if _finite(v):
                        family.add((*labels, q), v)
            if _finite(outcome.latency.slo_attainment):
                slo.add(labels, outcome.latency.slo_attainment)
    observed_ttft = f("window_observed_ttft_seconds")
    observed_tpot = f("window_observed_tpot_seconds")
    for family, values in ((observed_ttft, fid.actual.ttft), (observed_tpot, fid.actual.tpot)):
        for q, v in zip(QUANTILES, values, strict=True):
            if _finite(v):
                family.add((*key, q), v)
    if _finite(fid.actual.slo_attainment):
        f("window_observed_slo_attainment_ratio").add(key, fid.actual.slo_attainment)
    if fid.steps_compared:
        f("self_replay_step_match_ratio").add(key, fid.step_match_ratio)
    if _finite(fid.gpu_error_ratio):
        f("self_replay_gpu_error_ratio").add(key, fid.gpu_error_ratio)
    latency_error = f("self_replay_latency_error_ratio")
    for metric, value in (("ttft", fid.ttft_error_ratio), ("e2e", fid.e2e_error_ratio)):
        if _finite(value):
            latency_error.add((*key, metric), value)
    if w.constrained is not None:
        latency = (*key, latency_label(w.constrained))
        f("window_optimal_constrained_bound_gpu_seconds").add(latency, w.constrained.bound_gpu_seconds)
        if _finite(w.constrained_gap):
            f("window_optimal_constrained_gap_ratio").add(latency, w.constrained_gap)
    f("window_recompute_gpu_seconds").add(key, w.recompute.gpu_seconds)
    f("window_recomputed_tokens").add(key, w.recompute.recomputed_tokens)
    recomputed = f("window_simulated_recomputed_tokens")
    recompute_seconds = f("window_simulated_recompute_gpu_seconds")
    hit_ratio = f("window_simulated_prefix_cache_hit_ratio")
    for outcome in w.outcomes():
        if not outcome.error:
            recomputed.add((*key, outcome.label), outcome.recomputed_tokens)
            recompute_seconds.add((*key, outcome.label), outcome.recompute_gpu_seconds)
            if outcome.prefix_cache_queries:
                hit_ratio.add((*key, outcome.label), outcome.prefix_cache_hits / outcome.prefix_cache_queries)
    if w.optimal is not None:
        f("window_optimal_bound_gpu_seconds").add(key, w.optimal.bound_gpu_seconds)
        if _finite(w.optimal.best_gpu_seconds):
            f("window_optimal_gpu_seconds").add(key, w.optimal.best_gpu_seconds)
        if _finite(w.optimal_gap):
            f("window_optimal_gap_ratio").add(key, w.optimal_gap)


def latency_label(outcome: OptimalOutcome) -> str:
    """The `latency` label of a constrained bound: "engine" (no request later than under the engine's
    configuration) or "slo" (within the SLO, or no later than the configuration where it missed)."""
    return "engine" if outcome.latency == ENGINE_LATENCY else "slo"


def _recommendation_families(f: _Families, e: EngineSnapshot, key: tuple[str, str]) -> None:
    recommendation = e.verdict.recommendation if e.verdict is not None else None
    f("recommendation_available").add(key, recommendation is not None)
    if recommendation is None:
        return
    f("recommendation_info").add(
        (
            *key,
            recommendation.candidate,
            " ".join(recommendation.flags),
            recommendation.objective,
            recommendation.confidence,
        ),
        1,
    )
    f("recommendation_expected_gain_ratio").add(key, recommendation.expected_gain)
    f("recommendation_gain_stderr_ratio").add(key, recommendation.gain_stderr)
    f("recommendation_windows").add(key, recommendation.windows)
    f("recommendation_replay_error_ratio").add(key, recommendation.replay_error)
