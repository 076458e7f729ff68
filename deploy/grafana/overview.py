"""The overview: what the shadow recommends, how much each configuration would save, how far the optimum is,
and whether to trust any of it (fidelity and cost-model error)."""

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
    stat_panel,
    table_panel,
    timeseries_panel,
    variables,
)

UID = "vllm-shadow-overview"


def build() -> model.Dashboard:
    dashboard = (
        builders.Dashboard("vLLM shadow: overview")
        .uid(UID)
        .description(
            "The shadow scheduler replays each engine's traffic under alternative vLLM configurations and an "
            "optimal scheduler. Gaps are (current - candidate) / current: positive means the candidate saves."
        )
        .tags(TAGS)
        .refresh("30s")
        .time("now-6h", "now")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
    )
    for variable in variables():
        dashboard = dashboard.with_variable(variable)
    layout = Layout(dashboard)

    layout.row("Recommendation")
    layout.add(
        table_panel(
            "Recommended configuration",
            "Per engine: the vLLM flags to change, the objective, the confidence, and the expected relative gain. "
            "No row: the evidence does not clear the self replay's error yet.",
            [Query(promql.recommendation(S))],
            unit="percentunit",
        ),
        width=16,
        height=6,
    )
    layout.add(
        stat_panel(
            "GPUs the recommendation frees",
            "The engines' measured busy time times each recommendation's expected gain: GPU-seconds saved per "
            "second, summed over the selected engines (1 = one GPU kept busy all the time).",
            [Query(f"sum({promql.gpu_saving_rate(S)})")],
            unit="short",
        ),
        width=8,
        height=6,
    )

    layout.row("Cost gap")
    layout.add(
        timeseries_panel(
            "GPU-time gap: the optimum at equal latency, the best flag change",
            "Optimal at equal latency (the headline): the gap to the lower bound on any schedule that serves every "
            "request no later than the engine's configuration does (or within the SLO, when the shadow has one), "
            "the GPU time any scheduler could save for the same service. Best: the largest gap among "
            "configurations reachable by vLLM flags. Latency ignored: the gap to the bound on any schedule "
            "however late it serves the requests, kept for reference; no operator would run that schedule.",
            [
                Query(promql.constrained_gpu_gap(S), "optimal at equal latency {{model_name}} [{{engine}}]"),
                Query(promql.best_gpu_gap(S), "best flag change {{model_name}} [{{engine}}]"),
                Query(promql.optimal_gpu_gap(S), "optimal, latency ignored {{model_name}} [{{engine}}]"),
            ],
            unit="percentunit",
        ),
        width=12,
    )
    layout.add(
        timeseries_panel(
            "GPU-time gap by candidate",
            "From the simulated GPU-seconds counters over the panel's rate range, so each point covers every "
            "window evaluated in that range.",
            [Query(promql.gpu_gap(S), "{{candidate}} [{{engine}}]")],
            unit="percentunit",
        ),
        width=12,
    )
    layout.add(
        timeseries_panel(
            "p99 TTFT gap by candidate (last window)",
            "(current - candidate) / current p99 TTFT on the last evaluated window.",
            [Query(S.s("window_gap_ratio", 'objective="ttft_p99"'), "{{candidate}} [{{engine}}]")],
            unit="percentunit",
        ),
        width=12,
    )
    layout.add(
        timeseries_panel(
            "p99 TPOT gap by candidate (last window)",
            "(current - candidate) / current p99 TPOT on the last evaluated window.",
            [Query(S.s("window_gap_ratio", 'objective="tpot_p99"'), "{{candidate}} [{{engine}}]")],
            unit="percentunit",
        ),
        width=12,
    )

    layout.row("Can the shadow be trusted?")
    layout.add(
        timeseries_panel(
            "Self replay: engine steps reproduced",
            "Share of the engine's steps the simulator, run with the engine's own settings, reproduced exactly "
            "(batch, token counts, preemption victims). Below 95% the shadow recommends nothing.",
            [Query(S.s("self_replay_step_match_ratio"), "{{model_name}} [{{engine}}]")],
            unit="percentunit",
            min_value=0,
            max_value=1,
        ),
        width=8,
    )
    layout.add(
        timeseries_panel(
            "Self replay error",
            "Relative error of the self replay against what the engine really did: busy time, median per-request "
            "TTFT and end-to-end latency. A gain smaller than this is not recommended.",
            [
                Query(S.s("self_replay_gpu_error_ratio"), "GPU time {{model_name}} [{{engine}}]"),
                Query(S.s("self_replay_latency_error_ratio"), "{{metric}} {{model_name}} [{{engine}}]"),
            ],
            unit="percentunit",
            min_value=0,
        ),
        width=8,
    )
    layout.add(
        timeseries_panel(
            "Cost-model error",
            "Running relative error of the calibrated cost model on engine steps it had not seen.",
            [Query(S.s("cost_model_error_ratio"), "{{model_name}} [{{engine}}]")],
            unit="percentunit",
            min_value=0,
        ),
        width=8,
    )
    return dashboard.build()
