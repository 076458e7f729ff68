"""The simulator: hand-worked scenarios for each policy, and invariants over random workloads.

Scenarios use a cost model of exactly 1 second per step, so times read as step counts.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import heapq
import math
import sys

import pytest
from hypothesis import HealthCheck, assume, example, given, reject, settings
from hypothesis import strategies as st

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.policies import PRESETS, parse_policy
from vllm_shadow.solver.records import SchedulerThrashes
from vllm_shadow.solver.simulator import RunningRequest, pure_core, simulate
from vllm_shadow.tracking.recompute import recomputed_tokens, step_recompute_tax

ONE_SECOND_STEPS = LinearCostModel(a=1.0, b=0.0, c=0.0, d=0.0)


def req(rid: str, t: float, prompt: int, output: int, priority: int = 0) -> RequestArrival:
    return RequestArrival(rid, t, prompt, output, priority=priority)


def run(requests, policy, *, blocks=1000, block_size=4, **kw):
    return simulate(
        requests,
        policy,
        ONE_SECOND_STEPS,
        num_kv_blocks=blocks,
        block_size=block_size,
        record_steps=True,
        **kw,
    )


def batches(result):
    return [s.scheduled_tokens for s in result.steps]


def by_id(result):
    return {r.request_id: r for r in result.requests}


# ---- hand-worked scenarios -------------------------------------------------------------------------------------


def test_vllm_preempts_newest_and_readmits_when_whole_sequence_fits():
    # 3 usable blocks of 4 tokens (vLLM's null block is the 4th).
    res = run([req("a", 0, 4, 6), req("b", 0, 4, 3)], "vllm", blocks=4)
    assert batches(res) == [
        {"a": 4, "b": 4},  # both prompts fit: one block each
        {"a": 1},  # both decoders need a 2nd block, one is free: b (newest) is preempted
        {"a": 1},
        {"a": 1},
        {"a": 1},  # b's 5 tokens need 2 blocks; only 1 is free
        {"a": 1},  # a takes its 3rd block and finishes
        {"b": 5},  # b recomputes prompt + its generated token
        {"b": 1},
    ]
    assert res.steps[1].preempted == ("b",)
    a, b = by_id(res)["a"], by_id(res)["b"]
    assert (a.first_token, a.finish, a.preemptions) == (1.0, 6.0, 0)
    assert (b.first_token, b.finish, b.preemptions, b.recomputed_tokens) == (1.0, 8.0, 1, 4)
    assert res.tokens_processed == (4 + 6 - 1) + (4 + 3 - 1) + 4
    assert res.peak_kv_blocks == 3


def test_no_eviction_reserves_prompt_plus_output_and_never_preempts():
    res = run([req("a", 0, 4, 6), req("b", 0, 4, 3)], "no-eviction", blocks=4)
    assert batches(res) == [{"a": 4}] + [{"a": 1}] * 5 + [{"b": 4}, {"b": 1}, {"b": 1}]
    assert sum(r.preemptions for r in res.requests) == 0
    assert by_id(res)["b"].finish == 9.0


def test_lightllm_admits_only_when_projected_peak_fits():
    res = run([req("a", 0, 4, 6), req("b", 0, 4, 3)], "lightllm", blocks=4)
    assert sum(r.preemptions for r in res.requests) == 0
    assert batches(res)[0] == {"a": 4}


def test_vllm_v0_runs_prefill_only_batches_while_v1_mixes():
    reqs = [req("a", 0, 4, 3), req("b", 1.5, 4, 2)]
    v1 = run(reqs, "vllm")
    assert batches(v1) == [{"a": 4}, {"a": 1}, {"a": 1, "b": 4}, {"b": 1}]
    v0 = run(reqs, "vllm-v0")
    assert batches(v0) == [{"a": 4}, {"a": 1}, {"b": 4}, {"a": 1, "b": 1}]
    assert by_id(v0)["a"].finish == 4.0 and by_id(v1)["a"].finish == 3.0


def test_sarathi_chunks_prefill_under_token_budget():
    res = run([req("a", 0, 10, 2)], "sarathi(max_num_batched_tokens=4)")
    assert batches(res) == [{"a": 4}, {"a": 4}, {"a": 2}, {"a": 1}]
    a = by_id(res)["a"]
    assert (a.first_scheduled, a.first_token, a.finish) == (0.0, 3.0, 4.0)


def test_long_prefill_threshold_caps_running_chunks_only_when_others_wait():
    # Alone, the cap is lifted (vLLM: nobody to starve).
    alone = run([req("a", 0, 10, 1)], "vllm(long_prefill_token_threshold=3)")
    assert batches(alone) == [{"a": 10}]
    two = run([req("a", 0, 10, 1), req("b", 0, 2, 1)], "vllm(long_prefill_token_threshold=3)")
    assert batches(two)[0] == {"a": 3, "b": 2}


def test_orca_runs_whole_prompts_and_an_oversized_prompt_alone():
    res = run([req("a", 0, 10, 2), req("b", 0, 2, 2)], "orca(max_num_batched_tokens=4)")
    assert batches(res)[0] == {"a": 10}
    assert batches(res)[1] == {"a": 1, "b": 2}


def test_fastertransformer_waits_for_the_whole_batch():
    res = run([req("a", 0, 4, 4), req("b", 0.5, 4, 1)], "fastertransformer")
    assert batches(res) == [{"a": 4}, {"a": 1}, {"a": 1}, {"a": 1}, {"b": 4}]
    assert by_id(res)["b"].finish == 5.0


def test_ranking_policies_order_the_waiting_queue():
    reqs = [req("long", 0, 8, 3), req("short", 0, 2, 2), req("mid", 0, 4, 1)]
    sjf = run(reqs, "sjf(max_num_seqs=1)")
    assert [next(iter(b)) for b in batches(sjf) if len(b) == 1 and next(iter(b.values())) > 1] == [
        "short",
        "mid",
        "long",
    ]
    sof = run(reqs, "sof(max_num_seqs=1)")
    assert batches(sof)[0] == {"mid": 4}


def test_priority_serves_lower_value_first_and_preempts_highest_value():
    reqs = [req("low", 0, 4, 6, priority=5), req("high", 0, 4, 3, priority=0)]
    res = run(reqs, "vllm(policy=priority)", blocks=4)
    assert batches(res)[0] == {"high": 4, "low": 4}
    # Both decoders need a block; the victim is the worst priority even though it was scheduled first.
    assert res.steps[1].preempted == ("low",)
    assert batches(res)[1] == {"high": 1}


def test_initial_running_state_continues_where_the_engine_was():
    state = RunningRequest(req("r", 0, 4, 4), computed_tokens=5, generated_tokens=2)
    res = simulate(
        [req("n", 10, 3, 1)],
        "vllm",
        ONE_SECOND_STEPS,
        num_kv_blocks=100,
        block_size=4,
        initial_running=[state],
        start_time=0.0,
        record_steps=True,
    )
    assert batches(res)[:2] == [{"r": 1}, {"r": 1}]
    assert by_id(res)["r"].finish == 2.0
    assert by_id(res)["n"].finish == 11.0  # idle until it arrives


def test_arrival_steps_feed_requests_by_engine_step():
    reqs = [req("a", 0, 4, 4), req("b", 999, 4, 1)]
    res = run(reqs, "vllm", arrival_steps={"a": 0, "b": 2})
    assert batches(res) == [{"a": 4}, {"a": 1}, {"a": 1, "b": 4}, {"a": 1}]


def test_bad_requests_are_refused_with_their_id():
    with pytest.raises(ValueError, match=r"x.*output_tokens"):
        run([RequestArrival("x", 0, 4, None)], "vllm")
    with pytest.raises(ValueError, match=r"big.*never fit"):
        run([req("big", 0, 100, 10)], "vllm", blocks=4)


# ---- policy spelling ----------------------------------------------------------------------------------------


def test_policy_spelling_round_trips():
    for spec in [
        "vllm",
        "vllm(max_num_seqs=64,max_num_batched_tokens=2048)",
        "sarathi(eviction=false)",
        "vllm(order=priority,long_prefill_token_threshold=256)",
    ]:
        policy = parse_policy(spec)
        assert parse_policy(str(policy)) == policy
    assert parse_policy("vllm(policy=priority,preemption=none)") == parse_policy(
        "vllm(order=priority,eviction=false)"
    )


@pytest.mark.parametrize(
    "bad",
    [
        "nope",
        "vllm(max_num_seqs=abc)",
        "vllm(colour=red)",
        "vllm(max_num_seqs=0)",
        "vllm(order=random)",
        "vllm((",
    ],
)
def test_bad_policy_specs_say_what_is_wrong(bad):
    with pytest.raises(ValueError):
        parse_policy(bad)


# ---- invariants over random workloads ---------------------------------------------------------------------

POLICY_KNOBS = st.fixed_dictionaries(
    {
        "preset": st.sampled_from(sorted(PRESETS)),
        "max_num_seqs": st.integers(1, 12),
        "max_num_batched_tokens": st.integers(8, 96),
        "long_prefill_token_threshold": st.sampled_from([0, 0, 5, 17]),
        "order": st.sampled_from(["fcfs", "fcfs", "priority", "prompt", "output"]),
    }
)


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    n = draw(st.integers(1, 25))
    gaps = draw(st.lists(st.sampled_from([0.0, 0.0, 0.01, 0.3, 2.0]), min_size=n, max_size=n))
    reqs, t = [], 0.0
    longest = 0
    for i, gap in enumerate(gaps):
        t += gap
        prompt = draw(st.integers(1, 60))
        output = draw(st.integers(1, 40))
        longest = max(longest, prompt + output - 1)
        reqs.append(req(f"r{i}", t, prompt, output, priority=draw(st.integers(0, 2))))
    blocks = math.ceil(longest / block_size) + 1 + draw(st.integers(0, 20))
    return reqs, block_size, blocks


def policy_from(knobs) -> str:
    preset = knobs.pop("preset")
    return f"{preset}({','.join(f'{k}={v}' for k, v in knobs.items())})"


COST = LinearCostModel(a=0.004, b=3e-5, c=2e-7, d=1e-9, e=1.5e-4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), POLICY_KNOBS)
# A CI draw: V0's prefill-first batching under priority preemption thrashes on 10 blocks of one token.
@example(
    ([req(f"r{i}", 0.0, 1, output) for i, output in enumerate([10, 6] + [1] * 9)], 1, 11),
    {
        "preset": "vllm-v0",
        "max_num_seqs": 2,
        "max_num_batched_tokens": 8,
        "long_prefill_token_threshold": 5,
        "order": "priority",
    },
)
def test_invariants_and_fast_forward_equals_stepping(workload, knobs):
    reqs, block_size, blocks = workload
    policy = policy_from(dict(knobs))
    run = functools.partial(
        simulate, reqs, policy, COST, num_kv_blocks=blocks, block_size=block_size, record_steps=True
    )
    try:
        fast = run()
    except SchedulerThrashes:  # a policy may thrash (see the thrashing test below): stepping must too
        with pytest.raises(SchedulerThrashes):
            run(fast_forward=False)
        return
    slow = run(fast_forward=False)

    # Every request finishes, in order of its own events.
    for r in fast.requests:
        assert r.arrival <= r.first_scheduled <= r.first_token <= r.finish, r
    # Token conservation: prompt + output - 1 per request, plus what preemption made it recompute.
    expected = sum(r.prompt_tokens + r.output_tokens - 1 + r.recomputed_tokens for r in fast.requests)
    assert fast.tokens_processed == expected
    assert sum(sum(s.scheduled_tokens.values()) for s in fast.steps) == expected
    # KV never above capacity; the budget and the sequence cap hold in every step.
    p = parse_policy(policy)
    for s in fast.steps:
        assert s.kv_blocks_used <= blocks - 1
        assert len(s.scheduled_tokens) <= p.max_num_seqs
        if p.chunked_prefill:
            assert sum(s.scheduled_tokens.values()) <= p.max_num_batched_tokens
    if not p.eviction or p.admission == "future-peak":
        assert sum(r.preemptions for r in fast.requests) == 0 or (p.admission == "future-peak" and p.eviction)
    # The shortcuts are exact: same steps, same per-request records, same busy time.
    assert [
        (s.scheduled_tokens, s.preempted, s.start_time, s.duration, s.kv_blocks_used) for s in fast.steps
    ] == [(s.scheduled_tokens, s.preempted, s.start_time, s.duration, s.kv_blocks_used) for s in slow.steps]
    assert fast.requests == slow.requests
    assert fast.gpu_seconds == slow.gpu_seconds
    # Recording steps changes nothing.
    plain = simulate(reqs, policy, COST, num_kv_blocks=blocks, block_size=block_size)
    assert plain.requests == fast.requests and plain.num_steps == len(fast.steps)


def test_step_time_prices_every_term_of_the_cost_model():
    # One 4-token prefill, then a decode step of two requests at contexts 4 and 2.
    cost = LinearCostModel(a=1.0, b=0.1, c=0.01, d=0.001, e=0.5)
    res = simulate(
        [req("a", 0, 4, 2), req("b", 0, 2, 1)],
        "vllm",
        cost,
        num_kv_blocks=100,
        block_size=4,
        record_steps=True,
    )
    first = res.steps[0]  # a: 4 new on 0 context, b: 2 new on 0 context
    assert first.scheduled_tokens == {"a": 4, "b": 2}
    expected = 1.0 + 0.1 * 6 + 0.01 * (4 + 2) + 0.001 * (4 * 4 + 2 * 2) + 0.5 * 2
    assert first.duration == pytest.approx(expected, abs=1e-12)
    second = res.steps[1]  # a decodes one token on 4 of context
    assert second.duration == pytest.approx(1.0 + 0.1 + 0.01 * 5 + 0.5, abs=1e-12)
    assert res.gpu_seconds == pytest.approx(first.duration + second.duration, abs=1e-12)


# ---- prefix caching (vLLM's KV cache manager) -------------------------------------------------------------

CACHING = "vllm(enable_prefix_caching=true)"


def hreq(rid: str, t: float, prompt: int, output: int, hashes: tuple[int, ...], priority: int = 0):
    return RequestArrival(rid, t, prompt, output, priority=priority, block_hashes=hashes)


def test_a_shared_prefix_is_computed_once_and_the_last_prompt_token_always():
    # b shares a's two full prompt blocks: it computes only the token after them. c's whole prompt (8 tokens,
    # two full blocks) hits, yet its last token is computed to sample from: it hits one block, computes 4.
    reqs = [hreq("a", 0, 10, 2, (1, 2)), hreq("b", 5, 9, 2, (1, 2)), hreq("c", 10, 8, 1, (1, 2))]
    res = run(reqs, CACHING, blocks=100)
    assert batches(res) == [{"a": 10}, {"a": 1}, {"b": 1}, {"b": 1}, {"c": 4}]
    assert [s.cached_tokens for s in res.steps] == [{}, {}, {"b": 8}, {}, {"c": 4}]
    assert [by_id(res)[r].num_cached_tokens for r in "abc"] == [0, 8, 4]
    # Off, nothing is shared: today's behaviour.
    assert batches(run(reqs, "vllm", blocks=100))[2] == {"b": 9}


def test_a_resumed_request_re_hits_its_own_surviving_blocks():
    # 3 usable blocks of 4: at step 1 both decoders need a 2nd block, one is free, b is preempted. Its full
    # block (its 4 prompt tokens) stays cached while free: on resume it computes only its last token again.
    res = run([req("a", 0, 4, 3), req("b", 0, 4, 3)], CACHING, blocks=4)
    plain = run([req("a", 0, 4, 3), req("b", 0, 4, 3)], "vllm", blocks=4)
    assert res.steps[1].preempted == plain.steps[1].preempted == ("b",)
    resumed = next(i for i, s in enumerate(res.steps) if i > 1 and "b" in s.scheduled_tokens)
    assert res.steps[resumed].scheduled_tokens["b"] == 1 and res.steps[resumed].cached_tokens == {"b": 4}
    assert next(s.scheduled_tokens["b"] for s in plain.steps[2:] if "b" in s.scheduled_tokens) == 5


def test_freed_blocks_are_evicted_least_recently_freed_first_and_tail_first():
    # 4 usable blocks of 2 tokens. a (blocks 1, 2) finishes, then b (3, 4); c needs 3 new blocks: the free queue
    # holds a's blocks tail first (2, 1) then b's (4, 3); taking 3 evicts 2, 1 and 4. d = b's prompt hits 3 only.
    reqs = [
        hreq("a", 0, 4, 1, (1, 2)),
        hreq("b", 1, 4, 1, (3, 4)),
        hreq("c", 2, 6, 1, (5, 6, 7)),
        hreq("d", 3, 5, 1, (3, 4)),
        hreq("e", 4, 5, 1, (1, 2)),
    ]
    res = run(reqs, CACHING, blocks=5, block_size=2)
    hits = {r.request_id: r.num_cached_tokens for r in res.requests}
    assert hits == {"a": 0, "b": 0, "c": 0, "d": 2, "e": 0}


def test_async_scheduling_holds_a_finished_request_s_blocks_one_more_step():
    # 2 usable blocks of 4. a's only token comes from its prefill in step 0. Synchronously a is freed before
    # step 1 is scheduled and b decodes into a's block; with async scheduling step 1 is scheduled while step 0's
    # output is in flight, a still holds its block, so b (the tail) preempts itself and recomputes after.
    reqs = [req("a", 0, 4, 1), req("b", 0, 4, 3)]
    sync = run(reqs, "vllm", blocks=3)
    assert batches(sync) == [{"a": 4, "b": 4}, {"b": 1}, {"b": 1}]
    late = run(reqs, "vllm(async_scheduling=true)", blocks=3)
    assert batches(late) == [{"a": 4, "b": 4}, {"b": 5}, {"b": 1}]
    assert by_id(late)["b"].preemptions == 1 and by_id(sync)["b"].preemptions == 0
    assert by_id(late)["a"].finish == by_id(sync)["a"].finish == 1.0  # its token came at the same time
    with pytest.raises(ValueError, match="continuous"):
        parse_policy("vllm-v0(async_scheduling=true)")


def test_prefix_caching_needs_eviction():
    with pytest.raises(ValueError, match="prefix_caching"):
        parse_policy("no-eviction(enable_prefix_caching=true)")
    assert "--enable-prefix-caching" in parse_policy(CACHING).vllm_flags()
    assert parse_policy(str(parse_policy(CACHING))) == parse_policy(CACHING)


@st.composite
def prefix_workloads(draw):
    """Requests drawn from a few prompt families: a family shares its first blocks (a system prompt), a request
    shares a prefix of its family's chain and then has its own blocks (chained hashes stay consistent)."""
    reqs, block_size, blocks = draw(workloads())
    shared = []
    for i, r in enumerate(reqs):
        family = draw(st.integers(0, 3))
        num_full = r.prompt_tokens // block_size
        num_shared = draw(st.integers(0, num_full))
        hashes = tuple(family * 1000 + j for j in range(num_shared)) + tuple(
            -(i * 1000 + j) - 1 for j in range(num_shared, num_full)
        )
        shared.append(dataclasses.replace(r, block_hashes=hashes))
    return shared, block_size, blocks


