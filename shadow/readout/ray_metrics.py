"""The same metrics through Ray's metrics system (`ray.util.metrics`), for clusters scraped through Ray.

Ray's metrics agent on each node exports them with its own prefix, so `vllm_shadow_x` appears as
`ray_vllm_shadow_x`, beside Ray Serve LLM's `ray_vllm_*` engine series. The snapshot's counters are cumulative
values; Ray counters only go up by increments, so the mirror keeps the last value it pushed and adds the
difference (a smaller value means the shadow restarted: the whole value is added). A histogram is pushed as
two counters, observations and their total (`x_seconds` becomes `xs_total` and `x_seconds_total`): Ray
histograms take observations, not buckets, and a rate ratio of the two is the mean.
"""

from __future__ import annotations

from typing import Any

from ray.util import metrics as ray_metrics

from vllm_shadow.readout.metrics import Family, metric_families
from vllm_shadow.readout.snapshot import ShadowSnapshot


class RayMetricsMirror:
    def __init__(self) -> None:
        self._metrics: dict[str, Any] = {}
        self._pushed: dict[tuple[str, tuple[str, ...]], float] = {}

    def push(self, snapshot: ShadowSnapshot) -> None:
        for family in metric_families(snapshot):
            if family.kind == "histogram":
                for h in family.histograms:
                    plural = family.name.removesuffix("_seconds") + "s"
                    self._count(plural, family, h.labels, float(h.buckets[-1][1]))
                    self._count(family.name, family, h.labels, h.total)
            elif family.kind == "counter":
                for sample in family.samples:
                    self._count(family.name.removesuffix("_total"), family, sample.labels, sample.value)
            else:
                for sample in family.samples:
                    gauge = self._metric(ray_metrics.Gauge, family.name, family)
                    gauge.set(sample.value, tags=dict(zip(family.label_names, sample.labels, strict=True)))

    def _metric(self, cls: type, name: str, family: Family) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = cls(name, description=family.doc, tag_keys=family.label_names)
        return metric

    def _count(self, name: str, family: Family, labels: tuple[str, ...], value: float) -> None:
        key = (name, labels)
        previous = self._pushed.get(key, 0.0)
        delta = value - previous if value >= previous else value
        self._pushed[key] = value
        if delta > 0:
            counter = self._metric(ray_metrics.Counter, name, family)
            counter.inc(delta, tags=dict(zip(family.label_names, labels, strict=True)))
