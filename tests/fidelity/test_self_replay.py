"""The step comparison finds every kind of divergence (so a 100% match means something)."""

from __future__ import annotations

from self_replay import compare_steps, policy_spec

from vllm_shadow.adapters.events import EngineStep, SchedulerSettings
from vllm_shadow.solver.policies import parse_policy
from vllm_shadow.solver.records import StepRecord

REAL = [
    EngineStep(0, 0.0, 0.01, {"a": 100, "b": 50}),
    EngineStep(1, 0.01, 0.0, {}),  # an empty step: not a scheduling decision
    EngineStep(2, 0.02, 0.01, {"a": 1, "b": 1}),
    EngineStep(3, 0.03, 0.01, {"a": 1}, preempted=("b",)),
]


def _sim(*steps: tuple[dict[str, int], tuple[str, ...]]) -> list[StepRecord]:
    return [StepRecord(i, 0.0, 0.01, tokens, preempted) for i, (tokens, preempted) in enumerate(steps)]


def test_identical_runs_match_and_empty_real_steps_are_skipped() -> None:
    result = compare_steps(REAL, _sim(({"b": 50, "a": 100}, ()), ({"a": 1, "b": 1}, ()), ({"a": 1}, ("b",))))
    assert (result.matched, result.match_ratio, result.mismatches) == (3, 1.0, [])


def test_each_kind_of_divergence_is_reported() -> None:
    result = compare_steps(
        REAL,
        _sim(({"a": 100, "b": 40}, ()), ({"a": 1}, ()), ({"a": 1}, ()), ({"a": 1}, ())),
    )
    assert [m.kinds for m in result.mismatches] == [
        ("tokens",),
        ("membership",),
        ("preemption",),
        ("extra-in-sim",),
    ]
    assert result.matched == 0 and result.match_ratio == 0.0
    assert "first mismatch at step 0 (tokens)" in result.describe()


def test_a_short_simulation_is_a_mismatch() -> None:
    result = compare_steps(REAL, _sim(({"a": 100, "b": 50}, ())))
    assert result.matched == 1 and [m.kinds for m in result.mismatches] == [("missing-in-sim",)] * 2


def test_policy_spec_carries_every_setting_the_engine_reports() -> None:
    settings = SchedulerSettings(
        policy="priority",
        max_num_seqs=8,
        max_num_batched_tokens=512,
        long_prefill_token_threshold=64,
        watermark=0.01,
        scheduler_reserve_full_isl=False,
        enable_chunked_prefill=False,
    )
    policy = parse_policy(policy_spec(settings))
    assert (policy.preset, policy.order, policy.max_num_seqs, policy.max_num_batched_tokens) == (
        "vllm",
        "priority",
        8,
        512,
    )
    assert (
        policy.long_prefill_token_threshold,
        policy.watermark,
        policy.admission,
        policy.chunked_prefill,
    ) == (
        64,
        0.01,
        "chunk",
        False,
    )