CACHING_KNOBS = st.fixed_dictionaries(
    {
        "preset": st.sampled_from(["vllm", "vllm", "sarathi", "lightllm", "sjf", "vllm-v0"]),
        "max_num_seqs": st.integers(1, 12),
        "max_num_batched_tokens": st.integers(8, 96),
        "long_prefill_token_threshold": st.sampled_from([0, 0, 5, 17]),
        "order": st.sampled_from(["fcfs", "fcfs", "priority", "prompt"]),
        "chunked_prefill": st.booleans(),
        "enable_prefix_caching": st.sampled_from([True, True, False]),
        "async_scheduling": st.booleans(),
    }
)


def simulate_finishing(*args, **kwargs):
    """`simulate`, for property tests: a drawn policy that thrashes (simulate's explicit error, tested on its
    own) says nothing about the property, so the example is rejected."""
    try:
        return simulate(*args, **kwargs)
    except SchedulerThrashes:
        reject()


def thrashing_workload() -> tuple[list[RequestArrival], str]:
    """V0's prefill-first batching under priority preemption on 7 usable blocks (`num_kv_blocks=8`): prefills of
    readmitted requests keep preempting the decoders before anyone finishes (a hypothesis draw; it ran forever,
    and filled memory, before the simulator's cap)."""
    rows = [
        (0.3, 35, 1, 0), (0.6, 46, 35, 1), (2.6, 3, 18, 0), (2.6, 2, 10, 0), (2.9, 10, 12, 1), (3.2, 37, 19, 2),
        (3.2, 35, 33, 2), (3.2, 23, 6, 0), (3.2, 5, 37, 1), (3.2, 56, 21, 2), (3.2, 12, 35, 1),
        (3.21, 48, 11, 2), (3.21, 14, 12, 1), (3.21, 52, 29, 2), (3.21, 39, 14, 0), (3.22, 27, 40, 0),
        (3.52, 40, 24, 2), (3.52, 50, 14, 1), (3.52, 36, 17, 0),
    ]  # fmt: skip
    requests = [RequestArrival(f"r{i}", t, p, o, priority=pr) for i, (t, p, o, pr) in enumerate(rows)]
    return (
        requests,
        "vllm-v0(max_num_seqs=11,max_num_batched_tokens=9,long_prefill_token_threshold=5,order=priority)",
    )


