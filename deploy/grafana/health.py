"""Shadow health: is the mirror stream arriving whole and on time, and does evaluation keep up with it?"""

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
    timeseries_panel,
    variables,
)

UID = "vllm-shadow-health"
ENGINE = "model_name, engine"


def _by(labels: str, name: str, *matchers: str, engine: bool = True) -> str:
    """Per-second rate of a shadow counter summed by `labels`. Shadow-wide counters carry no engine labels, so
    the dashboard's engine selector must not apply to them."""
    series = S.s(name, *matchers) if engine else S.shadow + name
    return f"sum by ({labels}) ({S.rate(series)})"


def build() -> model.Dashboard:
    dashboard = (
        builders.Dashboard("vLLM shadow: health")
        .uid(UID)
        .description(
            "Ingest (events, drops, lag) and evaluation (queue, time, failures) of the shadow itself."
        )
        .tags(TAGS)
        .refresh("30s")
        .time("now-3h", "now")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
    )
    for variable in variables():
        dashboard = dashboard.with_variable(variable)
    layout = Layout(dashboard)

    layout.row("Ingest")
    layout.add(
        stat_panel(
            "Uptime",
            "Time since the shadow process started (a restart resets its counters).",
            [Query(f"time() - max({S.shadow}start_time_seconds)")],
            unit="s",
        ),
        width=6,
        height=5,
    )
    layout.add(
        stat_panel(
            "Engines mirrored",
            "Engines the shadow tracks (selected by the variables above).",
            [Query(f"count(max by ({ENGINE}) ({S.s('config_info')}))")],
        ),
        width=6,
        height=5,
    )
    layout.add(
        stat_panel(
            "Events lost per second",
            "Events dropped by the senders' full queues or arriving too late, plus batches lost in transit.",
            [Query(f"sum({promql.lost_rate(S)})")],
        ),
        width=6,
        height=5,
    )
    layout.add(
        stat_panel(
            "Windows given up per second",
            "Windows the evaluation stage dropped (queue full) or cancelled (time-out).",
            [Query(f"sum({promql.backlog_skip_rate(S)})")],
        ),
        width=6,
        height=5,
    )
    layout.add(
        timeseries_panel(
            "Events received, by transport",
            "Mirror events per second arriving over Ray, gRPC and OTLP.",
            [Query(_by("transport", "events_received_total", engine=False), "{{transport}}")],
        ),
        width=12,
    )
    layout.add(
        timeseries_panel(
            "Events applied, by engine and kind",
            "Arrivals, steps and finishes per second that reached an engine's request table.",
            [Query(_by(f"{ENGINE}, kind", "engine_events_total"), "{{kind}} [{{engine}}]")],
        ),
        width=12,
    )
    layout.add(
        timeseries_panel(
            "Ingest lag",
            "Shadow clock minus the end of the last engine step received: how far behind the mirror is.",
            [Query(S.s("ingest_lag_seconds"), "{{model_name}} [{{engine}}]")],
            unit="s",
        ),
        width=12,
    )
    layout.add(
        timeseries_panel(
            "Losses, by reason",
            "Events dropped, batches lost on the way (and by the sender's own count, e.g. while the shadow was "
            "down), batches refused, events no engine could be named for, and requests whose outcome the shadow "
            "does not know.",
            [
                Query(_by(f"{ENGINE}, reason", "events_dropped_total"), "dropped: {{reason}} [{{engine}}]"),
                Query(_by(ENGINE, "batches_lost_total"), "batches lost [{{engine}}]"),
                Query(_by(ENGINE, "sender_batches_lost_total"), "batches the sender lost [{{engine}}]"),
                Query(
                    _by("transport, reason", "batches_refused_total", engine=False),
                    "refused: {{transport}} {{reason}}",
                ),
                Query(_by("reason", "events_unattributed_total", engine=False), "unattributed: {{reason}}"),
                Query(_by(f"{ENGINE}, reason", "requests_lost_total"), "requests: {{reason}} [{{engine}}]"),
            ],
        ),
        width=12,
    )

    layout.row("Evaluation")
    layout.add(
        timeseries_panel(
            "Windows evaluated and skipped",
            "Windows per second evaluated, and skipped with the reason (tainted by lost events, backlog, ...).",
            [
                Query(_by(ENGINE, "windows_evaluated_total"), "evaluated [{{engine}}]"),
                Query(_by(f"{ENGINE}, reason", "windows_skipped_total"), "skipped: {{reason}} [{{engine}}]"),
            ],
        ),
        width=8,
    )
    layout.add(
        timeseries_panel(
            "Evaluation time per window",
            "Mean wall time from submitting a window's tasks to its last result (simulations and the CP-SAT "
            "solve, in parallel as Ray tasks).",
            [Query(promql.evaluation_mean_seconds(S), "{{model_name}} [{{engine}}]")],
            unit="s",
            min_value=0,
        ),
        width=8,
    )
    layout.add(
        timeseries_panel(
            "Evaluation queue",
            "Windows queued and in flight across engines, and each engine's windows still open or waiting for "
            "their requests to finish.",
            [
                Query(f"sum by (state) ({S.shadow}evaluation_windows)", "{{state}}"),
                Query(S.s("pending_windows"), "pending [{{engine}}]"),
            ],
        ),
        width=8,
    )
    layout.add(
        timeseries_panel(
            "Evaluation failures and engine restarts",
            "Candidate simulations or optimal solves that failed inside evaluated windows, and engine restarts "
            "the shadow noticed.",
            [
                Query(_by(f"{ENGINE}, part", "evaluation_failures_total"), "failed: {{part}} [{{engine}}]"),
                Query(_by(ENGINE, "engine_restarts_total"), "restarts [{{engine}}]"),
            ],
        ),
        width=24,
    )
    return dashboard.build()
