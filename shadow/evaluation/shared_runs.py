"""The candidates of a window whose simulations are provably the same run, so that each such run is simulated once.

Some knobs of a policy are read by the simulator only in tests that can hold a request back, and a run records
the most that each of its tests asked of them (`RunDemands`). Two policies that differ only in such knobs, each
set above what the run asked, run the same steps: by induction over the run's decisions, each sees the same
state and decides the same way. The knobs:

- the sequence cap, in vLLM's admission test `len(running) >= max_num_seqs` (a cap of 128 shares the default's
  run when a window never runs 128 requests at once, as when the KV cache binds first);
- the token budget, which cuts a chunk to what is left of it, stops a pass when nothing is left, and (chunked
  prefill off) holds back a prompt larger than what is left; and with it chunked prefill, which only says which
  of the first and the last happens;
- the long-prefill threshold, which cuts a chunk larger than itself;
- the preemption victim rule (newest, least-computed, or under priority order the worst priority), only to pick
  a victim: a rule that would have picked every victim the run picked, from the state the run had then, runs
  it too (a run without a preemption never consults one);
- the queue order, priority or FCFS, to order the waiting queue (a heap on (priority, arrival, index), or a
  list fed at the back in (arrival, index) order, preempted requests given back at the front) and to pick a
  victim: when every request of the window has the same priority, both pop alike while the queue stays in
  (arrival, index) order, each request given back before the queue's first.
A run that preempted may step otherwise under another rule (FCFS pops its victims eagerly where the others walk
vLLM's loop), with tests of the other knobs it did not make: another rule takes it only with those knobs equal.

`tests/test_evaluate_sharing.py` holds the simulator to each of these on random workloads.

Runs are shared within one `run_candidates` call, so a window's candidates are split over tasks by `task_groups`,
which keeps together the policies that may share a run.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm_shadow.evaluation.results import CandidateOutcome
from vllm_shadow.solver.policies import Policy
from vllm_shadow.solver.records import RunDemands
from vllm_shadow.tracking.windows import TrafficWindow


@dataclass(frozen=True, slots=True)
class _Run:
    policy: Policy
    outcome: CandidateOutcome
    demands: RunDemands | None  # None: shared with its own policy only


@dataclass(slots=True)
class SharedRuns:
    """The outcomes summarised so far on one window, by the runs they came from."""

    same_priority: bool  # every request of the window, running, waiting or arriving, has the same priority
    runs: dict[Policy, list[_Run]] = field(default_factory=dict)  # by `_share_key`

    def get(self, policy: Policy, label: str) -> CandidateOutcome | None:
        """The outcome of a run that `policy` runs too, under `label`; None if none is known yet."""
        for run in self.runs.get(_share_key(policy, self.same_priority), ()):
            if _runs_too(run, policy):
                return dataclasses.replace(run.outcome, label=label)
        return None

    def add(self, policy: Policy, outcome: CandidateOutcome, demands: RunDemands | None) -> None:
        """`outcome`: `policy` simulated on the window and summarised (not a failure), with its run's demands."""
        self.runs.setdefault(_share_key(policy, self.same_priority), []).append(
            _Run(policy, outcome, demands)
        )


def _runs_too(run: _Run, policy: Policy) -> bool:
    """Whether `policy`, which has `run.policy`'s share key, runs `run` too: every knob it sets otherwise is
    one whose tests the run passed both at its own setting and at `policy`'s."""
    ran, demands = run.policy, run.demands
    if ran == policy:
        return True
    if demands is None:
        return False
    if ran.order != policy.order and not demands.arrival_order:  # at one priority (`_share_key`)
        return False
    rule = _victim_rule(policy)
    if demands.preempted and rule != _victim_rule(ran):
        if not _rule_agreed(demands, rule):
            return False
        if dataclasses.replace(ran, victim=policy.victim, order=policy.order) != policy:
            return False
    if ran.max_num_seqs != policy.max_num_seqs and demands.running >= min(
        ran.max_num_seqs, policy.max_num_seqs
    ):
        return False
    budgets = (ran.max_num_batched_tokens, policy.max_num_batched_tokens)
    if (budgets[0], ran.chunked_prefill) != (budgets[1], policy.chunked_prefill) and demands.tokens > min(
        budgets
    ):
        return False
    thresholds = (ran.long_prefill_token_threshold, policy.long_prefill_token_threshold)
    return thresholds[0] == thresholds[1] or all(t == 0 or t >= demands.chunk for t in thresholds)


def _victim_rule(policy: Policy) -> str:
    """The rule that picks `policy`'s victims (`Simulator._schedule_literal`)."""
    if policy.victim == "least-computed":
        return "least-computed"
    return "worst-priority" if policy.order == "priority" else "newest"


def _rule_agreed(demands: RunDemands, rule: str) -> bool:
    """Whether `rule` would have picked every victim of the run."""
    if rule == "least-computed":
        return demands.least_computed_victims
    return demands.worst_priority_victims if rule == "worst-priority" else demands.newest_victims


# The knobs set to these in a share key: any run may be shared across them (`SharedRuns._runs_too`).
_ANY_CAP = 1
_ANY_BUDGET = 1
_ANY_VICTIM = "newest"
_ANY_ORDER = "fcfs"  # for priority too, where every request has the same priority


# Policies are few and recur in every window (a deployment's grid): their keys are made once, not a
# `dataclasses.replace` per lookup.
@functools.lru_cache(maxsize=4096)
def _share_key(policy: Policy, same_priority: bool) -> Policy:
    """What the policies that may share a run with `policy` have in common: all but the cap, the token budget,
    chunked prefill, the long-prefill threshold, the victim rule and (at one priority) the order."""
    return dataclasses.replace(
        policy,
        max_num_seqs=_ANY_CAP,
        max_num_batched_tokens=_ANY_BUDGET,
        chunked_prefill=True,
        long_prefill_token_threshold=0,
        victim=_ANY_VICTIM,
        order=_ANY_ORDER if same_priority and policy.order == "priority" else policy.order,
    )


def one_priority(window: TrafficWindow) -> bool:
    """Whether every request of the window, running, waiting or arriving, has the same priority."""
    priorities = {r.request.priority for r in window.running}
    priorities.update(r.priority for r in window.waiting)
    priorities.update(r.priority for r in window.arrivals)
    return len(priorities) <= 1


def task_groups(policies: Sequence[Policy], tasks: int, same_priority: bool) -> list[list[Policy]]:
    """`policies` split into at most `tasks` non-empty lists, those that may share a run in one list (they
    differ only in the knobs `SharedRuns` shares runs across), each list in the order given. Lists are balanced
    by their number of policies, largest group first, as every policy of a group is one simulation when its run
    is not shared."""
    groups: dict[Policy, list[int]] = {}
    for index, policy in enumerate(policies):
        groups.setdefault(_share_key(policy, same_priority), []).append(index)
    lists: list[list[int]] = [[] for _ in range(max(1, min(tasks, len(groups))))]
    for group in sorted(groups.values(), key=len, reverse=True):  # stable: ties in the order given
        min(lists, key=len).extend(group)
    return [[policies[i] for i in sorted(indices)] for indices in lists if indices]
