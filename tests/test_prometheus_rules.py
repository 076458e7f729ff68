"""promtool on the rule files, their unit tests, the scrape config, and the exporter's exposition."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.generate import RULES_DIR
from deploy.prometheus import rules
from tests import deploy_support, shadow_support
from tests.waiting import drain
from vllm_shadow.readout.exporter import exposition
from vllm_shadow.runtime.core import ShadowConfig, ShadowCore
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.tracking.windows import WindowRules

PROMETHEUS = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


def promtool(*args: str, cwd: Path = PROMETHEUS) -> str:
    binary = deploy_support.require("promtool")
    done = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.parametrize("flavour", rules.FLAVOURS, ids=lambda f: f.name)
def test_rule_files_pass_promtool_check(flavour: rules.Flavour) -> None:
    count = len(rules.recordings(flavour)) + len(rules.ALERTS)
    assert f"SUCCESS: {count} rules found" in promtool("check", "rules", str(RULES_DIR / flavour.filename))


def test_alert_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("test", "rules", "vllm-shadow.test.yml", cwd=PROMETHEUS / "tests")


def test_every_alert_is_unit_tested_both_firing_and_quiet() -> None:
    cases = yaml.safe_load((PROMETHEUS / "tests" / "vllm-shadow.test.yml").read_text())["tests"]
    checks = [c for case in cases for c in case.get("alert_rule_test", [])]
    for alert in rules.ALERTS:
        outcomes = {bool(c["exp_alerts"]) for c in checks if c["alertname"] == alert.name}
        assert outcomes == {True, False}, alert.name


def test_ray_rules_read_ray_names_and_record_the_same_series() -> None:
    native, ray = (yaml.safe_load((RULES_DIR / f.filename).read_text()) for f in rules.FLAVOURS)
    records = [[r.get("record") for g in doc["groups"] for r in g["rules"]] for doc in (native, ray)]
    assert records[0] == records[1]
    ray_exprs = " ".join(r["expr"] for g in ray["groups"] for r in g["rules"] if "record" in r)
    assert (
        "ray_vllm_shadow_simulated_gpu_seconds_total" in ray_exprs
        and "ray_vllm_request_success_total" in ray_exprs
    )
    assert " vllm_shadow_" not in ray_exprs and "vllm:" not in ray_exprs


def test_scrape_config_is_valid() -> None:
    assert "is valid prometheus config file syntax" in promtool("check", "config", "prometheus.yml")


def test_exporter_output_passes_promtool_check_metrics() -> None:
    """The shadow's exposition after evaluating the recorded real stream: every family present, names lint-clean."""
    core = ShadowCore(ShadowConfig(windows=WindowRules(seconds=1.0), hardware="cpu"), LocalTasks(1))
    for batch in shadow_support.batches("fcfs-kv12"):
        core.ingest(batch)
    drain(core)
    text = exposition(core.snapshot())
    assert "vllm_shadow_window_gap_ratio{" in text and "vllm_shadow_self_replay_step_match_ratio{" in text
    binary = deploy_support.require("promtool")
    done = subprocess.run(
        [binary, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
