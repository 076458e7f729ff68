"""What a window's evaluation shares between its simulations, and the premises that make each share exact.

`run_candidates` simulates once the policies that provably run the same steps (`SharedRuns`): those that differ
only in a sequence cap no lower than the window's request count or above the run's running peak (the simulator
reads the cap only in vLLM's admission test, which such a cap never fails), in a token budget (and chunked
prefill) or a long-prefill threshold above what the run's tests asked (`RunDemands`), in a victim rule that
would have picked every victim the run picked (any rule in a run without preemptions), or, every request at one
priority, in priority against FCFS order where the run's waiting queue stayed in arrival order. The property
tests hold the simulator to each on random workloads (every preset, prefix caching and async scheduling on and
off, running requests at the start, decoding, part way through a prompt or with their last
token in flight), so that a future use of one of these knobs breaks them here first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import shadow_support as support
from tests.test_compiled_core import COST, policies, view, workloads
from vllm_shadow.evaluation import evaluate
from vllm_shadow.evaluation.candidates import build_candidates
from vllm_shadow.evaluation.evaluate import (
    Slo,
    candidate_outcome,
    check_fidelity,
    run_candidates,
    simulate_window,
)
from vllm_shadow.evaluation.results import CandidateOutcome
from vllm_shadow.evaluation.shared_runs import SharedRuns, one_priority, task_groups
from vllm_shadow.solver.policies import Policy, parse_policy
from vllm_shadow.solver.records import RequestArrival, RequestRecord, RunDemands, SimResult
from vllm_shadow.solver.simulator import RunningRequest, simulate

_PREEMPTIONS = [f.name for f in dataclasses.fields(RequestRecord)].index("preemptions")


def _simulated(requests, initial, policy, blocks: int, block_size: int) -> SimResult | str:
    """The run, with its steps, or why the simulator refused it."""
    try:
        return simulate(
            requests,
            policy,
            COST,
            num_kv_blocks=blocks,
            block_size=block_size,
            initial_running=initial,
            start_time=0.0 if initial else None,
            record_steps=True,
        )
    except (ValueError, RuntimeError) as exc:
        return str(exc)


def _view(result: SimResult | str) -> dict:
    if isinstance(result, str):
        return {"refused": result}
    # The label is the policy's own, and its demands what its own tests asked; everything else must agree.
    return view(result) | {"policy": None, "demands": None}


def _run(requests, initial, policy, blocks: int, block_size: int) -> dict:
    return _view(_simulated(requests, initial, policy, blocks, block_size))


def _carried_variant(workload, variant: int):
    """The workload, its first running request (if any) turned into one whose last token is in flight
    (variant 1) or one part way through its prompt (variant 2)."""
    requests, initial, block_size, blocks = workload
    if initial and variant:
        request = initial[0].request
        if variant == 1:
            output = request.output_tokens
            first = RunningRequest(request, request.prompt_tokens + output - 1, output, True)
        else:
            first = RunningRequest(request, request.prompt_tokens // 2, 0)
        initial = [first, *initial[1:]]
    return requests, initial, block_size, blocks


def _at_one_priority(requests, initial, priority: int = 0):
    requests = [dataclasses.replace(r, priority=priority) for r in requests]
    initial = [
        dataclasses.replace(r, request=dataclasses.replace(r.request, priority=priority)) for r in initial
    ]
    return requests, initial


def _shared_runs_of(policy: Policy, result: SimResult, requests, initial) -> SharedRuns:
    """`SharedRuns` as `run_candidates` fills it: `policy`'s run of the workload added, its requests at one
    priority or not as the workload's are."""
    priorities = {r.priority for r in requests} | {r.request.priority for r in initial}
    shared = SharedRuns(same_priority=len(priorities) <= 1)
    preemptions = sum(r.preemptions for r in result.requests)
    shared.add(policy, CandidateOutcome("simulated", result.gpu_seconds, None, preemptions), result.demands)
    return shared


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), policies(), st.integers(0, 50))
def test_a_sequence_cap_at_least_the_request_count_never_changes_a_run(workload, policy, above: int) -> None:
    requests, initial, block_size, blocks = workload
    count = len(requests) + len(initial)
    at_count = _run(requests, initial, dataclasses.replace(policy, max_num_seqs=count), blocks, block_size)
    higher = dataclasses.replace(policy, max_num_seqs=count + above)
    assert _run(requests, initial, higher, blocks, block_size) == at_count