def test_a_policy_that_thrashes_stops_with_an_error_instead_of_spinning() -> None:
    reqs, policy = thrashing_workload()
    with pytest.raises(SchedulerThrashes, match=r"thrashes: .* tokens computed in .* steps"):
        simulate(reqs, policy, COST, num_kv_blocks=8, block_size=16)
    # The same requests with room to finish: no error.
    assert len(simulate(reqs, policy, COST, num_kv_blocks=64, block_size=16).requests) == len(reqs)


def _check_kv_invariants(sim) -> None:
    """Reference counts equal the running requests holding each block; held blocks are cached and out of the
    free queue; the blocks in use are the distinct held blocks plus every request's private ones."""
    pool = sys.modules[type(sim.block_pool).__module__]  # the pool's own build: the plain one under pure_core
    holders: dict[int, int] = {}
    runs = {}  # the pool keeps cached blocks as runs of one reference count (solver.kv_cache)
    num_private = 0
    for request in sim.running:
        num_computed = sim._num_computed_tokens(request)
        for run in pool.held_runs(request.held_blocks or []):
            holders[id(run)] = holders.get(id(run), 0) + 1
            runs[id(run)] = run
        num_private += math.ceil(num_computed / sim.block_size) - pool.num_blocks(request.held_blocks or [])
    index = sim.block_pool.cached_block_hash_to_block
    for key, run in runs.items():
        assert run.ref_cnt == holders[key] and any(r is run for r in index[run.block_hashes[run.lo]])
        assert run.entry is None and run.hi > run.lo  # held blocks are out of the free queue
    queue = list(sim.block_pool.queued())
    assert all(isinstance(b, pool.PrivateRun) or b.ref_cnt == 0 for b in queue)
    assert len({id(b) for b in queue}) == len(queue)
    assert sim.block_pool.num_queued_blocks == sum(b.hi - b.lo for b in queue)
    num_held = sum(r.hi - r.lo for r in runs.values())
    assert sim.num_used_blocks == num_held + num_private <= sim.num_usable_blocks


