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

`tests/test_evaluate_sharing.py` holds the simulator to each of the three on random workloads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vllm_shadow.evaluation.results import CandidateOutcome
from vllm_shadow.solver.policies import Policy

_ANY_VICTIM = "newest"  # the victim rule written into the key of a run without preemptions
_ANY_ORDER = "fcfs"  # the order written there for priority too, where every request has the same priority


@dataclass(slots=True)
class SharedRuns:
    """The outcomes summarised so far on one window, by the runs they came from."""

    num_requests: int  # the window's requests: running, waiting and arriving
    same_priority: bool  # every one of them has the same priority
    by_run: dict[Policy, CandidateOutcome] = field(default_factory=dict)
    without_preemption: dict[Policy, CandidateOutcome] = field(default_factory=dict)

    def _run_of(self, policy: Policy) -> Policy:
        never_binds = max(self.num_requests, 1)
        if policy.max_num_seqs >= never_binds:
            return dataclasses.replace(policy, max_num_seqs=never_binds)
        return policy

    def _unpreempted_run_of(self, run: Policy) -> Policy:
        order = _ANY_ORDER if self.same_priority and run.order == "priority" else run.order
        return dataclasses.replace(run, victim=_ANY_VICTIM, order=order)

    def get(self, policy: Policy, label: str) -> CandidateOutcome | None:
        """The outcome of a run that `policy` runs too, under `label`; None if none is known yet."""
        run = self._run_of(policy)
        found = self.by_run.get(run)
        if found is None:
            found = self.without_preemption.get(self._unpreempted_run_of(run))
        return None if found is None else dataclasses.replace(found, label=label)

    def add(self, policy: Policy, outcome: CandidateOutcome) -> None:
        """`outcome`: `policy` simulated on the window and summarised (not a failure)."""
        run = self._run_of(policy)
        self.by_run[run] = outcome
        if outcome.preemptions == 0:
            self.without_preemption[self._unpreempted_run_of(run)] = outcome