def _same_run_under(workload, policy, variant: int, others: Callable[[RunDemands], list[Policy]]) -> None:
    """`policy` on the workload (`_carried_variant`), then each policy `others` gives for its run's demands
    (none where `policy`'s own setting may have held a request back): the same run."""
    requests, initial, block_size, blocks = _carried_variant(workload, variant)
    result = _simulated(requests, initial, policy, blocks, block_size)
    if isinstance(result, str):
        return
    run = _view(result)
    for other in others(result.demands):
        assert _run(requests, initial, other, blocks, block_size) == run


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), policies(), st.integers(0, 2), st.integers(1, 3))
def test_a_run_is_the_same_under_every_cap_above_its_running_peak(
    workload, policy, variant: int, above: int
) -> None:
    def caps(demands: RunDemands) -> list[Policy]:
        peak = demands.running
        if peak >= policy.max_num_seqs:
            return []  # the cap may have held a request back
        return [dataclasses.replace(policy, max_num_seqs=cap) for cap in (peak + 1, peak + above)]

    _same_run_under(workload, policy, variant, caps)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), policies(), st.integers(0, 2), st.integers(0, 40), st.booleans())
def test_a_run_is_the_same_under_every_token_budget_it_never_reaches_chunked_or_not(
    workload, policy, variant: int, above: int, flip_chunking: bool
) -> None:
    """A budget no lower than the run's token demand, the tightest first, with chunked prefill as it was or
    flipped: the same run. (Where the budget did cut a chunk, stop a pass or hold a prompt back, the demand is
    above it: a budget that cannot bind would run otherwise.)"""

    def budgets(demands: RunDemands) -> list[Policy]:
        tokens = demands.tokens
        if tokens > policy.max_num_batched_tokens:
            return []  # the budget may have cut a chunk
        chunked = policy.chunked_prefill != flip_chunking
        return [  # the tightest, and one that can never bind
            dataclasses.replace(policy, max_num_batched_tokens=budget, chunked_prefill=chunked)
            for budget in (tokens, tokens + above, 10**6)
        ]

    _same_run_under(workload, policy, variant, budgets)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), policies(), st.integers(0, 2), st.integers(0, 20))
