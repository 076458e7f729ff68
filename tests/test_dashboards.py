"""The checked-in dashboards are what the generator writes, and hold together as Grafana dashboards."""

from __future__ import annotations

import json
import re

import pytest

from deploy import generate
from deploy.generate import DASHBOARD_DIR, DASHBOARDS

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
