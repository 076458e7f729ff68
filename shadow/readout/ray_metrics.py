"""The same metrics through Ray's metrics system (`ray.util.metrics`), for clusters scraped through Ray.

Ray's metrics agent on each node exports them with its own prefix, so `vllm_shadow_x` appears as
`ray_vllm_shadow_x`, beside Ray Serve LLM's `ray_vllm_*` engine series. The snapshot's counters are cumulative
values; Ray counters only go up by increments, so the mirror keeps the last value it pushed and adds the
difference (a smaller value means the shadow restarted: the whole value is added). A histogram is pushed as
two counters, observations and their total (`x_seconds` becomes `xs_total` and `x_seconds_total`): Ray
histograms take observations, not buckets, and a rate ratio of the two is the mean. The names are the
table's (`MetricSpec.ray_metrics`), so that the dashboards and rules can check theirs against it.
"""

from __future__ import annotations

from typing import Any

from ray.util import metrics as ray_metrics

from vllm_shadow.readout.metric_table import MetricSpec
from vllm_shadow.readout.metrics import metric_families
from vllm_shadow.readout.snapshot import ShadowSnapshot


class RayMetricsMirror:
    def __init__(self) -> None:
        self._metrics: dict[str, Any] = {}
        self._pushed: dict[tuple[str, tuple[str, ...]], float] = {}

    def push(self, snapshot: ShadowSnapshot) -> None:
        for family in metric_families(snapshot):
            spec = family.spec
            if spec.kind == "histogram":
                observations, total = spec.ray_metrics
                for h in family.histograms:
                    self._count(observations, spec, h.labels, float(h.buckets[-1][1]))
                    self._count(total, spec, h.labels, h.total)
            elif spec.kind == "counter":
                (name,) = spec.ray_metrics
                for sample in family.samples:
                    self._count(name, spec, sample.labels, sample.value)
            else:
                (name,) = spec.ray_metrics
                for sample in family.samples:
                    gauge = self._metric(ray_metrics.Gauge, name, spec)
                    gauge.set(sample.value, tags=dict(zip(spec.labels, sample.labels, strict=True)))

    def _metric(self, cls: type, name: str, spec: MetricSpec) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = cls(name, description=spec.help, tag_keys=spec.labels)
        return metric

    def _count(self, name: str, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None:
        key = (name, labels)
        first = key not in self._pushed
        previous = self._pushed.get(key, 0.0)
        delta = value - previous if value >= previous else value
        self._pushed[key] = value
        tags = dict(zip(spec.labels, labels, strict=True))
        if delta > 0:
            self._metric(ray_metrics.Counter, name, spec).inc(delta, tags=tags)
        elif first:
            # A series must exist from the start at 0, like the direct exposition's (every reason of a counter
            # is exported before it happens, so rules need no fallback for an absent series). Ray's inc()
            # refuses 0; its _record() is what inc() records an increment with.
            self._metric(ray_metrics.Counter, name, spec)._record(0.0, tags=tags)
