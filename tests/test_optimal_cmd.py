"""`shadow optimal`: the JSON report, the tables, and the plot, on a small window."""

from __future__ import annotations

import json

from vllm_shadow.cli.main import main

WINDOW = ["azure-code", "--limit", "10", "--gpu", "a10g", "--kv-blocks", "300", "--max-prompt-tokens", "2000"]


def test_json_report(capsys):
    assert (
        main(["optimal", *WINDOW, "--time-limit", "5", "--json", "--policies", "vllm,sjf,no-eviction"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "OPTIMAL"
    assert report["requests"] == 10
    assert report["kv_blocks"] == 299  # vLLM's count less its null block
    assert report["cost_model"]["d"] == 0.0  # refitted without d, so that the bound is exact
    assert set(report["heuristics"]) == {"vllm", "sjf", "no-eviction"}
    assert report["bound"] <= report["objective"] <= min(report["heuristics"].values())
    assert report["gap"] < 1e-6  # proven; what remains is the integer model rounding costs down
    assert report["bound_scope"].startswith("every schedule")


def test_latency_objective_without_eviction_in_tables(capsys):
    args = ["optimal", *WINDOW, "--limit", "4", "--objective", "mix:gpu=1,e2e=0.5", "--no-eviction"]
    assert main([*args, "--time-limit", "5", "--policies", "vllm,sarathi"]) == 0
    out = capsys.readouterr().out
    assert "optimal schedule" in out and "heuristics on the same window" in out
    assert "never pause" in out  # latency terms: the bound is over run-form schedules, and says so


def test_plot(tmp_path):
    path = tmp_path / "schedule.png"
    assert main(["optimal", *WINDOW, "--time-limit", "5", "--policies", "vllm", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_objective_is_reported(capsys):
    assert main(["optimal", *WINDOW, "--objective", "makespan"]) == 2
    assert "unknown objective" in capsys.readouterr().err