def _unique_hashes(index: int, count: int) -> tuple[int, ...]:
    return tuple(-(index * 1000 + k) for k in range(1, count + 1))


# (arrival s, prompt, output, full prompt blocks with a hash of their own); block size 2, 48 blocks.
_SYNC_EVICTION_CASE = (
    [(0.0, 1, 1, 0)] * 2
    + [(0.0, 56, 30, 28)]
    + [(0.0, 1, 1, 0)] * 10
    + [(0.3, 47, 1, 23)] * 2
    + [(0.31, 1, 6, 0)]
    + [(0.31, 1, 1, 0)] * 9
)


@pytest.mark.parametrize(
    ("rows", "policy"),
    [
        # A request preempted while two long prefills fill the KV keeps its blocks cached and free; the next
        # step vLLM's walk allocates for the first prefill (evicting them) before it preempts the second.
        (
            _SYNC_EVICTION_CASE,
            "vllm(max_num_seqs=3,max_num_batched_tokens=11,long_prefill_token_threshold=5,"
            "order=prompt,chunked_prefill=false,enable_prefix_caching=true)",
        ),
        # The same order under async scheduling, on five requests.
        (
            [(0.0, 45, 29, 22), (0.0, 44, 4, 22), (0.01, 2, 2, 1), (0.01, 2, 1, 1), (0.01, 2, 1, 1)],
            "vllm(max_num_seqs=3,max_num_batched_tokens=46,order=prompt,chunked_prefill=false,"
            "enable_prefix_caching=true,async_scheduling=true)",
        ),
    ],
    ids=["sync", "async"],
)
def test_a_preempting_step_allocates_for_the_requests_ahead_before_it_frees_the_victim(rows, policy):
    """The fast step used to free its victims first and allocate after, sparing cached free blocks that vLLM's
    walk evicts: a resumed request then hit blocks that were gone (found by the property test below)."""
    reqs = [
        RequestArrival(f"r{i}", t, prompt, output, block_hashes=_unique_hashes(i, n))
        for i, (t, prompt, output, n) in enumerate(rows)
    ]
    runs = [
        simulate(reqs, policy, COST, num_kv_blocks=48, block_size=2, record_steps=True, fast_forward=fast)
        for fast in (True, False)
    ]
    assert any(s.preempted for s in runs[1].steps)
    fast, slow = (
        [(s.scheduled_tokens, s.preempted, s.cached_tokens, s.duration) for s in r.steps] for r in runs
    )
    assert fast == slow
    assert runs[0].requests == runs[1].requests


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix_workloads(), CACHING_KNOBS)
def test_prefix_caching_fast_paths_equal_stepping_and_keep_kv_invariants(workload, knobs):
    reqs, block_size, blocks = workload
    if knobs["preset"] == "vllm-v0":
        knobs = {**knobs, "async_scheduling": False}  # V0's prefill-first batching has no async scheduler
    policy = policy_from(dict(knobs))
    fast = simulate_finishing(
        reqs, policy, COST, num_kv_blocks=blocks, block_size=block_size, record_steps=True
    )
    slow = simulate_finishing(
        reqs, policy, COST, num_kv_blocks=blocks, block_size=block_size, record_steps=True, fast_forward=False
    )
    # Token conservation: what each admission found cached is work not done.
    hits = [(request_id, n) for s in fast.steps for request_id, n in s.cached_tokens.items()]
    expected = sum(r.prompt_tokens + r.output_tokens - 1 + r.recomputed_tokens for r in fast.requests)
    assert fast.tokens_processed == expected - sum(n for _, n in hits)
    first_hit: dict[str, int] = {}
    for request_id, n in hits:
        first_hit.setdefault(request_id, n)
    assert all(r.num_cached_tokens <= first_hit.get(r.request_id, 0) for r in fast.requests)
    assert knobs["enable_prefix_caching"] or not hits
    for r in fast.requests:
        assert r.arrival <= r.first_scheduled <= r.first_token <= r.finish, r
    for s in fast.steps:
        assert s.kv_blocks_used <= blocks - 1
    step_view = [
        (s.scheduled_tokens, s.preempted, s.start_time, s.duration, s.kv_blocks_used, s.cached_tokens)
        for s in fast.steps
    ]
    assert step_view == [
        (s.scheduled_tokens, s.preempted, s.start_time, s.duration, s.kv_blocks_used, s.cached_tokens)
        for s in slow.steps
    ]
    assert fast.requests == slow.requests
    assert fast.gpu_seconds == slow.gpu_seconds
    # Reference counts and the used-block count hold after every step, on both paths (of the plain-Python core:
    # the compiled core's classes cannot be patched; tests/test_compiled_core.py holds the two cores equal).
    pure = pure_core()
    with pytest.MonkeyPatch.context() as patch:
        original = pure.Simulator._apply

        def checked(self, *args):
            original(self, *args)
            _check_kv_invariants(self)

        patch.setattr(pure.Simulator, "_apply", checked)
        for fast_forward in (True, False):
            again = pure.simulate(
                reqs, policy, COST, num_kv_blocks=blocks, block_size=block_size, fast_forward=fast_forward
            )
            assert again.requests == fast.requests


