"""The shadow's metrics, computed from a snapshot: one definition, rendered for Prometheus and for Ray.

Naming follows Prometheus practice and vLLM's labels (see the observability notes): the prefix `vllm_shadow_`
(vLLM's own `vllm:` fails `promtool check metrics`), base units with plural suffixes, `_total` on counters,
`_ratio` for 0-1 values, and the labels `model_name` and `engine` so that a dashboard can join the shadow's
series with vLLM's `on(model_name, engine)`. Other labels take values from small fixed sets (`reason`,
`objective`, `quantile`, ...) or from the bounded candidate grid (`candidate`). Configuration and the
recommendation are `_info` series fixed at 1 whose labels carry the settings.

Per-window gauges describe the last evaluated window; the `_total` counters sum over evaluated windows, so
that a rate() over any range is a gap over that range.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from vllm_shadow.evaluation.results import METRICS
from vllm_shadow.readout.snapshot import EngineSnapshot, ShadowSnapshot

PREFIX = "vllm_shadow_"
ENGINE_LABELS = ("model_name", "engine")
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
    name: str  # without the `_total` or `_info` suffix, which each renderer adds its own way
    kind: str  # counter, gauge, histogram, info
    doc: str
    label_names: tuple[str, ...]
    samples: list[Sample] = field(default_factory=list)
    histograms: list[HistogramSample] = field(default_factory=list)

    def add(self, labels: Iterable[str], value: float) -> None:
        self.samples.append(Sample(tuple(labels), float(value)))


class _Families:
    def __init__(self) -> None:
        self.by_name: dict[str, Family] = {}

    def __call__(self, name: str, kind: str, doc: str, *labels: str) -> Family:
        family = self.by_name.get(name)
        if family is None:
            family = self.by_name[name] = Family(PREFIX + name, kind, doc, labels)
        return family


def _finite(value: float) -> bool:
    return value is not None and not math.isnan(value) and not math.isinf(value)


def metric_families(snapshot: ShadowSnapshot) -> list[Family]:
    f = _Families()
    f("start_time_seconds", "gauge", "When the shadow started (Unix time).").add((), snapshot.started_at)
    received = f("batches_received_total", "counter", "Event batches received, by transport.", "transport")
    for transport, n in sorted(snapshot.batches.items()):
        received.add((transport,), n)
    events = f("events_received_total", "counter", "Events received, by transport.", "transport")
    for transport, n in sorted(snapshot.events.items()):
        events.add((transport,), n)
    refused = f(
        "batches_refused_total",
        "counter",
        "Batches refused before decoding (malformed, oversized, unauthenticated, failing sink).",
        "transport",
        "reason",
    )
    for transport, reasons in sorted(snapshot.refused.items()):
        for reason, n in sorted(reasons.items()):
            refused.add((transport, reason), n)
    unattributed = f(
        "events_unattributed_total",
        "counter",
        "Events no engine could be named for (no engine announcement, or a second sender for a mirrored engine).",
        "reason",
    )
    for reason, n in sorted(snapshot.unattributed_drops.items()):
        unattributed.add((reason,), n)
    queue = f("evaluation_windows", "gauge", "Windows waiting for evaluation or being evaluated.", "state")
    queue.add(("queued",), snapshot.queued_windows)
    queue.add(("in_flight",), snapshot.in_flight_windows)
    for engine in snapshot.engines:
        _engine_families(f, engine)
    return list(f.by_name.values())


def _engine_families(f: _Families, e: EngineSnapshot) -> None:
    key = (e.model_name, e.engine)
    t = e.tracker
    f(
        "config_info",
        "info",
        "The engine's scheduler configuration as the shadow models it.",
        *ENGINE_LABELS,
        "candidate",
        "flags",
        "num_kv_blocks",
        "block_size",
        "mode",
    ).add(
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
    f("engine_restarts_total", "counter", "Times the engine was seen to restart.", *ENGINE_LABELS).add(
        key, e.restarts
    )
    kinds = f("engine_events_total", "counter", "Events applied, by kind.", *ENGINE_LABELS, "kind")
    for kind in ("arrival", "finish", "step", "info"):
        kinds.add((*key, kind), t.events.get(kind, 0))
    f("engine_steps_total", "counter", "Non-empty engine steps mirrored.", *ENGINE_LABELS).add(key, t.steps)
    f(
        "actual_gpu_seconds_total",
        "counter",
        "The engine's measured busy time (sum of step times).",
        *ENGINE_LABELS,
    ).add(key, t.actual_gpu_seconds)
    f("requests_arrived_total", "counter", "Requests that arrived.", *ENGINE_LABELS).add(
        key, t.requests_arrived
    )
    f("requests_finished_total", "counter", "Requests seen to finish.", *ENGINE_LABELS).add(
        key, t.requests_finished
    )
    lost = f(
        "requests_lost_total",
        "counter",
        "Requests whose outcome the shadow does not know, by reason.",
        *ENGINE_LABELS,
        "reason",
    )
    for reason, n in (
        ("timed_out", t.requests_timed_out),
        ("abandoned", t.requests_abandoned),
        ("rejected", t.requests_rejected),
        ("unknown", t.unknown_requests),
        ("late", t.late_requests),
    ):
        lost.add((*key, reason), n)
    dropped = f(
        "events_dropped_total",
        "counter",
        "Events lost on the way, by reason: dropped by the sender's full queue, or arriving too late to apply.",
        *ENGINE_LABELS,
        "reason",
    )
    dropped.add((*key, "sender_queue"), e.sequence.sender_dropped)
    dropped.add((*key, "late"), e.sequence.late_events)
    f(
        "batches_lost_total",
        "counter",
        "Batches that never arrived (gaps in the sender's numbering).",
        *ENGINE_LABELS,
    ).add(key, e.sequence.lost_batches)
    f("live_requests", "gauge", "Requests in the engine now, as mirrored.", *ENGINE_LABELS).add(
        key, e.live_requests
    )
    f(
        "pending_windows", "gauge", "Windows open or waiting for their requests to finish.", *ENGINE_LABELS
    ).add(key, e.pending_windows)
    if _finite(e.ingest_lag_seconds):
        f(
            "ingest_lag_seconds",
            "gauge",
            "Shadow clock minus the end of the last step received.",
            *ENGINE_LABELS,
        ).add(key, e.ingest_lag_seconds)
    if _finite(e.cost_error):
        f(
            "cost_model_error_ratio",
            "gauge",
            "Running relative error of the calibrated cost model on steps it had not seen.",
            *ENGINE_LABELS,
        ).add(key, e.cost_error)
    f("windows_evaluated_total", "counter", "Windows evaluated.", *ENGINE_LABELS).add(
        key, e.windows_evaluated
    )
    skipped = f(
        "windows_skipped_total", "counter", "Windows not evaluated, by reason.", *ENGINE_LABELS, "reason"
    )
    for reason, n in sorted(e.windows_skipped.items()):
        skipped.add((*key, reason), n)
    failures = f(
        "evaluation_failures_total",
        "counter",
        "Simulations or optimal solves that failed inside evaluated windows.",
        *ENGINE_LABELS,
        "part",
    )
    failures.add((*key, "candidate"), e.candidate_failures)
    failures.add((*key, "optimal"), e.optimal_failures)
    histogram = f(
        "evaluation_seconds", "histogram", "Wall time to evaluate a window, all tasks.", *ENGINE_LABELS
    )
    histogram.histograms.append(
        HistogramSample(key, tuple(e.evaluation_seconds.cumulative()), e.evaluation_seconds.total)
    )
    simulated = f(
        "simulated_gpu_seconds_total",
        "counter",
        "Simulated busy time over evaluated windows, per configuration (the current one is the self replay).",
        *ENGINE_LABELS,
        "candidate",
    )
    for label, seconds in sorted(e.simulated_gpu_seconds.items()):
        simulated.add((*key, label), seconds)
    f(
        "evaluated_gpu_seconds_total",
        "counter",
        "Measured busy time over the evaluated windows' own steps.",
        *ENGINE_LABELS,
    ).add(key, e.actual_gpu_seconds)
    f(
        "optimal_bound_gpu_seconds_total",
        "counter",
        "Lower bound on the busy time of any schedule, summed over evaluated windows.",
        *ENGINE_LABELS,
    ).add(key, e.optimal_bound_gpu_seconds)
    if e.last is not None:
        _window_families(f, e, key)
    _recommendation_families(f, e, key)


def _window_families(f: _Families, e: EngineSnapshot, key: tuple[str, str]) -> None:
    w = e.last
    assert w is not None
    fid = w.fidelity
    f("window_requests", "gauge", "Requests that arrived in the last evaluated window.", *ENGINE_LABELS).add(
        key, w.requests
    )
    f(
        "window_actual_gpu_seconds",
        "gauge",
        "Measured busy time while the last window was open.",
        *ENGINE_LABELS,
    ).add(key, w.actual_gpu_seconds)
    simulated = f(
        "window_simulated_gpu_seconds",
        "gauge",
        "Simulated busy time to serve the last window, per configuration.",
        *ENGINE_LABELS,
        "candidate",
    )
    gap = f(
        "window_gap_ratio",
        "gauge",
        "(current - candidate) / current on the last window; positive means the candidate is better.",
        *ENGINE_LABELS,
        "candidate",
        "objective",
    )
    ttft = f(
        "window_ttft_seconds",
        "gauge",
        "Simulated TTFT quantiles, last window.",
        *ENGINE_LABELS,
        "candidate",
        "quantile",
    )
    tpot = f(
        "window_tpot_seconds",
        "gauge",
        "Simulated TPOT quantiles, last window.",
        *ENGINE_LABELS,
        "candidate",
        "quantile",
    )
    slo = f(
        "window_slo_attainment_ratio",
        "gauge",
        "Share of the last window's requests meeting the SLO, simulated per configuration.",
        *ENGINE_LABELS,
        "candidate",
    )
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
    observed_ttft = f(
        "window_observed_ttft_seconds",
        "gauge",
        "TTFT quantiles the engine delivered, last window.",
        *ENGINE_LABELS,
        "quantile",
    )
    observed_tpot = f(
        "window_observed_tpot_seconds",
        "gauge",
        "TPOT quantiles the engine delivered, last window.",
        *ENGINE_LABELS,
        "quantile",
    )
    for family, values in ((observed_ttft, fid.actual.ttft), (observed_tpot, fid.actual.tpot)):
        for q, v in zip(QUANTILES, values, strict=True):
            if _finite(v):
                family.add((*key, q), v)
    if _finite(fid.actual.slo_attainment):
        f(
            "window_observed_slo_attainment_ratio",
            "gauge",
            "Share of the last window's requests that met the SLO on the engine.",
            *ENGINE_LABELS,
        ).add(key, fid.actual.slo_attainment)
    if fid.steps_compared:
        f(
            "self_replay_step_match_ratio",
            "gauge",
            "Share of the last window's engine steps the self replay reproduced exactly.",
            *ENGINE_LABELS,
        ).add(key, fid.step_match_ratio)
    if _finite(fid.gpu_error_ratio):
        f(
            "self_replay_gpu_error_ratio",
            "gauge",
            "Relative error of the self replay's busy time over the last window's steps.",
            *ENGINE_LABELS,
        ).add(key, fid.gpu_error_ratio)
    latency_error = f(
        "self_replay_latency_error_ratio",
        "gauge",
        "Median per-request relative latency error of the self replay, last window.",
        *ENGINE_LABELS,
        "metric",
    )
    for metric, value in (("ttft", fid.ttft_error_ratio), ("e2e", fid.e2e_error_ratio)):
        if _finite(value):
            latency_error.add((*key, metric), value)
    if w.optimal is not None:
        f(
            "window_optimal_bound_gpu_seconds",
            "gauge",
            "Lower bound on any schedule's busy time for the last window.",
            *ENGINE_LABELS,
        ).add(key, w.optimal.bound_gpu_seconds)
        if _finite(w.optimal.best_gpu_seconds):
            f(
                "window_optimal_gpu_seconds",
                "gauge",
                "Busy time of the best schedule the optimal solver found for the last window.",
                *ENGINE_LABELS,
            ).add(key, w.optimal.best_gpu_seconds)
        if _finite(w.optimal_gap):
            f(
                "window_optimal_gap_ratio",
                "gauge",
                "(current - optimal bound) / current: the most any scheduler could have saved, last window.",
                *ENGINE_LABELS,
            ).add(key, w.optimal_gap)


def _recommendation_families(f: _Families, e: EngineSnapshot, key: tuple[str, str]) -> None:
    recommendation = e.verdict.recommendation if e.verdict is not None else None
    f(
        "recommendation_available",
        "gauge",
        "1 when the shadow recommends a configuration change for the engine.",
        *ENGINE_LABELS,
    ).add(key, recommendation is not None)
    if recommendation is None:
        return
    f(
        "recommendation_info",
        "info",
        "The recommended configuration: the vLLM flags to change, the objective, the confidence.",
        *ENGINE_LABELS,
        "candidate",
        "flags",
        "objective",
        "confidence",
    ).add(
        (
            *key,
            recommendation.candidate,
            " ".join(recommendation.flags),
            recommendation.objective,
            recommendation.confidence,
        ),
        1,
    )
    f(
        "recommendation_expected_gain_ratio",
        "gauge",
        "Mean relative gain of the recommendation.",
        *ENGINE_LABELS,
    ).add(key, recommendation.expected_gain)
    f(
        "recommendation_gain_stderr_ratio",
        "gauge",
        "Standard error of that gain over windows.",
        *ENGINE_LABELS,
    ).add(key, recommendation.gain_stderr)
    f(
        "recommendation_windows", "gauge", "Windows of evidence behind the recommendation.", *ENGINE_LABELS
    ).add(key, recommendation.windows)
    f(
        "recommendation_replay_error_ratio",
        "gauge",
        "The self replay's error the recommendation's gain had to exceed.",
        *ENGINE_LABELS,
    ).add(key, recommendation.replay_error)
