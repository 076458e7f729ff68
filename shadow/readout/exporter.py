"""Serve the shadow's metrics on a Prometheus endpoint.

Each scrape renders `vllm_shadow.readout.metrics` (the families `metric_table` declares) from a fresh snapshot:
there is no second copy of the state to go stale, and a label set that disappears (a candidate grid that changed
with the engine's configuration) disappears from the exposition too. The text format is written here rather
than through prometheus-client's registry: at the engine bound (thousands of series) its generic renderer took
over 100 ms a scrape. `registry_for` still offers the shadow as a prometheus-client collector, and a test holds
the two renderings equal.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

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


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _label_text(names: tuple[str, ...], values: tuple[str, ...], le: str | None = None) -> str:
    pairs = list(zip(names, values, strict=True))
    if le is not None:
        pairs.append(("le", le))
    return "{" + ",".join(f'{n}="{_escape_label(v)}"' for n, v in sorted(pairs)) + "}" if pairs else ""


def _family_text(family: Family, out: list[str]) -> None:
    # The text format 0.0.4 as prometheus-client writes it (labels sorted by name): counters and
    # info metrics carry their suffix in HELP and TYPE too, and an info metric is a gauge at 1.
    spec = family.spec
    kind = "gauge" if spec.kind == "info" else spec.kind
    out.append(f"# HELP {spec.name} {_escape_help(spec.help)}\n# TYPE {spec.name} {kind}\n")
    names = tuple(spec.labels)
    if spec.kind == "histogram":
        for h in family.histograms:
            for le, count in h.buckets:
                labels = _label_text(names, h.labels, le)
                out.append(f"{spec.name}_bucket{labels} {floatToGoString(count)}\n")
            labels = _label_text(names, h.labels)
            count = h.buckets[-1][1] if h.buckets else 0
            out.append(f"{spec.name}_count{labels} {floatToGoString(count)}\n")
            out.append(f"{spec.name}_sum{labels} {floatToGoString(h.total)}\n")
        return
    for sample in family.samples:
        value = 1.0 if spec.kind == "info" else sample.value
        out.append(f"{spec.name}{_label_text(names, sample.labels)} {floatToGoString(value)}\n")


def exposition(snapshot: ShadowSnapshot) -> str:
    """The text format of one snapshot (what a scrape returns)."""
    out: list[str] = []
    for family in metric_families(snapshot):
        _family_text(family, out)
    return "".join(out)


class MetricsServer:
    """`/metrics` over HTTP on `host:port` (port 0 picks a free one); loopback unless told otherwise."""

    def __init__(
        self, snapshot: Callable[[], ShadowSnapshot], *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = exposition(snapshot()).encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # a scrape every few seconds is not news

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="shadow-metrics", daemon=True)
        self._thread.start()
        self.host = host
        self.port = self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
