"""The few panel shapes the shadow's dashboards use, over grafana-foundation-sdk's builders.

Every dashboard shares the same variables (data source, metric prefixes, model and engine) and the same
`Scope`, so that each query is written against `deploy.promql` once. Panel ids are assigned in order by
`Layout`, which keeps the generated JSON stable from one run to the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as prometheus_model

from deploy.promql import Scope

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
SELECTOR = 'model_name=~"$model_name", engine=~"$engine"'
# What a dashboard's queries are written against: both prefixes are variables, `$__rate_interval` is
# Grafana's own choice of a rate range for the panel's resolution.
DASHBOARD_SCOPE = Scope(shadow="${metrics}", vllm="${vllm}", selector=SELECTOR, window="$__rate_interval")
TAGS = ["vllm", "vllm-shadow"]


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False  # a table or a stat of the latest values


def variables(*, multi: bool = True) -> list[builders.QueryVariable | builders.CustomVariable]:
    """Data source, the two metric-name prefixes (direct scrape or through Ray), model and engine."""
    engine_filter = '{model_name=~"$model_name"}'
    return [
        builders.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        _choice(
            "metrics",
            "Shadow metrics",
            "How the shadow is scraped: its own /metrics, or Ray's metrics agent (ray_ prefix).",
            [("direct", "vllm_shadow_"), ("ray", "ray_vllm_shadow_")],
        ),
        _choice(
            "vllm",
            "vLLM metrics",
            "How vLLM is scraped: its own /metrics (vllm:), or through Ray Serve LLM (ray_vllm_).",
            [("direct", "vllm:"), ("ray", "ray_vllm_")],
        ),
        _label_values("model_name", "Model", "label_values(${metrics}config_info, model_name)", multi),
        _label_values(
            "engine", "Engine", f"label_values(${{metrics}}config_info{engine_filter}, engine)", multi
        ),
    ]


def _choice(
    name: str, label: str, description: str, options: list[tuple[str, str]]
) -> builders.CustomVariable:
    text, value = options[0]
    return (
        builders.CustomVariable(name)
        .label(label)
        .description(description)
        .values(",".join(f"{t} : {v}" for t, v in options))
        .current(model.VariableOption(text=text, value=value, selected=True))
    )


def _label_values(name: str, label: str, query: str, multi: bool) -> builders.QueryVariable:
    variable = (
        builders.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )
    if multi:
        # `.*` rather than Grafana's default list of every value: it keeps the selector short and matches
        # engines that appear after the dashboard loaded.
        variable = variable.multi(True).include_all(True).all_value(".*")
    return variable


class Layout:
    """Adds panels to a dashboard in reading order, numbering them."""

    def __init__(self, dashboard: builders.Dashboard) -> None:
        self.dashboard = dashboard
        self._next_id = 1

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def row(self, title: str) -> None:
        self.dashboard.with_row(builders.Row(title).id(self._id()))

    def add(self, panel: object, *, width: int = 12, height: int = 8) -> None:
        self.dashboard.with_panel(panel.id(self._id()).span(width).height(height))  # type: ignore[attr-defined]


def _targets(panel: object, queries: Sequence[Query]) -> None:
    for ref, q in zip("ABCDEFGHIJ", queries, strict=False):
        target = prometheus.Dataquery().expr(q.expr).ref_id(ref).legend_format(q.legend or "__auto")
        panel.with_target(target.instant() if q.instant else target.range())  # type: ignore[attr-defined]


def timeseries_panel(
    title: str,
    description: str,
    queries: Sequence[Query],
    *,
    unit: str = "short",
    min_value: float | None = None,
    max_value: float | None = None,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .line_width(1)
        .fill_opacity(8)
        .span_nulls(True)  # per-window gauges move once a window: draw through the scrapes in between
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "mean"])
        )
    )
    if min_value is not None:
        panel = panel.min(min_value)
    if max_value is not None:
        panel = panel.max(max_value)
    _targets(panel, queries)
    return panel


def stat_panel(title: str, description: str, queries: Sequence[Query], *, unit: str = "short") -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    _targets(panel, queries)
    return panel


def table_panel(
    title: str, description: str, queries: Sequence[Query], *, unit: str = "short"
) -> table.Panel:
    """Latest values with their labels as columns (the `_info` series' settings, a recommendation's flags)."""
    panel = table.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
    for ref, q in zip("ABCDEFGHIJ", queries, strict=False):
        target = (
            prometheus.Dataquery()
            .expr(q.expr)
            .ref_id(ref)
            .instant()
            .format(prometheus_model.PromQueryFormat.TABLE)
            .legend_format(q.legend or "__auto")
        )
        panel.with_target(target)
    # Drop the columns that identify the scrape rather than the engine.
    panel.with_transformation(
        model.DataTransformerConfig(
            id_val="organize",
            options={"excludeByName": {"Time": True, "__name__": True, "job": True, "instance": True}},
        )
    )
    return panel
