"""The recompute-preemption victim: vLLM's newest running request, or least-computed-first (vLLM RFC #54644)."""

from __future__ import annotations

import dataclasses

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.traces import read_trace, resolve_trace
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.optimal import run_heuristics
from vllm_shadow.solver.policies import PRESETS, parse_policy
from vllm_shadow.solver.problem import EngineLimits, Objective, Window
from vllm_shadow.solver.simulator import simulate

COST = LinearCostModel(a=0.01, b=1e-4, c=1e-6)
LEAST_COMPUTED = dataclasses.replace(PRESETS["vllm"], victim="least-computed")


def first_victims(policy) -> tuple[str, ...]:
    """A short request admitted first and a long one after it: when their decodes run out of KV (10 usable
    blocks of 4 tokens, 6 + 8 needed at the end), vLLM pops the newest (the long one); least-computed-first
    picks the short one, the cheaper to recompute, which here is the request that needed the block."""
    arrivals = [RequestArrival("short", 0.0, 2, 20), RequestArrival("long", 0.0, 12, 20)]
    result = simulate(arrivals, policy, COST, num_kv_blocks=11, block_size=4, record_steps=True)
    return next(tuple(step.preempted) for step in result.steps or [] if step.preempted)


def test_the_victim_is_the_newest_by_default_and_the_least_computed_with_the_knob() -> None:
    assert first_victims(PRESETS["vllm"]) == ("long",)
    assert first_victims(LEAST_COMPUTED) == ("short",)


def test_the_knob_parses_and_is_named_in_the_label() -> None:
    policy = parse_policy("vllm(victim=least-computed)")
    assert policy == LEAST_COMPUTED and str(policy) == "vllm(victim=least-computed)"
    assert PRESETS["vllm"].victim == "newest" and str(PRESETS["vllm"]) == "vllm"


def test_the_default_victim_replays_step_for_step_as_before_and_both_schedules_are_feasible() -> None:
    """Under KV pressure (a window whose requests cannot all hold KV at once): the explicit default equals the
    preset step for step (the fast path keeps its tail victims); least-computed-first preempts differently,
    and the verifier accepts both schedules."""
    trace = read_trace(resolve_trace("azure-conv"), limit=24, rate_scale=8, max_prompt_tokens=1024)
    window = Window.from_arrivals(trace.requests, EngineLimits(kv_blocks=200, block_size=16))
    default, explicit, least = run_heuristics(
        window, COST, Objective(), ["vllm", "vllm(victim=newest)", "vllm(victim=least-computed)"]
    )
    assert default.schedule == explicit.schedule and default.preemptions > 0
    assert default.replay.feasible and least.replay.feasible
    assert least.schedule != default.schedule


def test_without_kv_pressure_the_knob_changes_nothing() -> None:
    trace = read_trace(resolve_trace("azure-conv"), limit=24)
    window = Window.from_arrivals(trace.requests, EngineLimits(kv_blocks=4000, block_size=16))
    default, least = run_heuristics(window, COST, Objective(), ["vllm", "vllm(victim=least-computed)"])
    assert default.preemptions == 0 and least.schedule == default.schedule