# ---- the recompute tax in GPU seconds ----------------------------------------------------------------------


def engine_side_recompute_tax(result, cost) -> tuple[float, int]:
    """The engine tracker's recompute tax (shadow/tracking/engine_state.py), walked over a simulation's step
    records as over a real engine's: a victim owes the most KV its preemptions dropped; an admitted request
    holds what it found cached; each step is priced by `step_recompute_tax`. Returns (seconds, tokens)."""
    computed: dict[str, int] = {}  # KV held by the requests running now
    dropped: dict[str, int] = {}
    seconds, tokens = 0.0, 0
    for step in result.steps:
        for request_id in step.preempted:
            dropped[request_id] = max(dropped.get(request_id, 0), computed.pop(request_id, 0))
        new, context, again = [], [], []
        for request_id, n in step.scheduled_tokens.items():
            held = computed.get(request_id)
            if held is None:  # admitted this step: new, or resumed after a preemption
                held = step.cached_tokens.get(request_id, 0)
            new.append(n)
            context.append(held)
            again.append(recomputed_tokens(held, n, dropped.get(request_id, 0)))
            computed[request_id] = held + n
        tax = step_recompute_tax(cost, new, context, again)
        seconds += tax.gpu_seconds
        tokens += tax.recomputed_tokens
    return seconds, tokens


