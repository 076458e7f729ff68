"""Every metric the shadow exports, declared once: name, type, help and labels.

The Prometheus exporter and the Ray mirror render the families `vllm_shadow.readout.metrics` fills from this
table, and the dashboard and rule generators (deploy/) name only series it declares (a test checks every name
they use). A `reason` label's values are one enum of `vllm_shadow.tracking.reasons`, and every value is
exported, 0 until it is first counted.

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

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from vllm_shadow.tracking.reasons import (
    DropReason,
    LostRequestReason,
    RefusalReason,
    SkipReason,
    UnattributedReason,
)

PREFIX = "vllm_shadow_"
RAY_PREFIX = "ray_"  # what Ray's metrics agent puts before every name it exports
ENGINE_LABELS = ("model_name", "engine")
Kind = Literal["counter", "gauge", "histogram", "info"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # the full name: the prefix, and `_total` on counters and `_info` on info series
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    reasons: type[StrEnum] | None = None  # the values of the `reason` label, all of them exported

    @property
    def prometheus_series(self) -> tuple[str, ...]:
        """The sample names of this metric in the exporter's text format."""
        if self.kind == "histogram":
            return tuple(f"{self.name}_{part}" for part in ("bucket", "sum", "count"))
        return (self.name,)

    @property
    def ray_metrics(self) -> tuple[str, ...]:
        """The names the Ray mirror registers with `ray.util.metrics`. Ray counters take increments and Ray
        histograms observations, so a histogram is two counters: its observations (`x_seconds` becomes `xs`)
        and their total (`x_seconds`)."""
        if self.kind == "histogram":
            return (self.name.removesuffix("_seconds") + "s", self.name)
        return (self.name.removesuffix("_total"),)

    @property
    def ray_series(self) -> tuple[str, ...]:
        """The sample names as Ray's metrics agent exports them: its prefix, and `_total` on counters."""
        if self.kind in ("counter", "histogram"):
            return tuple(f"{RAY_PREFIX}{name}_total" for name in self.ray_metrics)
        return tuple(RAY_PREFIX + name for name in self.ray_metrics)


def _engine(
    name: str, kind: Kind, help: str, *labels: str, reasons: type[StrEnum] | None = None
) -> MetricSpec:
    """A per-engine metric: `model_name` and `engine` first, as in vLLM's own series."""
    return MetricSpec(PREFIX + name, kind, help, (*ENGINE_LABELS, *labels), reasons)


def _shadow(
    name: str, kind: Kind, help: str, *labels: str, reasons: type[StrEnum] | None = None
) -> MetricSpec:
    """A shadow-wide metric (no engine labels)."""
    return MetricSpec(PREFIX + name, kind, help, labels, reasons)


