"""Every dashboard query and every rule, evaluated by a real Prometheus that scraped a running shadow.

The shadow (the service with its /metrics endpoint on 127.0.0.1) is fed in real time by three senders: the
recorded real vLLM stream `fcfs-kv12`, beside a playback of the /metrics that the same vLLM engine exposed
while serving that workload; the recorded `priority-kv16` stream presented as engine 1, with one batch lost in
transit; and a stream replayed from the Azure trace by the simulator with a cautious max_num_seqs, on which the
shadow recommends a change. Prometheus scrapes both endpoints every second and evaluates the rule file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.generate import DASHBOARD_DIR, DASHBOARDS, RULES_DIR
from deploy.prometheus import rules
from tests import deploy_support as support
from tests import shadow_support
from tests.waiting import wait_until
from vllm_shadow.adapters.events import EngineInfo
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.traces import bundled_trace, read_trace
from vllm_shadow.adapters.vllm.engine_run import trace_workload
from vllm_shadow.costmodel.profile import load_profile
from vllm_shadow.evaluation.evaluate import Slo
from vllm_shadow.evaluation.recommend import Goal
from vllm_shadow.report.replayed import replayed_stream
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig
from vllm_shadow.runtime.service import ServiceConfig, ShadowService
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.tracking.windows import WindowRules

pytestmark = pytest.mark.integration

PROFILE = Path(__file__).resolve().parents[1] / "costmodel" / "data" / "profiles" / "tiny-llama-cpu.json"
REPLAY_MODEL = "tiny-llama-replay"
# What Grafana substitutes for the dashboards' variables: the direct-scrape names, every model and engine,
# and a rate range of a few scrape intervals (Grafana's $__rate_interval at a 1 s scrape interval).
VARIABLES = {
    "${metrics}": "vllm_shadow_",
    "${vllm}": "vllm:",
    "$model_name": ".*",
    "$engine": ".*",
    "$__rate_interval": "10s",
}


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, expr) for every target of every checked-in dashboard."""
    out = []
    for name in DASHBOARDS:
        board = json.loads((DASHBOARD_DIR / name).read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((name, panel["title"], target["expr"]))
    return out


def variable_queries() -> list[tuple[str, str]]:
    out = []
    for name in DASHBOARDS:
        board = json.loads((DASHBOARD_DIR / name).read_text())
        out += [(name, v["query"]) for v in board["templating"]["list"] if v["type"] == "query"]
    return out


def replay_events() -> list:
    """A cautious engine (max_num_seqs 2) under the Azure conversation trace, served by the simulator."""
    recorded = shadow_support.info_of(shadow_support.events("fcfs-kv12"))
    info = dataclasses.replace(
        recorded,
        model=REPLAY_MODEL,
        num_kv_blocks=64,
        scheduler=dataclasses.replace(recorded.scheduler, max_num_seqs=2, max_num_batched_tokens=256),
    )
    requests = trace_workload(read_trace(bundled_trace("azure-conv"), limit=120).requests, seconds=12.0)
    return replayed_stream(info, requests, load_profile(PROFILE).cost)


def as_engine(events: list, engine: str) -> list:
    return [dataclasses.replace(e, engine=engine) if isinstance(e, EngineInfo) else e for e in events]


def has_data(result: list[dict]) -> bool:
    return any(
        not math.isnan(float(v)) for series in result for _, v in series.get("values", [series.get("value")])
    )


def shadow_service(config: ShadowConfig) -> ShadowService:
    # gRPC ingest on: its refusal counters are part of what the health dashboard shows.
    return ShadowService(ServiceConfig(shadow=config, grpc_address="127.0.0.1:0"), LocalTasks(1))


def scrape_target(service: ShadowService) -> str:
    return service.addresses()["metrics"].removeprefix("http://").removesuffix("/metrics")


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[support.Prometheus, float]]:
    support.require("prometheus")
    evaluation = EvaluationSettings(optimal_time_limit=0.5, optimal_max_requests=24)
    windows = WindowRules(seconds=0.5)
    # Two shadows, as two clusters would have: the recorded engines' with a TTFT SLO (its attainment series
    # exist only with one), the replayed engine's without.
    recorded = shadow_service(
        ShadowConfig(
            windows=windows, hardware="cpu", goal=Goal(slo=Slo(ttft_seconds=1.0)), evaluation=evaluation
        )
    )
    replayed = shadow_service(ShadowConfig(windows=windows, hardware="cpu", evaluation=evaluation))
    vllm = support.ExpositionPlayer()
    try:
        with support.prometheus(
            tmp_path_factory.mktemp("prometheus"),
            {"vllm-shadow": [scrape_target(recorded), scrape_target(replayed)], "vllm": [vllm.address]},
            [RULES_DIR / rules.NATIVE.filename],
        ) as prometheus:
            prometheus.wait_until_scraping()
            started = time.time()
            vllm.start()
            priority = as_engine(shadow_support.events("priority-kv16"), "1")
            players = [
                support.play(recorded.ingest, shadow_support.events("fcfs-kv12"), "recorded-fcfs"),
                support.play(recorded.ingest, priority, "recorded-priority", skip_batches=(40,)),
                support.play(replayed.ingest, replay_events(), "replayed"),
            ]
            # A sender that never announced its engine: its events are counted, not attributed.
            recorded.ingest(EventBatch(shadow_support.events("fcfs-kv12")[1:4], "unannounced", 0))
            for player in players:
                player.join(timeout=60)
                assert not player.is_alive(), f"{player.name} did not finish playing in time"
            for service in (recorded, replayed):
                service.flush()
                wait_until(service.idle, 120, "the shadow to evaluate every window", every=0.5)
            engines = replayed.snapshot().engines
            assert engines[0].verdict and engines[0].verdict.recommendation, engines[0].verdict
            prometheus.wait_until_settled()  # scrapes and rule evaluations of the final state
            yield prometheus, started
    finally:
        for closing in (recorded.close, replayed.close, vllm.close):
            closing()


