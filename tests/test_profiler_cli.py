"""`shadow profile` run as a user runs it, the profile it writes used by `shadow replay --cost-profile`, and
the profile shipped for the tiny model."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from vllm_shadow import costmodel
from vllm_shadow.cli.main import main
from vllm_shadow.costmodel.linear import batch_features, fit_linear
from vllm_shadow.costmodel.profile import load_profile

SHIPPED = Path(str(resources.files("vllm_shadow.costmodel") / "data" / "profiles" / "tiny-llama-cpu.json"))
SMALL_GRID = ["--max-batched-tokens", "128", "--max-context", "256", "--max-decodes", "8"]


def _replay_gpu_seconds(capsys, *extra: str) -> list[float]:
    argv = ["replay", "azure-conv", "--limit", "40", "--model", "tiny-llama", "--gpu", "cpu"]
    assert main([*argv, "--policies", "vllm,sarathi", "--json", *extra]) == 0
    return [row["gpu_seconds"] for row in json.loads(capsys.readouterr().out)]


def test_without_torch_the_command_says_how_to_install_it(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail as if it were not installed
    for name in [m for m in sys.modules if m.startswith("vllm_shadow.costmodel.profiling")]:
        monkeypatch.delitem(sys.modules, name)  # imported by an earlier test: import it afresh, without torch
    monkeypatch.delattr(costmodel, "profiling", raising=False)
    out = tmp_path / "profile.json"
    assert main(["profile", "--model", "tiny-llama", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "needs torch" in error and "pip install 'vllm-shadow[shadow,profile]'" in error
    assert not out.exists()


def test_profile_writes_a_profile_that_replay_uses(capsys, tmp_path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "tiny.json"
    argv = ["profile", "--model", "tiny-llama", "--device", "cpu", "--layers", "2", "--out", str(out)]
    assert main([*argv, *SMALL_GRID, "--warmup", "1", "--repeats", "3"]) == 0
    report = capsys.readouterr().out
    for kind in ("prefill-heavy", "decode-heavy", "mixed", "all"):
        assert f"│ {kind}" in report
    assert "linear hold-out MAPE" in report and "roofline prior (CPU-2core) MAPE" in report
    assert "--layers 2" in report  # the provenance names the command that reproduces the profile

    profile = load_profile(out)
    assert (profile.model, profile.hardware, profile.tp) == ("tiny-llama", "CPU-2core", 1)
    assert profile.holdout_mape < 0.30  # see test_profiler.py for the bound

    measured = _replay_gpu_seconds(capsys, "--cost-profile", str(out))
    prior = _replay_gpu_seconds(capsys)
    for with_profile, with_prior in zip(measured, prior, strict=True):
        assert abs(with_profile - with_prior) > 0.05 * with_prior


def test_profile_refuses_what_it_cannot_measure(capsys, tmp_path) -> None:
    pytest.importorskip("torch")
    assert main(["profile", "--model", "mixtral-8x7b", "--out", str(tmp_path / "moe.json"), *SMALL_GRID]) == 2
    assert "mixture of experts" in capsys.readouterr().err
    assert main(["profile", "--model", "tiny-llama", "--out", str(tmp_path / "missing" / "p.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_model_too_big_for_the_hardware_is_profiled_without_a_prior(capsys, tmp_path) -> None:
    """Profiling builds a few layers, so it runs where the whole model would not fit (Llama-3-70B on one
    H100); the roofline prior, which sizes the KV cache of the whole model, is then left out, with the why."""
    pytest.importorskip("torch")
    config = json.loads(
        (resources.files("vllm_shadow.costmodel") / "data" / "models" / "tiny-llama.json").read_text()
    )
    config["num_hidden_layers"] = 40_000  # 29 billion parameters: more than the CPU entry's memory
    (tmp_path / "huge").mkdir()
    (tmp_path / "huge" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "huge.json"
    argv = ["profile", "--model", str(tmp_path / "huge"), "--layers", "1", "--out", str(out), *SMALL_GRID]
    assert main([*argv, "--warmup", "0", "--repeats", "1"]) == 0
    captured = capsys.readouterr()
    assert "no roofline prior to compare with" in captured.err
    assert "1 of 40000 decoder layers" in captured.out and "│ all" in captured.out
    assert load_profile(out).model == "huge"


def test_shipped_tiny_llama_profile_is_its_own_evidence() -> None:
    """The shipped CPU profile loads, says where it came from, and its coefficients are the fit of the
    measurements it carries (refitted here without torch), with the per-request term: each request's row of
    the tiny model's 32000 x 256 LM head costs about as much on a CPU core as eight tokens through its layers."""
    profile = load_profile(SHIPPED)
    assert (profile.model, profile.hardware, profile.tp) == ("tiny-llama", "CPU-2core", 1)
    assert profile.samples >= 80 and profile.holdout_mape < 0.15
    assert "shadow profile --model tiny-llama --device cpu" in profile.provenance
    assert profile.cost.e > 5 * profile.cost.b

    data = json.loads(SHIPPED.read_text())
    batches = [
        [(new, ctx) for new, ctx, count in m["requests"] for _ in range(count)] for m in data["measurements"]
    ]
    features = np.array([batch_features([n for n, _ in b], [c for _, c in b]) for b in batches], dtype=float)
    times = np.array([m["seconds"] for m in data["measurements"]])
    assert len(times) == profile.samples
    assert {m["kind"] for m in data["measurements"]} == {"prefill-heavy", "decode-heavy", "mixed"}
    refitted = fit_linear(features, times)
    for name, value in profile.cost.to_dict().items():
        assert getattr(refitted, name) == pytest.approx(value, rel=1e-3, abs=1e-12)
    by_kind = {row["kind"]: row for row in data["validation"]}
    assert by_kind["all"]["holdout_mape"] == pytest.approx(profile.holdout_mape)
    assert by_kind["all"]["without_request_term_holdout_mape"] > 1.5 * profile.holdout_mape


def test_replay_with_the_shipped_profile_differs_from_the_roofline_prior(capsys) -> None:
    measured = _replay_gpu_seconds(capsys, "--cost-profile", str(SHIPPED))
    prior = _replay_gpu_seconds(capsys)
    for with_profile, with_prior in zip(measured, prior, strict=True):
        assert abs(with_profile - with_prior) > 0.05 * with_prior