METRICS: tuple[MetricSpec, ...] = (
    # ---- the shadow itself -----------------------------------------------------------------------------------
    _shadow("start_time_seconds", "gauge", "When the shadow started (Unix time)."),
    _shadow("batches_received_total", "counter", "Event batches received, by transport.", "transport"),
    _shadow("events_received_total", "counter", "Events received, by transport.", "transport"),
    _shadow(
        "batches_refused_total",
        "counter",
        "Batches refused before decoding (malformed, oversized, unauthenticated, failing sink).",
        "transport",
        "reason",
        reasons=RefusalReason,
    ),
    _shadow(
        "events_unattributed_total",
        "counter",
        "Events no engine could be named for (no engine announcement, a second sender for a mirrored engine, "
        "or no room for a new sender or engine).",
        "reason",
        reasons=UnattributedReason,
    ),
    _shadow("evaluation_windows", "gauge", "Windows waiting for evaluation or being evaluated.", "state"),
    _shadow("tracked_engines", "gauge", "Engines tracked now (at most the shadow's max_engines)."),
    _shadow("tracked_sources", "gauge", "Senders tracked now (at most the shadow's max_sources)."),
    _shadow(
        "engines_evicted_total",
        "counter",
        "Engines forgotten after a silence to make room for a new one (beyond max_engines).",
    ),
    _shadow(
        "sources_evicted_total",
        "counter",
        "Senders forgotten after a silence to make room for a new one (beyond max_sources).",
    ),
    # ---- per engine: ingest and tracking ---------------------------------------------------------------------
    _engine(
        "config_info",
        "info",
        "The engine's scheduler configuration as the shadow models it.",
        "candidate",
        "flags",
        "num_kv_blocks",
        "block_size",
        "mode",
    ),
    _engine("engine_restarts_total", "counter", "Times the engine was seen to restart."),
    _engine("engine_events_total", "counter", "Events applied, by kind.", "kind"),
    _engine("engine_steps_total", "counter", "Non-empty engine steps mirrored."),
    _engine("actual_gpu_seconds_total", "counter", "The engine's measured busy time (sum of step times)."),
    _engine("requests_arrived_total", "counter", "Requests that arrived."),
    _engine("requests_finished_total", "counter", "Requests seen to finish."),
    _engine(
        "requests_lost_total",
        "counter",
        "Requests whose outcome the shadow does not know, by reason.",
        "reason",
        reasons=LostRequestReason,
    ),
    _engine(
        "events_dropped_total",
        "counter",
        "Events lost on the way, by reason: dropped by the sender's full queue, arriving too late to apply, or "
        "in a batch whose sequence number was too far from the sender's stream.",
        "reason",
        reasons=DropReason,
    ),
    _engine("batches_lost_total", "counter", "Batches that never arrived (gaps in the sender's numbering)."),
    _engine(
        "sender_batches_lost_total",
        "counter",
        "Batches the engine's sender could not deliver here (failed, or skipped while backing off, as while the "
        "shadow was down), by the sender's own count, summed over its restarts.",
    ),
    _engine("live_requests", "gauge", "Requests in the engine now, as mirrored."),
    _engine("pending_windows", "gauge", "Windows open or waiting for their requests to finish."),
    _engine("ingest_lag_seconds", "gauge", "Shadow clock minus the end of the last step received."),
    _engine(
        "cost_model_error_ratio",
        "gauge",
        "Running relative error of the calibrated cost model on steps it had not seen.",
    ),
    # ---- per engine: evaluation, summed over windows -----------------------------------------------------------
    _engine("windows_evaluated_total", "counter", "Windows evaluated."),
    _engine(
        "windows_skipped_total", "counter", "Windows not evaluated, by reason.", "reason", reasons=SkipReason
    ),
    _engine(
        "evaluation_failures_total",
        "counter",
        "Simulations or optimal solves that failed inside evaluated windows.",
        "part",
    ),
    _engine("evaluation_seconds", "histogram", "Wall time to evaluate a window, all tasks."),
    _engine(
        "simulated_gpu_seconds_total",
        "counter",
        "Simulated busy time over evaluated windows, per configuration (the current one is the self replay).",
        "candidate",
    ),
    _engine(
        "evaluated_gpu_seconds_total", "counter", "Measured busy time over the evaluated windows' own steps."
    ),
    _engine(
        "optimal_bound_gpu_seconds_total",
        "counter",
        "Unconstrained (latency ignored) lower bound on the busy time of any schedule, summed over evaluated "
        "windows.",
    ),
    _engine(
        "optimal_constrained_bound_gpu_seconds_total",
        "counter",
        "Lower bound on the busy time of any schedule serving every request at equal or better latency (latency "
        "'engine': no later than the engine's configuration; 'slo': within the SLO, or no later than the "
        "configuration where it missed; as the window gauges' latency label says), summed over evaluated "
        "windows: the headline bound.",
    ),
    _engine(
        "recompute_gpu_seconds_total",
        "counter",
        "Busy time the engine spent computing again the KV its recompute preemptions dropped (the recompute "
        "tax, priced with the calibrated cost model), over the evaluated windows' own steps.",
    ),
    _engine(
        "recomputed_tokens_total",
        "counter",
        "Tokens the engine computed again after recompute preemptions, over the evaluated windows' own steps.",
    ),
    _engine("preemptions_total", "counter", "Recompute preemptions in the evaluated windows' own steps."),
    # ---- per engine: the last evaluated window -----------------------------------------------------------------
    _engine("window_requests", "gauge", "Requests that arrived in the last evaluated window."),
    _engine("window_actual_gpu_seconds", "gauge", "Measured busy time while the last window was open."),
    _engine(
        "window_simulated_gpu_seconds",
        "gauge",
        "Simulated busy time to serve the last window, per configuration.",
        "candidate",
    ),
    _engine(
        "window_gap_ratio",
        "gauge",
        "(current - candidate) / current on the last window; positive means the candidate is better.",
        "candidate",
        "objective",
    ),
    _engine(
        "window_ttft_seconds", "gauge", "Simulated TTFT quantiles, last window.", "candidate", "quantile"
    ),
    _engine(
        "window_tpot_seconds", "gauge", "Simulated TPOT quantiles, last window.", "candidate", "quantile"
    ),
    _engine(
        "window_slo_attainment_ratio",
        "gauge",
        "Share of the last window's requests meeting the SLO, simulated per configuration.",
        "candidate",
    ),
    _engine(
        "window_observed_ttft_seconds",
        "gauge",
        "TTFT quantiles the engine delivered, last window.",
        "quantile",
    ),
    _engine(
        "window_observed_tpot_seconds",
        "gauge",
        "TPOT quantiles the engine delivered, last window.",
        "quantile",
    ),
    _engine(
        "window_observed_slo_attainment_ratio",
        "gauge",
        "Share of the last window's requests that met the SLO on the engine.",
    ),
    _engine(
        "self_replay_step_match_ratio",
        "gauge",
        "Share of the last window's engine steps the self replay reproduced exactly.",
    ),
    _engine(
        "self_replay_gpu_error_ratio",
        "gauge",
        "Relative error of the self replay's busy time over the last window's steps.",
    ),
    _engine(
        "self_replay_latency_error_ratio",
        "gauge",
        "Median per-request relative latency error of the self replay, last window.",
        "metric",
    ),
    _engine(
        "window_optimal_constrained_gap_ratio",
        "gauge",
        "The headline: (current - constrained bound) / current, the most any scheduler could have saved on the "
        "last window while serving every request at equal or better latency.",
        "latency",
    ),
    _engine(
        "window_optimal_constrained_bound_gpu_seconds",
        "gauge",
        "Lower bound on the busy time of any schedule serving the last window at equal or better latency.",
        "latency",
    ),
    _engine(
        "window_optimal_bound_gpu_seconds",
        "gauge",
        "Unconstrained (latency ignored) lower bound on any schedule's busy time for the last window.",
    ),
    _engine(
        "window_optimal_gpu_seconds",
        "gauge",
        "Busy time of the best schedule the optimal solver found for the last window, latency ignored.",
    ),
    _engine(
        "window_optimal_gap_ratio",
        "gauge",
        "Unconstrained: (current - optimal bound) / current, the most any scheduler could have saved on the last "
        "window however late it served the requests.",
    ),
    _engine(
        "window_recompute_gpu_seconds",
        "gauge",
        "Busy time the engine spent recomputing preempted requests' KV in the last window's steps.",
    ),
    _engine(
        "window_recomputed_tokens",
        "gauge",
        "Tokens the engine computed again after recompute preemptions in the last window's steps.",
    ),
    _engine(
        "window_simulated_recomputed_tokens",
        "gauge",
        "Tokens each configuration would have computed again after its preemptions, last window (simulated; "
        "requests preempted before the window are not counted).",
        "candidate",
    ),
    _engine(
        "window_simulated_recompute_gpu_seconds",
        "gauge",
        "Busy time each configuration would have spent recomputing preempted requests' KV, last window "
        "(simulated, priced as window_recompute_gpu_seconds prices the engine's; requests preempted before the "
        "window are not counted).",
        "candidate",
    ),
    _engine(
        "window_simulated_prefix_cache_hit_ratio",
        "gauge",
        "Share of the last window's prompt tokens found in the prefix cache at their first admission, simulated "
        "per configuration (vLLM's vllm:prefix_cache_hits / vllm:prefix_cache_queries; 0 with caching off).",
        "candidate",
    ),
    # ---- per engine: the recommendation ------------------------------------------------------------------------
    _engine(
        "recommendation_available",
        "gauge",
        "1 when the shadow recommends a configuration change for the engine.",
    ),
    _engine(
        "recommendation_info",
        "info",
        "The recommended configuration: the vLLM flags to change, the objective, the confidence.",
        "candidate",
        "flags",
        "objective",
        "confidence",
    ),
    _engine("recommendation_expected_gain_ratio", "gauge", "Mean relative gain of the recommendation."),
    _engine("recommendation_gain_stderr_ratio", "gauge", "Standard error of that gain over windows."),
    _engine("recommendation_windows", "gauge", "Windows of evidence behind the recommendation."),
    _engine(
        "recommendation_replay_error_ratio",
        "gauge",
        "The self replay's error the recommendation's gain had to exceed.",
    ),
)

BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in METRICS}


def spec(name: str) -> MetricSpec:
    """The declaration of `vllm_shadow_<name>`; a KeyError names a metric the table lacks."""
    return BY_NAME[PREFIX + name]


def prometheus_series() -> frozenset[str]:
    """Every sample name a scrape of the shadow's own endpoint can show."""
    return frozenset(name for s in METRICS for name in s.prometheus_series)


def ray_series() -> frozenset[str]:
    """Every sample name the shadow's series can have through Ray's metrics agent."""
    return frozenset(name for s in METRICS for name in s.ray_series)