def test_the_recompute_tax_prices_a_resumed_request_s_recomputed_prefill():
    # As in the first scenario: b is preempted holding 4 tokens and resumes with 5 new on 0 of context, of
    # which 4 are recomputation; without them the step is 1 new token on 4 of context.
    cost = LinearCostModel(a=1.0, b=0.1, c=0.01, d=0.001, e=0.5)
    reqs = [req("a", 0, 4, 6), req("b", 0, 4, 3)]
    res = simulate(reqs, "vllm", cost, num_kv_blocks=4, block_size=4, record_steps=True)
    with_recompute = 1.0 + 0.1 * 5 + 0.01 * 5 + 0.001 * 5 * 5 + 0.5
    without = 1.0 + 0.1 * 1 + 0.01 * 5 + 0.5
    assert res.steps[6].scheduled_tokens == {"b": 5}
    assert res.recompute_gpu_seconds == pytest.approx(with_recompute - without, abs=1e-12)
    assert res.summary()["recompute_gpu_seconds"] == res.recompute_gpu_seconds
    never = simulate(reqs, "no-eviction", cost, num_kv_blocks=4, block_size=4)
    assert never.recompute_gpu_seconds == 0.0


RECOMPUTE_KNOBS = st.fixed_dictionaries(
    {
        "preset": st.sampled_from(["vllm", "vllm", "sarathi", "sjf", "vllm-v0"]),
        "max_num_seqs": st.integers(2, 12),
        "max_num_batched_tokens": st.integers(8, 96),
        "long_prefill_token_threshold": st.sampled_from([0, 0, 5, 17]),
        "order": st.sampled_from(["fcfs", "fcfs", "priority", "prompt"]),
        "chunked_prefill": st.booleans(),
        "enable_prefix_caching": st.booleans(),
        "async_scheduling": st.booleans(),
        "victim": st.sampled_from(["newest", "newest", "least-computed"]),
    }
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix_workloads(), RECOMPUTE_KNOBS)
def test_the_simulated_recompute_tax_is_the_engine_tracker_s_on_the_simulated_steps(workload, knobs):
    reqs, block_size, blocks = workload
    if knobs["preset"] == "vllm-v0":
        knobs = {**knobs, "async_scheduling": False}  # V0's prefill-first batching has no async scheduler
    policy = policy_from(dict(knobs))
    result = simulate_finishing(
        reqs, policy, COST, num_kv_blocks=blocks, block_size=block_size, record_steps=True
    )
    # Only workloads that preempt say anything here, and only those whose every preemption a step record shows:
    # a step that only preempts (its request was its own victim, nothing else scheduled) runs nothing, and the
    # simulator records no step for it, so a walk over its records cannot see that victim drop its KV.
    preemptions = sum(len(s.preempted) for s in result.steps)
    assume(0 < preemptions == sum(r.preemptions for r in result.requests))
    seconds, tokens = engine_side_recompute_tax(result, COST)
    assert result.recompute_gpu_seconds == pytest.approx(seconds, rel=1e-9, abs=1e-12)
    assert 0.0 <= result.recompute_gpu_seconds <= result.gpu_seconds
    if not knobs["enable_prefix_caching"]:
        # Nothing cached: every token a preemption dropped is computed again, and costs something.
        assert tokens == sum(r.recomputed_tokens for r in result.requests)
        assert (result.recompute_gpu_seconds > 0) == (tokens > 0)
    # The literal walk prices its own steps alike; the policy that never preempts pays none.
    stepped = simulate(
        reqs, policy, COST, num_kv_blocks=blocks, block_size=block_size, record_steps=True, fast_forward=False
    )
    seconds, _tokens = engine_side_recompute_tax(stepped, COST)
    assert stepped.recompute_gpu_seconds == pytest.approx(seconds, rel=1e-9, abs=1e-12)
    never = simulate(reqs, "no-eviction", COST, num_kv_blocks=blocks, block_size=block_size)
    assert never.recompute_gpu_seconds == 0.0


