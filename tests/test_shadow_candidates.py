"""The candidate grid: around the engine's own settings, valid for vLLM, bounded, current configuration first."""

from __future__ import annotations

import dataclasses

import pytest

from vllm_shadow.adapters.events import SchedulerSettings
from vllm_shadow.evaluation.candidates import SearchSpace, build_candidates, current_policy, flag_changes
from vllm_shadow.solver.policies import parse_policy

SETTINGS = SchedulerSettings(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=2048)


def test_the_current_configuration_comes_first_and_is_what_the_engine_runs() -> None:
    candidates = build_candidates(SETTINGS)
    current = candidates[0]
    assert current.actionable and current.policy == current_policy(SETTINGS)
    assert (current.policy.max_num_seqs, current.policy.max_num_batched_tokens) == (8, 512)
    assert parse_policy(current.label) == current.policy  # labels are canonical spellings


def test_the_default_grid_has_about_twenty_unique_candidates() -> None:
    candidates = build_candidates(SETTINGS)
    labels = [c.label for c in candidates]
    assert len(labels) == len(set(labels)) == 21
    seqs = {c.policy.max_num_seqs for c in candidates if c.policy.preset == "vllm"}
    assert seqs == {4, 8, 16, 32}
    # Least-computed-first victims (vLLM RFC #54644): shown, not actionable until vLLM exposes the choice.
    (victim,) = [c for c in candidates if c.policy.victim == "least-computed"]
    assert not victim.actionable
    assert victim.policy == dataclasses.replace(candidates[0].policy, victim="least-computed")
    # Other schedulers appear for reference, never as recommendations.
    assert {c.policy.preset for c in candidates if not c.actionable and c is not victim} == {
        "sarathi",
        "orca",
        "lightllm",
        "sjf",
        "no-eviction",
    }


def test_candidates_vllm_would_refuse_are_left_out() -> None:
    settings = SchedulerSettings(max_num_seqs=256, max_num_batched_tokens=512, max_model_len=4096)
    candidates = build_candidates(settings, SearchSpace(max_num_seqs_factors=(1, 4)))
    for c in candidates:
        if c.actionable:
            assert c.policy.max_num_batched_tokens >= c.policy.max_num_seqs
            assert c.policy.chunked_prefill or c.policy.max_num_batched_tokens >= 4096
    assert not any(c.actionable and not c.policy.chunked_prefill for c in candidates)


def test_the_grid_is_bounded() -> None:
    space = SearchSpace(max_num_seqs_factors=tuple(range(1, 40)), max_candidates=25)
    assert len(build_candidates(SETTINGS, space)) == 25


def test_priority_engines_get_fcfs_as_the_alternative_and_keep_their_admission_rules() -> None:
    settings = SchedulerSettings(policy="priority", scheduler_reserve_full_isl=False, watermark=0.01)
    candidates = build_candidates(settings)
    orders = {c.policy.order for c in candidates if c.actionable}
    assert orders == {"priority", "fcfs"}
    assert all(
        c.policy.admission == "chunk" and c.policy.watermark == 0.01 for c in candidates if c.actionable
    )


def test_flag_changes_name_only_what_differs() -> None:
    current = current_policy(SETTINGS)
    candidate = parse_policy(
        "vllm(max_num_seqs=16,max_num_batched_tokens=512,long_prefill_token_threshold=128)"
    )
    assert flag_changes(current, candidate) == ["--max-num-seqs 16", "--long-prefill-token-threshold 128"]
    assert flag_changes(current, current) == []


@pytest.mark.parametrize("caching", [True, False])
def test_the_grid_tries_the_engine_s_settings_with_prefix_caching_flipped(caching: bool) -> None:
    settings = SchedulerSettings(max_num_seqs=8, max_num_batched_tokens=512, enable_prefix_caching=caching)
    candidates = build_candidates(settings)
    current = candidates[0].policy
    (flipped,) = [c for c in candidates if c.policy.enable_prefix_caching != caching and c.actionable]
    assert flipped.policy == dataclasses.replace(current, enable_prefix_caching=not caching)
    assert ("enable_prefix_caching=true" in flipped.label) == (not caching)  # the label says it
    # vLLM's default is on: turning it off takes the explicit flag, turning it on the plain one.
    expected = "--enable-prefix-caching" if not caching else "--no-enable-prefix-caching"
    assert flag_changes(current, flipped.policy) == [expected]
    # Reference schedulers keep the engine's caching where they can (those reserving blocks at admission, as
    # no-eviction and Orca do, cannot), so that they differ from the engine in scheduling only.
    presets = {c.policy.preset: c.policy.enable_prefix_caching for c in candidates if not c.actionable}
    assert presets == {p: caching and p not in ("no-eviction", "orca") for p in presets}


def test_extra_specs_are_checked_when_the_space_is_configured() -> None:
    with pytest.raises(ValueError):
        SearchSpace(extra=("vllm(max_num_seq=3)",))
    with pytest.raises(ValueError):
        SearchSpace(presets=("nonesuch",))
    extra = build_candidates(SETTINGS, SearchSpace(extra=("vllm(max_num_seqs=1000)",)))
    assert extra[-1].label == "vllm(max_num_seqs=1000)"


@pytest.mark.parametrize(
    "settings",
    [
        SETTINGS,
        SchedulerSettings(policy="priority", long_prefill_token_threshold=64, enable_chunked_prefill=False),
        SchedulerSettings(scheduler_reserve_full_isl=False, watermark=0.01),
    ],
)
def test_the_current_policy_carries_every_setting_the_engine_reports(settings: SchedulerSettings) -> None:
    """The self replay (and tests/fidelity's replay of real engines) runs this policy: every scheduler setting
    the engine announces must reach it, and its label must spell it back."""
    policy = current_policy(settings)
    assert (policy.preset, policy.order, policy.max_num_seqs, policy.max_num_batched_tokens) == (
        "vllm",
        settings.policy,
        settings.max_num_seqs,
        settings.max_num_batched_tokens,
    )
    assert (
        policy.long_prefill_token_threshold,
        policy.watermark,
        policy.admission,
        policy.chunked_prefill,
    ) == (
        settings.long_prefill_token_threshold,
        settings.watermark,
        "full-prompt" if settings.scheduler_reserve_full_isl else "chunk",
        settings.enable_chunked_prefill,
    )
    assert parse_policy(str(policy)) == policy