def test_a_run_is_the_same_under_every_long_prefill_threshold_it_never_reaches(
    workload, policy, variant: int, above: int
) -> None:
    def thresholds(demands: RunDemands) -> list[Policy]:
        chunk = demands.chunk
        if 0 < policy.long_prefill_token_threshold < chunk:
            return []  # the threshold may have cut a chunk
        return [
            dataclasses.replace(policy, long_prefill_token_threshold=threshold)
            for threshold in (chunk, chunk + above, 0)
        ]

    _same_run_under(workload, policy, variant, thresholds)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workloads(),
    policies(),
    st.integers(0, 2),
    st.tuples(st.integers(-1, 2), st.integers(-2, 4), st.integers(-2, 4)),
    st.booleans(),
    st.sampled_from(["newest", "least-computed"]),
    st.sampled_from(["fcfs", "priority"]),
    st.booleans(),
)
def test_a_run_shared_runs_hands_out_is_the_run_of_the_policy_that_takes_it(
    workload,
    policy,
    variant: int,
    beside: tuple[int, int, int],
    flip_chunking: bool,
    victim: str,
    order: str,
    at_one_priority: bool,
) -> None:
    """`SharedRuns` as `run_candidates` uses it: one simulated run and its demands added, another policy
    differing in the cap, the budget, chunked prefill, the long-prefill threshold (each near where it starts to
    bind), the victim rule or the order looked up; whatever it hands out must be that policy's own run."""
    requests, initial, block_size, blocks = _carried_variant(workload, variant)
    if at_one_priority:
        requests, initial = _at_one_priority(requests, initial)
    result = _simulated(requests, initial, policy, blocks, block_size)
    if isinstance(result, str):
        return
    run = _view(result)
    shared = _shared_runs_of(policy, result, requests, initial)
    demands = result.demands
    other = dataclasses.replace(
        policy,
        max_num_seqs=max(1, demands.running + beside[0]),
        max_num_batched_tokens=max(1, demands.tokens + beside[1]),
        chunked_prefill=policy.chunked_prefill != flip_chunking,
        long_prefill_token_threshold=max(0, demands.chunk + beside[2]),
        victim=victim,
        order=order,
    )
    if shared.get(other, "taken") is not None:
        assert _run(requests, initial, other, blocks, block_size) == run


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), policies(), st.sampled_from(["newest", "least-computed"]))
def test_a_run_without_preemptions_is_the_same_under_either_victim_rule(
    workload, policy, victim: str
) -> None:
    requests, initial, block_size, blocks = workload
    run = _run(requests, initial, dataclasses.replace(policy, victim=victim), blocks, block_size)
    if "refused" in run or any(record[_PREEMPTIONS] for record in run["requests"]):
        return  # a victim was picked: the rule may matter
    other = "least-computed" if victim == "newest" else "newest"
    assert _run(requests, initial, dataclasses.replace(policy, victim=other), blocks, block_size) == run


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), policies(), st.integers(0, 2))
def test_a_run_without_preemptions_is_the_same_in_priority_and_fcfs_order_at_one_priority(
    workload, policy, priority: int
) -> None:
    requests, initial, block_size, blocks = workload
    requests, initial = _at_one_priority(requests, initial, priority)
    run = _run(requests, initial, dataclasses.replace(policy, order="priority"), blocks, block_size)
    if "refused" in run or any(record[_PREEMPTIONS] for record in run["requests"]):
        return  # a victim was picked: priority order picks its own
    assert _run(requests, initial, dataclasses.replace(policy, order="fcfs"), blocks, block_size) == run


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workloads(),
    policies(),
    st.integers(0, 2),
    st.sampled_from(["newest", "least-computed"]),
    st.sampled_from(["fcfs", "priority"]),
    st.booleans(),
)
def test_a_run_is_the_same_under_each_victim_rule_and_order_that_would_have_decided_as_it_did(
    workload, policy, variant: int, victim: str, order: str, at_one_priority: bool
) -> None:
    """A run, preempting or not, and each other victim rule and queue order that `SharedRuns` hands it to for
    its demands (a rule that would have picked each of its victims; at one priority, the other order where its
    waiting queue stayed in arrival order): that policy's own run, step by step and record by record."""
    requests, initial, block_size, blocks = _carried_variant(workload, variant)
    if at_one_priority:
        requests, initial = _at_one_priority(requests, initial)
    policy = dataclasses.replace(policy, victim=victim, order=order)
    result = _simulated(requests, initial, policy, blocks, block_size)
    if isinstance(result, str):
        return
    run = _view(result)
    shared = _shared_runs_of(policy, result, requests, initial)
    for other_victim in ("newest", "least-computed"):
        for other_order in ("fcfs", "priority"):
            other = dataclasses.replace(policy, victim=other_victim, order=other_order)
            if other != policy and shared.get(other, "taken") is not None:
                assert _run(requests, initial, other, blocks, block_size) == run, other


def test_priority_order_at_one_priority_takes_an_fcfs_run_that_preempted_its_newest_requests() -> None:
    """Requests arriving one after another on a KV cache too small for all of their outputs: FCFS preempts the
    newest running request, as priority order would (the latest arrival), and gives each back before the
    queue's first. The least-computed rule would pick a shorter one: it takes no such run."""
    requests = [RequestArrival(f"r{i}", 0.001 * i, prompt, 24) for i, prompt in enumerate((4, 4, 4, 16))]
    fcfs = dataclasses.replace(parse_policy("vllm"), max_num_batched_tokens=64)
    result = _simulated(requests, [], fcfs, 17, 4)
    assert not isinstance(result, str)
    demands = result.demands
    assert demands.preempted and demands.worst_priority_victims and demands.arrival_order
    assert not demands.least_computed_victims
    shared = SharedRuns(same_priority=True)
    shared.add(fcfs, CandidateOutcome("vllm", 1.0, None), demands)
    by_priority = dataclasses.replace(fcfs, order="priority")
    assert shared.get(by_priority, "taken") is not None
    assert _run(requests, [], by_priority, 17, 4) == _view(result)
    least_computed = dataclasses.replace(fcfs, victim="least-computed")
    assert shared.get(least_computed, "taken") is None
    assert _run(requests, [], least_computed, 17, 4) != _view(result)


