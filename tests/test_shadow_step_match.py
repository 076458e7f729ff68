"""The step comparison finds every kind of divergence (so a 100% match means something)."""

from __future__ import annotations

from vllm_shadow.adapters.events import EngineStep
from vllm_shadow.evaluation.step_match import compare_steps

REAL = [
    EngineStep(0, 0.0, 0.01, {"a": 100, "b": 50}),
    EngineStep(1, 0.01, 0.0, {}),  # an empty step: not a scheduling decision
    EngineStep(2, 0.02, 0.01, {"a": 1, "b": 1}),
    EngineStep(3, 0.03, 0.01, {"a": 1}, preempted=("b",)),
]


def _sim(*steps: tuple[dict[str, int], tuple[str, ...]]) -> list[EngineStep]:
    return [EngineStep(i, 0.0, 0.01, tokens, preempted) for i, (tokens, preempted) in enumerate(steps)]


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


def test_a_mismatch_says_what_each_side_ran() -> None:
    """The first mismatch of a window, as the shadow reports it, names both batches and both victims."""
    diverged = compare_steps(REAL, _sim(({"a": 100, "b": 50}, ()), ({"a": 1, "b": 1}, ()), ({"a": 1}, ())))
    assert diverged.first_mismatch is not None
    assert diverged.first_mismatch.describe() == (
        "step 2: engine ran {'a': 1} preempting ['b']; replay ran {'a': 1} preempting []"
    )
    short = compare_steps(REAL, _sim(({"a": 100, "b": 50}, ())))
    assert short.first_mismatch is not None
    assert short.first_mismatch.describe() == (
        "step 1: engine ran {'a': 1, 'b': 1} preempting []; replay ran nothing preempting []"
    )