def test_both_jobs_are_scraped(scraped: tuple[support.Prometheus, float]) -> None:
    prometheus, _ = scraped
    assert prometheus.targets_health() == [("vllm", "up"), ("vllm-shadow", "up"), ("vllm-shadow", "up")]


def test_every_dashboard_query_returns_data(scraped: tuple[support.Prometheus, float]) -> None:
    prometheus, started = scraped
    queries = dashboard_queries()
    assert len(queries) > 40
    empty = [
        (board, panel, expr)
        for board, panel, expr in queries
        if not has_data(prometheus.query_range(substitute(expr), started, time.time()))
    ]
    assert not empty, "queries without data:\n" + "\n".join(map(str, empty))


def test_every_dashboard_variable_finds_its_values(scraped: tuple[support.Prometheus, float]) -> None:
    prometheus, _ = scraped
    for board, query in variable_queries():
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", substitute(query))
        assert match, (board, query)
        values = prometheus.label_values(match.group(2), match.group(1))
        assert values, (board, query)
    assert set(prometheus.label_values("engine", "vllm_shadow_config_info")) == {"0", "1"}


def test_every_recording_rule_is_evaluated_and_returns_data(
    scraped: tuple[support.Prometheus, float],
) -> None:
    prometheus, started = scraped
    groups = prometheus.get("/api/v1/rules")["groups"]
    evaluated = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(evaluated) == {r.record for r in rules.recordings(rules.NATIVE)} | {
        a.name for a in rules.ALERTS
    }
    assert all(r["health"] == "ok" for r in evaluated.values()), [
        r for r in evaluated.values() if r["health"] != "ok"
    ]
    for recording in rules.recordings(rules.NATIVE):
        assert has_data(prometheus.query_range(recording.expr, started, time.time())), recording.expr
        assert has_data(prometheus.query_range(recording.record, started, time.time())), recording.record


def test_every_alert_signal_returns_data(scraped: tuple[support.Prometheus, float]) -> None:
    prometheus, started = scraped
    for alert in rules.ALERTS:
        assert has_data(prometheus.query_range(alert.signal, started, time.time())), alert.name
        prometheus.query_range(alert.expr, started, time.time())  # evaluates without error


def test_alerts_hold_where_the_data_says_they_should(scraped: tuple[support.Prometheus, float]) -> None:
    """Evaluated as at the end of the run (their `for` aside): the replayed cautious engine leaves a large gap,
    engine 1 lost a batch, and the engine vLLM reports on is mirrored, so `no events` stays quiet."""
    prometheus, _ = scraped

    def engines(name: str) -> set[tuple[str, str]]:
        expr = next(a.expr for a in rules.ALERTS if a.name == name)
        return {(r["metric"]["model_name"], r["metric"]["engine"]) for r in prometheus.query(expr)}

    assert (REPLAY_MODEL, "0") in engines("VllmShadowGapSustained")
    assert {engine for _, engine in engines("VllmShadowLosingEvents")} == {"1"}
    assert engines("VllmShadowNoEvents") == set()
    assert engines("VllmShadowFidelityDegraded") == set()  # the real streams' self replay matches every step
