"""The candidates of a window whose simulations are provably the same run, so that each such run is simulated once.

Two knobs of a policy are read by the simulator in one place each, and there only under a condition that a run
can rule out:

- the sequence cap, in vLLM's admission test `len(running) >= max_num_seqs`, made for a waiting request while
  at most every other request of the window runs: a cap no lower than the window's request count never holds
  one back, so every such cap runs the same steps;
- the preemption victim rule (`victim`), only to pick a victim: a run without a preemption never consults it,
  so the same policy with the other rule runs the same steps, without a preemption either;
- the queue order, priority or FCFS, to order the waiting queue (a heap on (priority, arrival, index), or a
  deque fed in (arrival, index) order) and to pick a victim: when every request of the window has the same
  priority, a run without a preemption is the same under either.

The cap's test is also never failed in a run whose running queue stays below the cap: a run whose queue never
held more than `peak_running` requests at an admission test is the run of every cap above that peak (a cap of
128 shares the default's run when a window never runs 128 requests at once, as when the KV cache binds first).

`tests/test_evaluate_sharing.py` holds the simulator to each of these on random workloads.

Runs are shared within one `run_candidates` call, so a window's candidates are split over tasks by `task_groups`,
which keeps together the policies that may share a run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from vllm_shadow.evaluation.results import CandidateOutcome
from vllm_shadow.solver.policies import Policy
from vllm_shadow.solver.records import RequestRecord
from vllm_shadow.tracking.windows import TrafficWindow

_ANY_VICTIM = "newest"  # the victim rule written into the key of a run without preemptions
_ANY_ORDER = "fcfs"  # the order written there for priority too, where every request has the same priority
_ANY_CAP = 1  # the sequence cap written into the key of a run whose queue stayed below its cap


def peak_running(records: Sequence[RequestRecord], carried: AbstractSet[str], held_at_start: int) -> int:
    """At least the running queue's length at every admission test of a run: the most requests whose
    [first scheduled, finish] spans share one instant. `carried`: ids of the requests running at the start (in
    the queue from before it); `held_at_start`: requests whose last token was in flight at the start, which hold
    a place in the queue at the first schedule under async scheduling (they have no record).

    A request first enters the queue at the start of the step that first runs its tokens (admission comes after
    the step's preemptions, and gives it tokens at once) and leaves it for good once it finished: before the
    next schedule, or under async scheduling right after it (at its finish time). So the closed spans cover
    every schedule at which it is in the queue, and while a victim waits they over-count, which is safe."""
    starts, ends = [], []
    for r in records:
        start = -math.inf if r.request_id in carried else r.first_scheduled
        if start == start:  # NaN: never scheduled, so never in the queue
            starts.append(start)
            ends.append(r.finish if r.finish == r.finish else math.inf)
    starts.sort()
    ends.sort()
    peak = left = 0
    for entered, start in enumerate(starts, 1):
        while ends[left] < start:  # every end before this start is one of an earlier start's (end >= start)
            left += 1
        peak = max(peak, entered - left)
    return peak + held_at_start


@dataclass(slots=True)
class SharedRuns:
    """The outcomes summarised so far on one window, by the runs they came from."""

    num_requests: int  # the window's requests: running, waiting and arriving
    same_priority: bool  # every one of them has the same priority
    by_run: dict[Policy, CandidateOutcome] = field(default_factory=dict)
    without_preemption: dict[Policy, CandidateOutcome] = field(default_factory=dict)
    # Runs that stayed below their cap, by their policy with `_ANY_CAP`: each run's peak (`peak_running`) and
    # outcome, as every cap above the peak runs it; those without preemptions also by their unpreempted key.
    below_cap: dict[Policy, list[tuple[int, CandidateOutcome]]] = field(default_factory=dict)
    below_cap_without_preemption: dict[Policy, list[tuple[int, CandidateOutcome]]] = field(
        default_factory=dict
    )
    # The caps still to be looked up (`expect`), as `_run_of` sees them, by `_share_key`: a run's peak is worth
    # its walk over the records only where one of them differs from the run's own cap. None: always.
    expected_caps: dict[Policy, set[int]] | None = None

    def expect(self, policies: Sequence[Policy]) -> None:
        """The policies that will be looked up."""
        self.expected_caps = {}
        for policy in policies:
            key = _share_key(policy, self.same_priority)
            self.expected_caps.setdefault(key, set()).add(self._run_of(policy).max_num_seqs)

    def _run_of(self, policy: Policy) -> Policy:
        never_binds = max(self.num_requests, 1)
        if policy.max_num_seqs >= never_binds:
            return _with_cap(policy, never_binds)
        return policy

    def _unpreempted_run_of(self, run: Policy) -> Policy:
        return _unpreempted(run, self.same_priority)

    def get(self, policy: Policy, label: str) -> CandidateOutcome | None:
        """The outcome of a run that `policy` runs too, under `label`; None if none is known yet."""
        run = self._run_of(policy)
        found = self.by_run.get(run)
        if found is None:
            found = self.without_preemption.get(self._unpreempted_run_of(run))
        if found is None:
            any_cap = _with_cap(policy, _ANY_CAP)
            found = _above_peak(self.below_cap.get(any_cap), policy.max_num_seqs)
            if found is None:
                unpreempted = self.below_cap_without_preemption.get(self._unpreempted_run_of(any_cap))
                found = _above_peak(unpreempted, policy.max_num_seqs)
        return None if found is None else dataclasses.replace(found, label=label)

    def add(
        self, policy: Policy, outcome: CandidateOutcome, peak_of_run: Callable[[], int] | None = None
    ) -> None:
        """`outcome`: `policy` simulated on the window and summarised (not a failure); `peak_of_run`: the run's
        `peak_running`, where it can be had, called only if an expected policy could take the run by it."""
        run = self._run_of(policy)
        self.by_run[run] = outcome
        if outcome.preemptions == 0:
            self.without_preemption[self._unpreempted_run_of(run)] = outcome
        if peak_of_run is None:
            return
        if self.expected_caps is not None:
            other_caps = self.expected_caps.get(_share_key(policy, self.same_priority), set())
            if not other_caps - {run.max_num_seqs}:
                return
        peak = peak_of_run()
        if peak < policy.max_num_seqs:
            any_cap = _with_cap(policy, _ANY_CAP)
            self.below_cap.setdefault(any_cap, []).append((peak, outcome))
            if outcome.preemptions == 0:
                unpreempted = self._unpreempted_run_of(any_cap)
                self.below_cap_without_preemption.setdefault(unpreempted, []).append((peak, outcome))


# Policies are few and recur in every window (a deployment's grid): their keys are made once, not a
# `dataclasses.replace` per lookup.
@functools.lru_cache(maxsize=4096)
def _with_cap(policy: Policy, cap: int) -> Policy:
    return dataclasses.replace(policy, max_num_seqs=cap)


@functools.lru_cache(maxsize=4096)
def _unpreempted(run: Policy, same_priority: bool) -> Policy:
    """`run`'s key as a run without preemptions: any victim rule, and FCFS for priority at one priority."""
    order = _ANY_ORDER if same_priority and run.order == "priority" else run.order
    return dataclasses.replace(run, victim=_ANY_VICTIM, order=order)


def _share_key(policy: Policy, same_priority: bool) -> Policy:
    """What the policies that may share a run with `policy` have in common: all but the cap, the victim rule and
    (at one priority) the order."""
    return _unpreempted(_with_cap(policy, _ANY_CAP), same_priority)


def _above_peak(runs: list[tuple[int, CandidateOutcome]] | None, cap: int) -> CandidateOutcome | None:
    """The outcome of a run that every cap above its peak runs, `cap` among them."""
    return next((outcome for peak, outcome in runs or () if cap > peak), None)


def one_priority(window: TrafficWindow) -> bool:
    """Whether every request of the window, running, waiting or arriving, has the same priority."""
    priorities = {r.request.priority for r in window.running}
    priorities.update(r.priority for r in window.waiting)
    priorities.update(r.priority for r in window.arrivals)
    return len(priorities) <= 1


def task_groups(policies: Sequence[Policy], tasks: int, same_priority: bool) -> list[list[Policy]]:
    """`policies` split into at most `tasks` non-empty lists, those that may share a run in one list (they
    differ only in the cap, the victim rule, or, at one priority, in priority against FCFS order), each list in
    the order given. Lists are balanced by their number of policies, largest group first, as every policy of a
    group is one simulation when its run is not shared."""
    groups: dict[Policy, list[int]] = {}
    for index, policy in enumerate(policies):
        groups.setdefault(_share_key(policy, same_priority), []).append(index)
    lists: list[list[int]] = [[] for _ in range(max(1, min(tasks, len(groups))))]
    for group in sorted(groups.values(), key=len, reverse=True):  # stable: ties in the order given
        min(lists, key=len).extend(group)
    return [[policies[i] for i in sorted(indices)] for indices in lists if indices]