# ---- the core's own arithmetic and heap (the plain-Python core; tests/test_compiled_core.py holds the compiled
# core to it) ----------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 40), st.none()), max_size=300))
def test_the_finish_heap_pops_in_the_order_of_heapq_on_the_pairs(operations):
    # An int pushes (finish, next push number), None pops; past 64 entries the arrays grow.
    sim = pure_core().Simulator(parse_policy("vllm"), ONE_SECOND_STEPS, 100, 4)
    reference: list[tuple[int, int]] = []
    pushes = 0
    for finish in operations:
        if finish is not None:
            sim._push_finish(finish, pushes)
            heapq.heappush(reference, (finish, pushes))
            pushes += 1
        elif reference:
            assert sim._pop_finish() == heapq.heappop(reference)[1]
        assert sim.finish_heap_size == len(reference)
        assert not reference or sim.finish_steps[0] == reference[0][0]
    while reference:
        assert sim._pop_finish() == heapq.heappop(reference)[1]


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**62), 2**62))
def test_seconds_is_the_correctly_rounded_quotient(ps):
    core = pure_core()
    for near in (ps, ps % 2**54 - 2**53, 2**53 - ps % 64):  # anywhere, and around the 2**53 boundary
        assert core._seconds(near) == near / core.PS_PER_S


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 2**62), st.integers(0, 2**40), st.integers(0, 2**30))
def test_steps_starting_before_counts_the_steps_that_start_before_the_gap(gap, first_step, slope):
    assume(first_step or slope)
    counted = pure_core()._steps_starting_before(gap, first_step, slope)

    def starts(j: int) -> int:  # when step j starts: steps 0..j-1 lasted first_step + slope * i each
        return j * first_step + slope * j * (j - 1) // 2

    # The count of j >= 0 with starts(j) < gap: step counted - 1 starts before the gap, step counted does not.
    assert counted >= 1 and starts(counted - 1) < gap <= starts(counted)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.floats(-1e7, 1e7, allow_nan=False),
        # n / 8192 s is n * 122,070,312.5 ps exactly: every odd n a tie, which rounds to even.
        st.integers(-(2**25), 2**25).map(lambda n: n / 8192),
        st.integers(-(10**6), 10**6),
    )
)
def test_to_ps_rounds_as_round_does(time):
    core = pure_core()
    assert core._to_ps(time) == round(time * core.PS_PER_S)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["add", "prepend", "pop"]), max_size=400))
def test_the_fcfs_waiting_queue_is_a_deque(operations):
    # Arrivals at the back, preempted requests at the front, pops from the front: past 32 pops the list drops
    # the requests that left.
    core = pure_core()
    queue, reference = core._WaitingQueue(ordered=False), collections.deque()
    for number, operation in enumerate(operations):
        if operation == "pop":
            if reference:
                assert queue.peek_request() is reference[0]
                assert queue.pop_request() is reference.popleft()
        else:
            request = core._Request(f"r{number}", 0, 1, 1, None, None)
            (queue.add_request if operation == "add" else queue.prepend_request)(request)
            (reference.append if operation == "add" else reference.appendleft)(request)
        assert queue.size == len(reference)
        assert queue.fifo[queue.head :] == list(reference)


