"""The exporter: names and labels that pass promtool, bounded label sets, values that agree with the stream,
and a real Prometheus server scraping the endpoint and answering queries."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import ClassVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import shadow_support as support
from tests.waiting import drain, wait_until
from vllm_shadow.adapters.events import EngineStep, RequestFinish
from vllm_shadow.evaluation.recommend import Goal
from vllm_shadow.readout import metric_table, ray_metrics
from vllm_shadow.readout.exporter import MetricsServer, exposition
from vllm_shadow.readout.metrics import metric_families
from vllm_shadow.readout.snapshot import ShadowSnapshot
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig, ShadowCore
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.tracking.reasons import RefusalReason, SkipReason, UnattributedReason
from vllm_shadow.tracking.windows import WindowRules

NAME = "fcfs-kv12"


@pytest.fixture(scope="module")
def snapshot() -> ShadowSnapshot:
    config = ShadowConfig(
        windows=WindowRules(seconds=0.5),
        hardware="cpu",
        evaluation=EvaluationSettings(optimal_time_limit=0.5, optimal_max_requests=24),
        goal=Goal(min_windows=2, min_calibration_steps=50),
    )
    core = ShadowCore(config, LocalTasks())
    for batch in support.batches(NAME):
        core.ingest(batch, "grpc")
    drain(core)
    return core.snapshot(refused={"grpc": {"malformed": 2, "oversized": 1}})


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(found: dict[str, list], name: str, **labels: str) -> float:
    matches = [s.value for s in found[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


@pytest.mark.integration
def test_the_exposition_passes_promtool(snapshot: ShadowSnapshot) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool comes with the Debian package `prometheus` (make test installs it)")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition(snapshot),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result


def test_every_series_has_the_prefix_and_engine_series_join_vllm_s_labels(snapshot: ShadowSnapshot) -> None:
    engine = snapshot.engines[0]
    candidates = set(engine.candidates)
    for family in text_string_to_metric_families(exposition(snapshot)):
        assert family.name.startswith("vllm_shadow_")
        for sample in family.samples:
            if "candidate" in sample.labels and family.name != "vllm_shadow_recommendation":
                assert sample.labels["candidate"] in candidates, sample
            if family.name not in {
                "vllm_shadow_start_time_seconds",
                "vllm_shadow_batches_received",
                "vllm_shadow_events_received",
                "vllm_shadow_batches_refused",
                "vllm_shadow_events_unattributed",
                "vllm_shadow_evaluation_windows",
                "vllm_shadow_tracked_engines",
                "vllm_shadow_tracked_sources",
                "vllm_shadow_engines_evicted",
                "vllm_shadow_sources_evicted",
            }:
                assert {"model_name", "engine"} <= sample.labels.keys(), sample


def test_the_label_sets_are_bounded_by_the_candidate_grid(snapshot: ShadowSnapshot) -> None:
    found = samples(exposition(snapshot))
    n = len(snapshot.engines[0].candidates)
    assert 0 < len(found["vllm_shadow_window_simulated_gpu_seconds"]) <= n
    assert 0 < len(found["vllm_shadow_window_gap_ratio"]) <= 3 * n
    assert len(found.get("vllm_shadow_window_ttft_seconds", [])) <= 3 * n
    assert sum(len(v) for v in found.values()) < 40 * n


def test_values_agree_with_the_recorded_stream(snapshot: ShadowSnapshot) -> None:
    stream = support.events(NAME)
    steps = [e for e in stream if isinstance(e, EngineStep) and e.scheduled_tokens]
    engine = snapshot.engines[0]
    labels = {"model_name": engine.model_name, "engine": engine.engine}
    found = samples(exposition(snapshot))
    assert value(found, "vllm_shadow_requests_finished_total", **labels) == sum(
        isinstance(e, RequestFinish) for e in stream
    )
    assert value(found, "vllm_shadow_engine_steps_total", **labels) == len(steps)
    assert value(found, "vllm_shadow_actual_gpu_seconds_total", **labels) == pytest.approx(
        sum(s.duration for s in steps)
    )
    assert value(found, "vllm_shadow_windows_evaluated_total", **labels) == engine.windows_evaluated > 0
    assert value(found, "vllm_shadow_self_replay_step_match_ratio", **labels) == 1.0
    assert value(found, "vllm_shadow_batches_refused_total", transport="grpc", reason="malformed") == 2
    current = value(found, "vllm_shadow_window_simulated_gpu_seconds", candidate=engine.current, **labels)
    assert current == pytest.approx(engine.last.fidelity.self_replay.gpu_seconds)
    assert (
        value(found, "vllm_shadow_window_gap_ratio", candidate=engine.current, objective="gpu", **labels) == 0
    )
    bound = value(found, "vllm_shadow_window_optimal_bound_gpu_seconds", **labels)
    assert 0 < bound <= current * (1 + 1e-6)  # the simulator keeps time in whole picoseconds
    info = value(found, "vllm_shadow_config_info", candidate=engine.current, **labels)
    assert info == 1


def test_the_simulated_prefix_cache_hit_rate_is_exported_per_configuration(snapshot: ShadowSnapshot) -> None:
    # vLLM's hits over queries (prompt tokens at first admission), per candidate, beside vLLM's own counters;
    # none for a configuration whose window looked nothing up.
    engine = snapshot.engines[0]
    assert engine.last is not None
    looked_up = {o.label: (i * 10, 100) for i, o in enumerate(engine.last.candidates)}
    looked_up[engine.last.candidates[0].label] = (0, 0)
    outcomes = tuple(
        dataclasses.replace(
            o, prefix_cache_hits=looked_up[o.label][0], prefix_cache_queries=looked_up[o.label][1]
        )
        for o in engine.last.candidates
    )
    last = dataclasses.replace(engine.last, candidates=outcomes)
    changed = dataclasses.replace(
        snapshot, engines=[dataclasses.replace(engine, last=last), *snapshot.engines[1:]]
    )
    found = samples(exposition(changed))
    labels = {"model_name": engine.model_name, "engine": engine.engine}
    name = "vllm_shadow_window_simulated_prefix_cache_hit_ratio"
    exported = {s.labels["candidate"]: s.value for s in found[name] if s.labels["engine"] == engine.engine}
    assert exported == {label: hits / queries for label, (hits, queries) in looked_up.items() if queries}
    assert all(s.labels["model_name"] == labels["model_name"] for s in found[name])


def test_every_family_exported_is_the_table_s_declaration(snapshot: ShadowSnapshot) -> None:
    """Name, type, help and labels come from the one table; every sample name is one it declares."""
    declared = metric_table.prometheus_series()
    seen = set()
    for family in text_string_to_metric_families(exposition(snapshot)):
        spec = metric_table.BY_NAME[family.name + ("_total" if family.type == "counter" else "")]
        seen.add(spec.name)
        # The text format has no info type: an info family is the gauge `x_info` fixed at 1.
        assert family.type == ("gauge" if spec.kind == "info" else spec.kind), spec.name
        assert family.documentation == spec.help
        for sample in family.samples:
            assert sample.name in declared, sample.name
            assert set(sample.labels) - {"le"} == set(spec.labels), sample
    # All of them but those that need an SLO (the fixture sets none) or a recommendation (it has none yet).
    needs_recommendation = {
        spec.name
        for spec in metric_table.METRICS
        if spec.name.startswith("vllm_shadow_recommendation_") and not spec.name.endswith("_available")
    }
    assert snapshot.engines[0].verdict is not None and snapshot.engines[0].verdict.recommendation is None
    assert set(metric_table.BY_NAME) - seen == needs_recommendation | {
        "vllm_shadow_window_observed_slo_attainment_ratio"
    }


def test_every_reason_is_exported_at_zero_before_it_happens(snapshot: ShadowSnapshot) -> None:
    found = samples(exposition(snapshot))
    engine = snapshot.engines[0]
    labels = {"model_name": engine.model_name, "engine": engine.engine}
    for reason in SkipReason:
        counted = engine.windows_skipped.get(reason, 0)
        assert value(found, "vllm_shadow_windows_skipped_total", reason=reason, **labels) == counted
    assert {s.labels["reason"] for s in found["vllm_shadow_events_unattributed_total"]} == set(
        UnattributedReason
    )
    refused = {s.labels["reason"]: s.value for s in found["vllm_shadow_batches_refused_total"]}
    assert refused == {r: {"malformed": 2, "oversized": 1}.get(r, 0) for r in RefusalReason}
    for family in metric_families(snapshot):
        if family.spec.reasons is not None:
            reasons = {sample.labels[family.spec.labels.index("reason")] for sample in family.samples}
            assert reasons == set(family.spec.reasons), family.spec.name


class _FakeRayMetric:
    registered: ClassVar[dict[str, _FakeRayMetric]] = {}

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]) -> None:
        self.name, self.description, self.tag_keys = name, description, tag_keys
        self.points: list[tuple[float, dict[str, str]]] = []
        _FakeRayMetric.registered[name] = self

    def inc(self, value: float, tags: dict[str, str]) -> None:
        assert value > 0  # as Ray's own Counter.inc insists
        self._record(value, tags)

    def set(self, value: float, tags: dict[str, str]) -> None:
        self._record(value, tags)

    def _record(self, value: float, tags: dict[str, str]) -> None:
        assert set(tags) == set(self.tag_keys)
        self.points.append((value, tags))


def test_the_ray_mirror_registers_the_table_s_names_and_counters_from_zero(
    snapshot: ShadowSnapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    _FakeRayMetric.registered = {}
    fake = type("FakeRayMetrics", (), {"Counter": _FakeRayMetric, "Gauge": _FakeRayMetric})
    monkeypatch.setattr(ray_metrics, "ray_metrics", fake)
    mirror = ray_metrics.RayMetricsMirror()
    mirror.push(snapshot)
    declared = {name: spec for spec in metric_table.METRICS for name in spec.ray_metrics}
    assert _FakeRayMetric.registered and set(_FakeRayMetric.registered) <= set(declared)
    for name, metric in _FakeRayMetric.registered.items():
        assert (metric.description, metric.tag_keys) == (declared[name].help, declared[name].labels)
    skipped = _FakeRayMetric.registered["vllm_shadow_windows_skipped"]
    assert {tags["reason"] for _, tags in skipped.points} == set(SkipReason)
    # A second push of the same snapshot adds nothing: counters only take increments.
    counts = {name: len(metric.points) for name, metric in _FakeRayMetric.registered.items()}
    mirror.push(snapshot)
    for name, metric in _FakeRayMetric.registered.items():
        if declared[name].kind in ("counter", "histogram"):
            assert len(metric.points) == counts[name], name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, promql: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.integration
def test_a_real_prometheus_scrapes_the_endpoint_and_answers_gap_queries(
    snapshot: ShadowSnapshot, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "the Prometheus server comes with the Debian package `prometheus` (make test installs it)"
        )
    server = MetricsServer(lambda: snapshot)
    prom_port = _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: shadow\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n"
    )
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        engine = snapshot.engines[0]

        def scraped() -> list:
            try:
                return _query(prom_port, "vllm_shadow_requests_finished_total")
            except OSError:  # not listening yet
                return []

        result = wait_until(scraped, 60, "Prometheus to scrape the shadow", every=0.5)
        assert float(result[0]["value"][1]) == engine.tracker.requests_finished
        assert result[0]["metric"]["model_name"] == engine.model_name
        # The cumulative GPU gap of every candidate against the current configuration, as a dashboard asks it.
        gaps = _query(
            prom_port,
            "1 - vllm_shadow_simulated_gpu_seconds_total / on(model_name, engine) group_left "
            f'vllm_shadow_simulated_gpu_seconds_total{{candidate="{engine.current}"}}',
        )
        by_candidate = {g["metric"]["candidate"]: float(g["value"][1]) for g in gaps}
        assert by_candidate[engine.current] == 0.0
        assert by_candidate.keys() == engine.simulated_gpu_seconds.keys()
        current = engine.simulated_gpu_seconds[engine.current]
        for label, seconds in engine.simulated_gpu_seconds.items():
            assert by_candidate[label] == pytest.approx(1 - seconds / current)
    finally:
        process.terminate()
        process.wait(timeout=10)
        server.stop()


def test_the_hand_written_exposition_is_what_prometheus_client_would_write(snapshot: ShadowSnapshot) -> None:
    # /metrics writes the text format itself (prometheus-client's generic renderer was too slow at the engine
    # bound); the library's own rendering of the same families is the reference, byte for byte.
    from prometheus_client.exposition import generate_latest

    from vllm_shadow.readout.exporter import registry_for

    assert exposition(snapshot) == generate_latest(registry_for(lambda: snapshot)).decode()
