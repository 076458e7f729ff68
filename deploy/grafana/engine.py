"""The per-engine drill-down: one engine's configuration, every candidate's latency against what the engine
delivered, GPU time against the optimum, and the shadow's view beside vLLM's own series (joined on
`model_name` and `engine`)."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.models import dashboard as model

from deploy import promql
from deploy.grafana.panels import (
    DASHBOARD_SCOPE as S,
)
from deploy.grafana.panels import (
    TAGS,
    Layout,
    Query,
    table_panel,
    timeseries_panel,
    variables,
)

UID = "vllm-shadow-engine"
ENGINE = "model_name, engine"


def build() -> model.Dashboard:
    dashboard = (
        builders.Dashboard("vLLM shadow: engine")
        .uid(UID)
        .description("One engine as the shadow sees it, beside vLLM's own metrics for the same engine.")
        .tags(TAGS)
        .refresh("30s")
        .time("now-3h", "now")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
    )
    for variable in variables(multi=False):
        dashboard = dashboard.with_variable(variable)
    layout = Layout(dashboard)

    layout.row("Configuration and recommendation")
    layout.add(
        table_panel(
            "Engine configuration as modelled",
            "The scheduler settings the shadow replays (the self replay's candidate) and the KV cache.",
            [Query(S.s("config_info"))],
        ),
        width=12,
        height=5,
    )
    layout.add(
        table_panel(
            "Recommendation",
            "The flags to change, with the expected gain (value), its standard error and windows of evidence.",
            [
                Query(promql.recommendation(S)),
                Query(S.s("recommendation_gain_stderr_ratio")),
                Query(S.s("recommendation_windows")),
            ],
            unit="percentunit",
        ),
        width=12,
        height=5,
    )

    layout.row("GPU time")
    layout.add(
        timeseries_panel(
            "Busy time: optimal bound at equal latency, measured, self replay, best candidate",
            "GPU-seconds per second over the evaluated windows. Measured and self replay should agree; the gap "
            "between self replay and the optimal bound at equal latency (every request served no later than "
            "by the engine's configuration, or within the SLO) is all any scheduler could save for the same "
            "service. The bound with latency ignored is lower still, by delaying requests without limit.",
            [
                Query(
                    f"sum by ({ENGINE}) ({S.rate(S.s('optimal_constrained_bound_gpu_seconds_total'))})",
                    "optimal lower bound at equal latency",
                ),
                Query(promql.measured_gpu_rate(S), "measured"),
                Query(promql.current_gpu_rate(S), "self replay (current settings)"),
                Query(f"min by ({ENGINE}) ({promql.candidate_gpu_rate(S)})", "best candidate"),
                Query(
                    f"sum by ({ENGINE}) ({S.rate(S.s('optimal_bound_gpu_seconds_total'))})",
                    "optimal lower bound, latency ignored",
                ),
            ],
            unit="short",
            min_value=0,
        ),
        width=12,
    )
    layout.add(
        timeseries_panel(
            "Last window: GPU seconds per configuration",
            "Simulated busy time to serve the last evaluated window, per candidate, with the measured time and "
            "the optimal bound at equal latency, and the optimal solver's best schedule and bound with latency "
            "ignored.",
            [
                Query(S.s("window_optimal_constrained_bound_gpu_seconds"), "optimal bound at equal latency"),
                Query(S.s("window_simulated_gpu_seconds"), "{{candidate}}"),
                Query(S.s("window_actual_gpu_seconds"), "measured"),
                Query(S.s("window_optimal_gpu_seconds"), "optimal schedule, latency ignored"),
                Query(S.s("window_optimal_bound_gpu_seconds"), "optimal bound, latency ignored"),
            ],
            unit="s",
            min_value=0,
        ),
        width=12,
    )
    layout.add(
        timeseries_panel(
            "Recompute tax: the engine's, and the no-eviction candidate's gap",
            "Share of the engine's measured busy time (evaluated windows) spent computing again the KV of "
            "requests its recompute preemptions dropped, priced with the calibrated cost model; beside it the "
            "GPU-time gap of the no-eviction candidate, which never preempts (what avoiding preemptions "
            "altogether would have saved or cost, reservations included).",
            [
                Query(promql.recompute_share(S), "recompute tax (engine)"),
                Query(promql.gpu_gap(S, 'candidate=~"no-eviction.*"'), "no-eviction gap"),
            ],
            unit="percentunit",
        ),
        width=12,
    )
    layout.add(
        timeseries_panel(
            "Recompute tax per window",
            "GPU seconds the engine spent recomputing preempted requests in the last evaluated window's steps, "
            "and recompute preemptions per second over the evaluated windows.",
            [
                Query(S.s("window_recompute_gpu_seconds"), "recompute GPU s, last window"),
                Query(f"sum by ({ENGINE}) ({S.rate(S.s('preemptions_total'))})", "preemptions / s"),
            ],
            unit="short",
            min_value=0,
        ),
        width=12,
    )
    layout.add(
        timeseries_panel(
            "Tokens recomputed: the engine against each configuration (last window)",
            "Tokens computed again after recompute preemptions in the last evaluated window: what the engine "
            "really recomputed, and what each configuration would have (simulated; requests preempted before "
            "the window are counted only on the engine).",
            [
                Query(S.s("window_recomputed_tokens"), "engine (measured)"),
                Query(S.s("window_simulated_recomputed_tokens"), "{{candidate}}"),
            ],
            unit="short",
            min_value=0,
        ),
        width=12,
    )
    layout.add(
        timeseries_panel(
            "Recompute tax in GPU seconds: the engine against each configuration (last window)",
            "Busy time spent computing again the KV recompute preemptions dropped, in the last evaluated window: "
            "the engine's, priced on its mirrored steps with the calibrated cost model, and what each "
            "configuration would have spent, priced the same way on its simulated steps (the no-eviction "
            "candidate never preempts; requests preempted before the window are counted only on the engine).",
            [
                Query(S.s("window_recompute_gpu_seconds"), "engine (measured steps)"),
                Query(S.s("window_simulated_recompute_gpu_seconds"), "{{candidate}}"),
            ],
            unit="s",
            min_value=0,
        ),
        width=12,
    )

    layout.row("Latency per candidate")
    for metric, title in (("ttft", "TTFT"), ("tpot", "TPOT")):
        layout.add(
            timeseries_panel(
                f"p99 {title}: candidates against the engine",
                f"Simulated p99 {title} per candidate on the last window, and the p99 the engine delivered.",
                [
                    Query(S.s(f"window_{metric}_seconds", 'quantile="0.99"'), "{{candidate}}"),
                    Query(S.s(f"window_observed_{metric}_seconds", 'quantile="0.99"'), "engine (observed)"),
                ],
                unit="s",
                min_value=0,
            ),
            width=12,
        )
    layout.add(
        timeseries_panel(
            "SLO attainment per candidate",
            "Share of the last window's requests meeting the TTFT/TPOT targets (shown when the shadow runs with "
            "--ttft-slo or --tpot-slo): simulated per candidate, and on the engine.",
            [
                Query(S.s("window_slo_attainment_ratio"), "{{candidate}}"),
                Query(S.s("window_observed_slo_attainment_ratio"), "engine (observed)"),
            ],
            unit="percentunit",
            min_value=0,
            max_value=1,
        ),
        width=24,
    )

    layout.row("The shadow beside vLLM")
    layout.add(
        timeseries_panel(
            "Mirror coverage",
            "Requests the shadow saw finish over requests vLLM reports finished. Below 1 the mirror misses "
            "traffic (see the health dashboard for drops).",
            [Query(promql.mirror_coverage(S), "{{model_name}} [{{engine}}]")],
            unit="percentunit",
            min_value=0,
        ),
        width=8,
    )
    layout.add(
        timeseries_panel(
            "p99 TTFT: vLLM's histogram and the shadow's mirror",
            "vLLM's own TTFT histogram against the TTFT the shadow measured from the mirrored steps.",
            [
                Query(promql.vllm_ttft_quantile(S, "0.99"), "vLLM histogram"),
                Query(S.s("window_observed_ttft_seconds", 'quantile="0.99"'), "shadow mirror (last window)"),
            ],
            unit="s",
            min_value=0,
        ),
        width=8,
    )
    layout.add(
        timeseries_panel(
            "Requests in the engine",
            "vLLM's running and waiting requests against the shadow's live request table.",
            [
                Query(
                    f"sum by ({ENGINE}) ({S.v('num_requests_running')}) "
                    f"+ on({ENGINE}) sum by ({ENGINE}) ({S.v('num_requests_waiting')})",
                    "vLLM running + waiting",
                ),
                Query(S.s("live_requests"), "shadow live requests"),
            ],
            unit="short",
            min_value=0,
        ),
        width=8,
    )
    layout.add(
        timeseries_panel(
            "KV cache use (vLLM)",
            "vLLM's KV cache usage: a candidate can only gain by batching more where KV is not the bottleneck.",
            [Query(S.v("kv_cache_usage_perc"), "{{model_name}} [{{engine}}]")],
            unit="percentunit",
            min_value=0,
            max_value=1,
        ),
        width=12,
    )
    layout.add(
        timeseries_panel(
            "Prefix-cache hit rate: vLLM against each configuration",
            "Prompt tokens found in the prefix cache over prompt tokens looked up: vLLM's own counters "
            "(vllm:prefix_cache_hits / vllm:prefix_cache_queries) against each configuration's simulated rate "
            "on the last evaluated window's requests. The self replay's must track vLLM's; a candidate that "
            "turns caching off has none.",
            [
                Query(promql.vllm_prefix_cache_hit_ratio(S), "vLLM {{model_name}} [{{engine}}]"),
                Query(S.s("window_simulated_prefix_cache_hit_ratio"), "{{candidate}}"),
            ],
            unit="percentunit",
            min_value=0,
            max_value=1,
        ),
        width=12,
    )
    layout.add(
        timeseries_panel(
            "Preemptions (vLLM)",
            "vLLM's recompute preemptions per second: the self replay must reproduce every one of them.",
            [
                Query(
                    f"sum by ({ENGINE}) ({S.rate(S.v('num_preemptions_total'))})",
                    "{{model_name}} [{{engine}}]",
                )
            ],
            unit="short",
            min_value=0,
        ),
        width=12,
    )
    return dashboard.build()