def _peak_fits_reference(jobs: list[tuple[int, int]], block_size: int, limit: int) -> bool:
    """LightLLM's check written plainly over (tokens held now, tokens left to grow) per job: at each finish, in
    order of growth left, the jobs still live each grown by the finishing one's growth must fit."""
    jobs = sorted(jobs, key=lambda job: (job[1], job[0]))
    for i, (_, left) in enumerate(jobs):
        live = jobs[i:]
        if -(-sum(held + left for held, _ in live) // block_size) + len(live) - 1 > limit:
            return False
    return True


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 60), st.integers(1, 40), st.integers(0, 45)), max_size=40),
    st.tuples(st.integers(1, 60), st.integers(1, 40)),
    st.integers(1, 8),
    st.data(),
)
def test_lightllm_s_peak_check_is_the_plain_walk(running, candidate, block_size, data):
    # Running requests (prompt, max_tokens, output so far; capped at max_tokens; some of them implicit decoders)
    # and a waiting candidate
    # (prompt, max_tokens) against the check written plainly: the upper bound that accepts, the first point of
    # the walk that refuses without sorting, and the sorted walk itself must all agree with it, on limits at and
    # around each point's need (where an off-by-one shows).
    sim = pure_core().Simulator(parse_policy("lightllm"), ONE_SECOND_STEPS, 100, block_size)
    jobs = []
    for number, (prompt, max_tokens, output) in enumerate(running):
        request = pure_core()._Request(f"r{number}", 0, prompt, max_tokens, None, None)
        request.num_output_tokens = min(output, max_tokens)
        sim.running.append(request)
        if 0 < request.num_output_tokens < max_tokens and data.draw(st.booleans()):
            # A decoder: its computed tokens are all but its last sampled one, kept implicitly.
            request.num_computed_tokens = prompt + request.num_output_tokens - 1
            sim._to_implicit(request)
        held = prompt + max(request.num_output_tokens, 1) - 1
        jobs.append((held, prompt + max_tokens - 1 - held))
    waiting = pure_core()._Request("c", 0, candidate[0], candidate[1], None, None)
    jobs.append((candidate[0], candidate[1] - 1))
    needs = [-(-sum(held + left for held, left in jobs) // block_size) + len(jobs) - 1]  # all at their end
    for _, left in jobs:  # every job grown by `left` (what the walk asks where that job finishes)
        live = [held for held, grow in jobs if grow >= left]
        needs.append(-(-(sum(live) + len(live) * left) // block_size) + len(live) - 1)
    limit = data.draw(st.sampled_from(needs)) + data.draw(st.integers(-1, 1))
    assert sim._peak_fits(waiting, limit) == _peak_fits_reference(jobs, block_size, limit)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=60, unique=True), st.data())
def test_a_finished_request_leaves_the_running_queue_by_bisection(seqs, data):
    # The running queue in running_seq order (as it is but under decode_first) or, shuffled, out of it (where the
    # bisection misses and the scan must find it): only the request itself leaves, the rest keep their order.
    core = pure_core()
    requests = []
    for seq in sorted(seqs) if data.draw(st.booleans()) else seqs:
        request = core._Request(f"r{seq}", 0, 1, 1, None, None)
        request.running_seq = seq
        requests.append(request)
    leaving = data.draw(st.sampled_from(requests))
    expected = [r for r in requests if r is not leaving]
    core._remove_in_seq_order(requests, leaving)
    assert requests == expected


@pytest.mark.parametrize("budget", [24, 14, 9])
def test_chunks_between_decoders_are_the_walk_s(budget):
    """A long prompt chunked under long_prefill_token_threshold, admitted ahead of short ones that become decoders
    before it is done: the prefilling request sits between decoders, and the fast step walks the whole queue for
    the budget (each decoder's token in queue order). Its steps are the literal walk's, where the budget lasts past
    the last decoder and where it does not (9 tokens: a decoder behind the long prompt's chunk does not run)."""
    reqs = [req("long", 0.0, 60, 5), req("s1", 0.0, 3, 30), req("s2", 0.0, 4, 30), req("late", 0.05, 2, 10)]
    policy = f"vllm(long_prefill_token_threshold=8,max_num_batched_tokens={budget})"
    runs = [
        simulate(reqs, policy, COST, num_kv_blocks=64, block_size=4, record_steps=True, fast_forward=fast)
        for fast in (True, False)
    ]
    assert runs[0].steps == runs[1].steps
    assert runs[0].requests == runs[1].requests
    # The long prompt is still prefilling while the short ones decode: the case this is about.
    assert any(
        s.scheduled_tokens.get("long", 0) > 1 and s.scheduled_tokens.get("s1") == 1 for s in runs[0].steps
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 60), st.integers(1, 40), st.integers(0, 45)), max_size=40),
    st.tuples(st.integers(1, 60), st.integers(1, 40)),
    st.integers(1, 8),
    st.data(),
)
def test_lightllm_s_peak_check_with_the_decoders_leading_is_the_plain_walk(
    running, candidate, block_size, data
):
    # As above, the implicit decoders at the head of the running queue (the queue the fast step keeps), where
    # the check refuses from their sums and the finish heap's first entry without visiting them; some decoders
    # made explicit again, leaving stale heap entries behind (a stale entry only lowers the bound).
    core = pure_core()
    sim = core.Simulator(parse_policy("lightllm"), ONE_SECOND_STEPS, 100, block_size)
    sim.decode_steps = data.draw(st.integers(0, 3))
    decoders, others, jobs = [], [], []
    for number, (prompt, max_tokens, output) in enumerate(running):
        request = core._Request(f"r{number}", 0, prompt, max_tokens, None, None)
        request.num_output_tokens = min(output, max_tokens)
        if 0 < request.num_output_tokens < max_tokens and data.draw(st.booleans()):
            request.num_computed_tokens = prompt + request.num_output_tokens - 1
            sim._to_implicit(request)
            if data.draw(st.integers(0, 3)) == 0:
                sim._to_explicit(request)  # its heap entry stays, stale
        (decoders if request.implicit_decoder else others).append(request)
        held = prompt + max(request.num_output_tokens, 1) - 1
        jobs.append((held, prompt + max_tokens - 1 - held))
    sim.running.extend(decoders + others)
    waiting = core._Request("c", 0, candidate[0], candidate[1], None, None)
    jobs.append((candidate[0], candidate[1] - 1))
    needs = [-(-sum(held + left for held, left in jobs) // block_size) + len(jobs) - 1]
    for _, left in jobs:
        live = [held for held, grow in jobs if grow >= left]
        needs.append(-(-(sum(live) + len(live) * left) // block_size) + len(live) - 1)
    limit = data.draw(st.sampled_from(needs)) + data.draw(st.integers(-1, 1))
    assert sim._peak_fits(waiting, limit) == _peak_fits_reference(jobs, block_size, limit)
