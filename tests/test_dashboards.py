"""The checked-in dashboards are what the generator writes, and hold together as Grafana dashboards; every
shadow metric a dashboard or rule names is one the metric table declares."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from deploy import generate
from deploy.generate import DASHBOARD_DIR, DASHBOARDS
from vllm_shadow.readout import metric_table

BOARDS = sorted(DASHBOARDS)


def load(name: str) -> dict:
    return json.loads((DASHBOARD_DIR / name).read_text())


def targets(board: dict) -> list[tuple[dict, dict]]:
    return [(panel, target) for panel in board["panels"] for target in panel.get("targets", [])]


def test_checked_in_files_are_what_the_generator_writes() -> None:
    assert generate.stale() == [], "run `python -m deploy.generate` and commit the result"


def test_the_check_notices_a_hand_edited_dashboard(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    edited = tmp_path / "grafana" / "dashboards"
    edited.mkdir(parents=True)
    for name in BOARDS:
        (edited / name).write_text((DASHBOARD_DIR / name).read_text())
    board = load(BOARDS[0])
    board["panels"][1]["title"] = "edited by hand"
    (edited / BOARDS[0]).write_text(json.dumps(board))
    monkeypatch.setattr(generate, "DASHBOARD_DIR", edited)
    monkeypatch.setattr(generate, "ROOT", tmp_path)
    assert [p.name for p in generate.stale()] == [BOARDS[0]]
    assert generate.main(["--check"]) == 1


@pytest.mark.parametrize("name", BOARDS)
def test_panels_have_unique_ids_and_every_query_a_ref_id_and_the_datasource_variable(name: str) -> None:
    board = load(name)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(set(ids)) == len(ids) and 0 not in ids
    assert board["uid"] == name.removesuffix(".json")
    for panel, _ in targets(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs) and all(refs), panel["title"]


@pytest.mark.parametrize("name", BOARDS)
def test_variables_select_data_source_prefixes_model_and_engine(name: str) -> None:
    variables = {v["name"]: v for v in load(name)["templating"]["list"]}
    assert list(variables) == ["datasource", "metrics", "vllm", "model_name", "engine"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["metrics"]["query"] == "direct : vllm_shadow_,ray : ray_vllm_shadow_"
    assert variables["vllm"]["query"] == "direct : vllm:,ray : ray_vllm_"


@pytest.mark.parametrize("name", BOARDS)
def test_queries_name_metrics_only_through_the_prefix_variables(name: str) -> None:
    """A hard-coded `vllm_shadow_` or `vllm:` name would break the dashboard for the Ray-scraped form."""
    for panel, target in targets(load(name)):
        expr = target["expr"]
        assert not re.search(r"(?<![{$\w])(vllm_shadow_|ray_vllm|vllm:)", expr), (panel["title"], expr)
        engine_series = re.findall(r"\$\{(?:metrics|vllm)\}(\w+)\{([^}]*)\}", expr)
        for metric, matchers in engine_series:
            assert 'engine=~"$engine"' in matchers, (panel["title"], metric)


def test_the_vllm_joins_are_on_model_name_and_engine() -> None:
    joins = [t["expr"] for _, t in targets(load("vllm-shadow-engine.json")) if "${vllm}" in t["expr"]]
    assert len(joins) >= 4
    assert any("${metrics}" in expr and "on(model_name, engine)" in expr for expr in joins)


# ---- every metric named is declared ------------------------------------------------------------------------------

# A shadow series name after its prefix: word characters, and the `(a|b)` alternations of a `__name__=~` regex.
_NAME = r"((?:\w|\([\w|]+\))+)"
_VARIABLE = re.compile(r"\$\{metrics\}" + _NAME)  # a dashboard's, for either scrape
_LITERAL = re.compile(r"(?<![\w:$])(ray_)?vllm_shadow_" + _NAME)  # a rule file's (never a recorded `x:y:z`)
PROMETHEUS = metric_table.prometheus_series()
RAY = metric_table.ray_series()


def _expand(pattern: str) -> list[str]:
    """`a_(b|c)` -> [`a_b`, `a_c`]."""
    parts = re.split(r"\(([\w|]+)\)", pattern)
    options = [part.split("|") if i % 2 else [part] for i, part in enumerate(parts)]
    return ["".join(choice) for choice in itertools.product(*options)]


def undeclared(text: str) -> list[str]:
    """The shadow series `text` names that the table does not declare. A `${metrics}` name serves both scrapes,
    so it must exist directly and through Ray (an alternation in at least one of its forms, and each of its
    alternatives in one scrape or the other); a literal name must exist in its own scrape."""
    bad = []
    for pattern in _VARIABLE.findall(text):
        names = _expand(pattern)
        if not any("vllm_shadow_" + n in PROMETHEUS for n in names):
            bad.append("vllm_shadow_" + pattern)
        if not any("ray_vllm_shadow_" + n in RAY for n in names):
            bad.append("ray_vllm_shadow_" + pattern)
        bad += [
            n for n in names if "vllm_shadow_" + n not in PROMETHEUS and "ray_vllm_shadow_" + n not in RAY
        ]
    for ray, pattern in _LITERAL.findall(text):
        declared = RAY if ray else PROMETHEUS
        bad += [f"{ray}vllm_shadow_{n}" for n in _expand(pattern) if f"{ray}vllm_shadow_{n}" not in declared]
    return bad


def generated_and_tested_files() -> dict[Path, str]:
    files = generate.generated()
    tests = generate.ROOT / "prometheus" / "tests" / "vllm-shadow.test.yml"
    return files | {tests: tests.read_text()}


@pytest.mark.parametrize("path", sorted(generated_and_tested_files()), ids=lambda p: p.name)
def test_every_shadow_metric_a_dashboard_or_rule_names_is_declared(path: Path) -> None:
    text = generated_and_tested_files()[path]
    assert _VARIABLE.search(text) or _LITERAL.search(text), "no shadow metric found: the patterns are stale"
    assert undeclared(text) == []


def test_an_undeclared_name_is_caught_in_either_form() -> None:
    assert undeclared("rate(${metrics}windows_skipped_total[5m])") == []
    assert undeclared('{__name__=~"${metrics}evaluation_seconds_(sum|total)"}') == []
    assert undeclared("${metrics}windows_dropped_total") == [
        "vllm_shadow_windows_dropped_total",
        "ray_vllm_shadow_windows_dropped_total",
        "windows_dropped_total",
    ]
    # The histogram's `_sum` exists only directly: a dashboard naming it alone breaks the Ray form.
    assert undeclared("${metrics}evaluation_seconds_sum") == ["ray_vllm_shadow_evaluation_seconds_sum"]
    # An alternation must find its series in both forms, and each alternative must exist in one of them.
    assert undeclared('{__name__=~"${metrics}evaluation_seconds_(sum|mean)"}') == [
        "ray_vllm_shadow_evaluation_seconds_(sum|mean)",
        "evaluation_seconds_mean",
    ]
    assert undeclared("ray_vllm_shadow_evaluation_seconds_count > vllm_shadow_evaluations_total") == [
        "ray_vllm_shadow_evaluation_seconds_count",
        "vllm_shadow_evaluations_total",
    ]
    assert undeclared("engine:vllm_shadow_gpu_gap_best:ratio_rate30m") == []  # a recorded series, not ours
