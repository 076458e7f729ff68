"""The schedule verifier: it agrees with the simulator on what heuristics do, and rejects every broken rule."""

from __future__ import annotations

import dataclasses
import re

import pytest

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.problem import EngineLimits, Window, WindowRequest
from vllm_shadow.solver.schedule import (
    Batch,
    InfeasibleSchedule,
    Schedule,
    replay,
    schedule_from_steps,
    verify,
)
from vllm_shadow.solver.simulator import simulate

COST = LinearCostModel(a=1.0, b=0.1, c=0.01, d=0.001)


def window(kv_blocks: int = 8, **limits: int) -> Window:
    requests = (WindowRequest("a", 0.0, 3, 2), WindowRequest("b", 1.0, 2, 3))
    return Window(requests, EngineLimits(kv_blocks=kv_blocks, block_size=2, **limits))


# Prefill both (a emits 1, b emits 1), decode both (a done), decode b (b done).
GOOD = Schedule((Batch({"a": 3, "b": 2}), Batch({"a": 1, "b": 1}), Batch({"b": 1})))


def test_hand_computed_costs_and_times():
    result = verify(GOOD, window(), COST)
    # batch 0: T=5, K=3+2=5, P=3*3+2*2=13; batch 1: T=2, K=4+3=7; batch 2: T=1, K=4.
    durations = [1 + 0.5 + 0.05 + 0.013, 1 + 0.2 + 0.07, 1 + 0.1 + 0.04]
    assert [b.duration for b in result.batches] == pytest.approx(durations)
    assert result.batches[0].start == 1.0  # waits for b's arrival
    assert result.finish["a"] == pytest.approx(1.0 + sum(durations[:2]))
    assert result.first_token["b"] == pytest.approx(1.0 + durations[0])
    assert result.gpu_seconds == pytest.approx(sum(durations))
    # a: 3 + 1 tokens = 2 blocks after batch 1; b: 3 tokens = 2 blocks.
    assert [b.kv_blocks for b in result.batches] == [2 + 1, 2 + 2, 2]
    assert result.recomputed_tokens == 0


def test_eviction_recomputes_prompt_and_emitted_tokens():
    schedule = Schedule(
        (
            Batch({"a": 3}),  # a emits token 1
            Batch({"b": 2}, evicted=("a",)),  # a dropped: KV 0, must recompute 3 + 1 tokens
            Batch({"a": 4, "b": 1}),  # a's recompute emits its token 2: done
            Batch({"b": 1}),
        )
    )
    result = verify(schedule, window(), COST)
    assert result.evictions == {"a": 1, "b": 0}
    assert result.recomputed_tokens == 3
    assert result.batches[2].tokens == 5


@pytest.mark.parametrize(
    ("schedule", "limits", "message"),
    [
        (GOOD, {"kv_blocks": 3}, "KV blocks"),
        (Schedule(GOOD.batches[:2]), {}, "emits 2 of 3"),
        (Schedule(GOOD.batches, starts=(0.5, 3.0, 5.0)), {}, "before"),
        (Schedule(GOOD.batches, starts=(1.0, 1.5, 9.0)), {}, "before"),  # overlaps the previous batch
        (Schedule((Batch({"a": 3, "b": 2}), Batch({"a": 2, "b": 1}), Batch({"b": 1}))), {}, "needs 1..1"),
        (
            Schedule((Batch({"a": 3, "b": 2}), Batch({"a": 1, "b": 1}), Batch({"a": 1, "b": 1}))),
            {},
            "already",
        ),
        (Schedule((Batch({"b": 2}, evicted=("a",)), *GOOD.batches)), {}, "holds no KV"),
        (Schedule((*GOOD.batches, Batch({}))), {}, "empty"),
        (Schedule((Batch({"x": 1}), *GOOD.batches)), {}, "unknown"),
        (GOOD, {"max_num_batched_tokens": 4}, "budget"),
        (GOOD, {"max_num_seqs": 1}, "cap"),
    ],
)
def test_rejects_broken_rules(schedule, limits, message):
    base = window()
    w = dataclasses.replace(base, limits=dataclasses.replace(base.limits, **limits))
    with pytest.raises(InfeasibleSchedule, match=re.escape(message)):
        verify(schedule, w, COST)
    assert not replay(schedule, w, COST).feasible


def test_running_request_continues_from_its_kv():
    running = WindowRequest("r", -5.0, 4, 3, computed_tokens=4, generated_tokens=1)  # decoding, holds 4
    w = Window((running,), EngineLimits(kv_blocks=4, block_size=2), start=0.0)
    result = verify(Schedule((Batch({"r": 1}), Batch({"r": 1}))), w, COST)
    assert result.finish["r"] == pytest.approx(2 + 0.2 + 0.01 * (5 + 6))
    assert result.mean_e2e == pytest.approx(result.finish["r"] + 5.0)
    assert result.first_token == {}  # its first token is history
    with pytest.raises(InfeasibleSchedule, match=re.escape("needs 1..1")):
        verify(Schedule((Batch({"r": 2}),)), w, COST)


@pytest.mark.parametrize(
    "policy", ["vllm", "vllm-v0", "sarathi", "orca", "fastertransformer", "lightllm", "sof"]
)
def test_simulated_heuristics_replay_exactly(policy):
    """The verifier and the simulator are independent readings of the same rules: on a window under memory
    pressure (with preemptions) they must agree on every batch time and every finish."""
    arrivals = [RequestArrival(f"r{i}", 0.05 * i, 20 + 7 * (i % 5), 5 + 3 * (i % 7)) for i in range(24)]
    cost = LinearCostModel(a=0.01, b=1e-4, c=1e-6, d=1e-8)
    w = Window.from_arrivals(arrivals, EngineLimits(kv_blocks=24, block_size=4))
    sim = simulate(arrivals, policy, cost, num_kv_blocks=25, block_size=4, record_steps=True)
    result = verify(schedule_from_steps(sim.steps), w, cost)
    assert result.gpu_seconds == pytest.approx(sim.gpu_seconds, rel=1e-12)
    assert sum(result.evictions.values()) == sim.summary()["preemptions"]
    for record in sim.requests:
        assert result.finish[record.request_id] == pytest.approx(record.finish, rel=1e-12)
        assert result.first_token[record.request_id] == pytest.approx(record.first_token, rel=1e-12)
    assert [b.kv_blocks for b in result.batches] == [s.kv_blocks_used for s in sim.steps]


def test_preemption_pressure_is_exercised():
    arrivals = [RequestArrival(f"r{i}", 0.05 * i, 20 + 7 * (i % 5), 5 + 3 * (i % 7)) for i in range(24)]
    sim = simulate(arrivals, "vllm", COST, num_kv_blocks=25, block_size=4)
    assert sim.summary()["preemptions"] > 0


def test_deadlines_are_checked():
    """A first token or a finish later than its deadline is a violation; on time (within float noise) is not."""
    from vllm_shadow.solver.schedule import Deadlines

    on_time = verify(GOOD, window(), COST)
    exact = Deadlines(dict(on_time.first_token), dict(on_time.finish), "itself")
    assert verify(GOOD, window(), COST, exact).feasible
    late_first = Deadlines({"b": on_time.first_token["b"] - 0.01}, {}, "tight ttft")
    with pytest.raises(InfeasibleSchedule, match=re.escape("b: first token at")):
        verify(GOOD, window(), COST, late_first)
    late_finish = Deadlines({}, {"a": on_time.finish["a"] - 0.01}, "tight finish")
    result = replay(GOOD, window(), COST, late_finish)
    assert not result.feasible and result.violations[0].startswith("a: finish at")