def test_fcfs_fed_out_of_arrival_order_shares_no_run_with_priority_order() -> None:
    """Arrivals in step space enter in the order listed, not that of their arrival times: FCFS then admits a
    later arrival first where priority order (at one priority, by arrival) admits the earlier, with no
    preemption at all. The run records that its queue left arrival order, and priority order does not take it."""
    requests = [
        RequestArrival("r1", 0.002, 8, 8),
        RequestArrival("r0", 0.001, 8, 8),
        RequestArrival("r2", 0.0, 8, 8),
    ]
    fcfs = dataclasses.replace(parse_policy("vllm"), max_num_seqs=1)

    def run(policy: Policy) -> SimResult:
        return simulate(
            requests,
            policy,
            COST,
            num_kv_blocks=9,
            block_size=4,
            arrival_steps={"r2": 0, "r1": 1, "r0": 1},
            record_steps=True,
        )

    result, by_priority = run(fcfs), run(dataclasses.replace(fcfs, order="priority"))
    assert not result.demands.preempted and not result.demands.arrival_order
    assert _view(by_priority) != _view(result)
    shared = SharedRuns(same_priority=True)
    shared.add(fcfs, CandidateOutcome("vllm", 1.0, None), result.demands)
    assert shared.get(dataclasses.replace(fcfs, order="priority"), "taken") is None


@pytest.mark.parametrize("name", [*support.NAMES, "fcfs-kv16-prefix-caching"])
def test_candidates_that_share_a_run_report_what_their_own_runs_report(name: str, monkeypatch) -> None:
    """Each candidate's outcome, shared run or not, equals its own simulation summarised alone, on windows of
    the recorded engines (after the fidelity check, whose self replay the candidates may share): their grid's
    caps of 2x and 4x the engine's are above most windows' request counts, and most windows preempt nothing;
    some windows never run as many requests at once as the grid's half cap."""
    windows = support.windows(name, 1.0)
    policies = [c.policy for c in build_candidates(windows[0].info.scheduler)[1:]]
    slo = Slo(1.0, 0.05)
    shared = below_count = 0
    simulated: list = []

    def recorded(window, policy, **kwargs):
        simulated.append(policy)
        return simulate_window(window, policy, **kwargs)

    for window in windows[:8]:
        check_fidelity(window, slo)
        simulated.clear()
        with monkeypatch.context() as patch:
            patch.setattr(evaluate, "simulate_window", recorded)
            outcomes = run_candidates(window, policies, slo, keep_requests=True)
        shared += sum(p.max_num_seqs >= window.num_requests for p in policies)
        # Shared by the running peak alone: a cap below the request count, not simulated.
        below_count += sum(p.max_num_seqs < window.num_requests and p not in simulated for p in policies)
        for policy, outcome in zip(policies, outcomes, strict=True):
            try:
                alone = candidate_outcome(
                    window, str(policy), simulate_window(window, policy), slo, keep_requests=True
                )
            except ValueError:  # a no-eviction preset that cannot take over this state: reported, not shared
                assert outcome.error
                continue
            assert repr(outcome) == repr(alone)
    assert shared > 0 and below_count > 0


@pytest.mark.parametrize("same_priority", [True, False])
@pytest.mark.parametrize("tasks", [1, 2, 3, 40])
def test_task_groups_keep_policies_that_may_share_a_run_in_one_task(tasks: int, same_priority: bool) -> None:
    """Runs are shared within a task only: the candidates that `SharedRuns` may share (here: the grid's caps
    and budgets, chunked prefill, the long-prefill threshold, the victim rule, priority order at one priority)
    must land in one task, and the split stays a balanced
    partition of the candidates, each task in their order."""
    windows = support.windows("priority-kv16", 1.0)
    policies = [c.policy for c in build_candidates(windows[0].info.scheduler)[1:]]
    groups = task_groups(policies, tasks, same_priority)
    assert 1 <= len(groups) <= tasks and all(groups)
    assert sorted(map(str, (p for g in groups for p in g))) == sorted(map(str, policies))
    for group in groups:
        assert group == [p for p in policies if p in group]
    task_of = {str(p): i for i, group in enumerate(groups) for p in group}
    for taken in policies:
        shared = SharedRuns(same_priority=same_priority)
        # A run that reached no cap, budget or threshold, without a preemption: shared as widely as can be.
        shared.add(taken, CandidateOutcome("x", 1.0, None), RunDemands(0, 0, 0))
        for other in policies:
            if shared.get(other, "y") is not None:
                assert task_of[str(other)] == task_of[str(taken)], (taken, other)
    alone = task_groups(policies, len(policies), same_priority)  # one task per group
    assert len(alone) < len(policies)  # the grid has policies that may share
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= max(map(len, alone))


