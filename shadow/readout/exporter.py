"""Serve the shadow's metrics on a Prometheus endpoint (prometheus-client).

A custom collector renders `vllm_shadow.readout.metrics` (the families `metric_table` declares) from a fresh
snapshot at each scrape: there is no second copy of the state to go stale, and a label set that disappears
(a candidate grid that changed with the engine's configuration) disappears from the exposition too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from vllm_shadow.readout.metrics import Family, metric_families
from vllm_shadow.readout.snapshot import ShadowSnapshot


def _render(family: Family) -> Metric:
    spec = family.spec
    labels = list(spec.labels)
    # prometheus-client adds the `_total` and `_info` suffixes itself: the table's full names lose them here.
    if spec.kind == "counter":
        metric = CounterMetricFamily(spec.name.removesuffix("_total"), spec.help, labels=labels)
    elif spec.kind == "gauge":
        metric = GaugeMetricFamily(spec.name, spec.help, labels=labels)
    elif spec.kind == "info":
        metric = InfoMetricFamily(spec.name.removesuffix("_info"), spec.help, labels=labels)
        for sample in family.samples:
            metric.add_metric(list(sample.labels), {})
        return metric
    elif spec.kind == "histogram":
        metric = HistogramMetricFamily(spec.name, spec.help, labels=labels)
        for h in family.histograms:
            metric.add_metric(list(h.labels), [(le, float(n)) for le, n in h.buckets], h.total)
        return metric
    else:
        raise ValueError(f"unknown metric kind {spec.kind!r}")
    for sample in family.samples:
        metric.add_metric(list(sample.labels), sample.value)
    return metric


class ShadowCollector:
    def __init__(self, snapshot: Callable[[], ShadowSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        for family in metric_families(self._snapshot()):
            yield _render(family)

    def describe(self) -> list[Metric]:
        return []  # names depend on the snapshot; registering must not take one


def registry_for(snapshot: Callable[[], ShadowSnapshot]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ShadowCollector(snapshot))
    return registry


def exposition(snapshot: ShadowSnapshot) -> str:
    """The text format of one snapshot (what a scrape returns)."""
    return generate_latest(registry_for(lambda: snapshot)).decode()


class MetricsServer:
    """`/metrics` over HTTP on `host:port` (port 0 picks a free one); loopback unless told otherwise."""

    def __init__(
        self, snapshot: Callable[[], ShadowSnapshot], *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._server: Any
        self._server, self._thread = start_http_server(port, addr=host, registry=registry_for(snapshot))
        self.host = host
        self.port = self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