def test_one_priority_reads_every_request_of_the_window() -> None:
    window = support.windows("priority-kv16", 1.0)[2]
    everyone = [*(r.request for r in window.running), *window.waiting, *window.arrivals]
    assert one_priority(window) == (len({r.priority for r in everyone}) <= 1)
    level = dataclasses.replace(
        window,
        running=tuple(
            dataclasses.replace(r, request=dataclasses.replace(r.request, priority=3)) for r in window.running
        ),
        waiting=tuple(dataclasses.replace(r, priority=3) for r in window.waiting),
        arrivals=tuple(dataclasses.replace(r, priority=3) for r in window.arrivals),
    )
    assert one_priority(level)
    if level.arrivals:
        odd = dataclasses.replace(
            level, arrivals=(dataclasses.replace(level.arrivals[0], priority=4), *level.arrivals[1:])
        )
        assert not one_priority(odd)


def test_shared_runs_hand_a_run_only_to_settings_above_what_its_tests_asked() -> None:
    shared = SharedRuns(same_priority=True)
    default, other = parse_policy("vllm"), parse_policy("sarathi")
    shared.add(default, CandidateOutcome("vllm", 1.0, None), RunDemands(running=100, tokens=5000, chunk=3000))
    shared.add(other, CandidateOutcome("sarathi", 1.0, None, preemptions=2), None)
    taken = {
        spec: shared.get(parse_policy(spec), spec) is not None
        for spec in (
            "vllm",
            "vllm(max_num_seqs=128)",
            "vllm(max_num_seqs=100)",  # the test saw 100 running: a cap of 100 holds a request back
            "vllm(max_num_batched_tokens=4096)",
            "vllm(max_num_batched_tokens=5000,chunked_prefill=false)",
            "vllm(long_prefill_token_threshold=2048)",
            "vllm(long_prefill_token_threshold=3000)",
            "vllm(victim=least-computed)",  # no preemption: either rule
            "sarathi",
            "sarathi(victim=least-computed)",  # no demands known, and it preempted
            "orca",
        )
    }
    assert [spec for spec, took in taken.items() if took] == [
        "vllm",
        "vllm(max_num_seqs=128)",
        "vllm(max_num_batched_tokens=5000,chunked_prefill=false)",
        "vllm(long_prefill_token_threshold=3000)",
        "vllm(victim=least-computed)",
        "sarathi",
    ]


def test_shared_runs_hand_a_preempting_run_only_to_rules_that_would_have_picked_its_victims() -> None:
    default = parse_policy("vllm")
    demands = RunDemands(100, 5000, 3000, preempted=True, least_computed_victims=False)
    specs = (
        "vllm(order=priority)",  # its rule picked each victim, and the queue stayed in arrival order
        "vllm(victim=least-computed)",  # it would have picked another victim
        "vllm(order=priority,max_num_seqs=128)",  # another rule's walk may test the cap otherwise
        "vllm(max_num_seqs=128)",  # the run's own rule
    )

    def taken(demands: RunDemands) -> list[str]:
        shared = SharedRuns(same_priority=True)
        shared.add(default, CandidateOutcome("vllm", 1.0, None, preemptions=3), demands)
        return [spec for spec in specs if shared.get(parse_policy(spec), spec) is not None]

    assert taken(demands) == ["vllm(order=priority)", "vllm(max_num_seqs=128)"]
    # A request given back behind one that arrived before it: FCFS pops otherwise than the heap.
    assert taken(dataclasses.replace(demands, arrival_order=False)) == ["vllm(max_num_seqs=128)"]
    assert taken(dataclasses.replace(demands, worst_priority_victims=False)) == ["vllm(max_num_seqs=128)"]
