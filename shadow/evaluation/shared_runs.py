"""The candidates of a window whose simulations are provably the same run, so that each such run is simulated once.

Some knobs of a policy are read by the simulator only where they can hold a request back, and a run can show
that they never did. Two policies that differ only in such knobs, each in a setting the run never reached, run
the same steps (by induction over the run's decisions: each sees the same state and decides the same way):

- the sequence cap, in vLLM's admission test `len(running) >= max_num_seqs`: a cap no lower than the window's
  request count never holds one back, nor one above the run's running peak (`RunDemands.running`: a cap of 128
  shares the default's run when a window never runs 128 requests at once, as when the KV cache binds first);
- the token budget, which cuts a chunk to what is left of it, stops a pass when nothing is left, and (chunked
  prefill off) holds back a prompt larger than what is left; and with it chunked prefill, which only says
  which of the first and the last happens. A budget no lower than `RunDemands.tokens`, the most tokens that
  the requests at any one schedule could ask for together, never does either;
- the long-prefill threshold, which cuts a chunk larger than itself: one no lower than the largest prefill a
  request could ask for (`RunDemands.prefill_chunk`) never does;
- the preemption victim rule (`victim`), only to pick a victim: a run without a preemption never consults it;
- the queue order, priority or FCFS, to order the waiting queue (a heap on (priority, arrival, index), or a
  deque fed in (arrival, index) order) and to pick a victim: when every request of the window has the same
  priority, a run without a preemption is the same under either.

`tests/test_evaluate_sharing.py` holds the simulator to each of these on random workloads.

Runs are shared within one `run_candidates` call, so a window's candidates are split over tasks by `task_groups`,
which keeps together the policies that may share a run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from vllm_shadow.evaluation.results import CandidateOutcome
from vllm_shadow.solver.policies import Policy
from vllm_shadow.solver.records import RequestRecord
from vllm_shadow.tracking.windows import TrafficWindow


@dataclass(frozen=True, slots=True)
class RunDemands:
    """Upper bounds on what a run asked of the knobs that can hold a request back (`run_demands`)."""

    running: int  # requests in the running queue at an admission test
    tokens: int  # tokens asked for at one schedule, by the running requests and the waiting ones together
    prefill_chunk: int  # tokens one request asked for in one chunk of its prefill


def run_demands(
    records: Sequence[RequestRecord], carried: Mapping[str, int], held_at_start: int
) -> RunDemands:
    """The demands of a run from its request records. `carried`: the requests running at the start (in the queue
    from before it), by id, with the prompt tokens each had left to compute then (0: decoding); `held_at_start`:
    requests whose last token was in flight at the start, which hold a place in the queue at the first schedule
    under async scheduling (they have no record).

    Running: a request first enters the queue at the start of the step that first runs its tokens (admission
    comes after the step's preemptions, and gives it tokens at once) and leaves it for good once it finished:
    before the next schedule, or under async scheduling right after it (at its finish time). So the closed
    [first scheduled, finish] spans cover every schedule at which it is in the queue (while a victim waits they
    over-count, which is safe), and the most of them that share an instant bound the queue.

    Tokens: a schedule's budget tests each compare what the step gave the requests before (running ones, and
    waiting ones it admitted) plus what the next asks with the budget. A request asks at most for its prompt
    from its first schedule to the end of the step that computed its prompt's last token (its first token),
    and then for one token a step until its finish; one that is ever preempted, at most for its prompt and
    output (a resumed request computes its generated tokens again) over its whole [first scheduled, finish].
    The waiting pass stops at the first request it does not admit, so a pass looks at one waiting request
    beyond those admitted, asking for no more than the most any request asks. The most the spans weigh at one
    instant, plus that, bounds every test of the run (a request asks for at least one token, so that also
    bounds the test that some budget is left)."""
    starts, ends = [], []
    weighted: list[tuple[float, int, int]] = []  # (instant, 0: span opens / 1: closes, tokens)
    most_asked = 0  # by one request at once
    for r in records:
        left = carried.get(r.request_id)
        first_scheduled, first_token, finish = r.first_scheduled, r.first_token, r.finish
        if finish != finish:  # NaN: unfinished
            finish = math.inf
        if left is None:
            prefill = r.prompt_tokens
        else:
            first_scheduled, prefill = -math.inf, left
        if r.preemptions:
            prefill = r.prompt_tokens + r.output_tokens
        most_asked = max(most_asked, prefill)
        if first_scheduled != first_scheduled:  # NaN: never scheduled, so never in the queue
            continue
        starts.append(first_scheduled)
        ends.append(finish)
        if r.preemptions:
            weighted.append((first_scheduled, 0, prefill))
            weighted.append((finish, 1, prefill))
            continue
        decoding_from = first_scheduled
        if prefill > 0:
            decoding_from = first_token if first_token == first_token else math.inf
            weighted.append((first_scheduled, 0, prefill))
            weighted.append((decoding_from, 1, prefill))
        if decoding_from < math.inf:
            weighted.append((decoding_from, 0, 1))
            weighted.append((finish, 1, 1))
    starts.sort()
    ends.sort()
    peak = left_index = 0
    for entered, start in enumerate(starts, 1):
        while (
            ends[left_index] < start
        ):  # every end before this start is one of an earlier start's (end >= start)
            left_index += 1
        peak = max(peak, entered - left_index)
    weighted.sort()  # at one instant, spans open before others close: the spans are closed
    tokens = most_tokens = 0
    for _, closes, weight in weighted:
        if closes:
            tokens -= weight
        else:
            tokens += weight
            most_tokens = max(most_tokens, tokens)
    return RunDemands(peak + held_at_start, most_tokens + most_asked, most_asked)


@dataclass(slots=True)
class _Run:
    policy: Policy
    outcome: CandidateOutcome
    demands_of: Callable[[], RunDemands] | None  # called once, the first time a lookup needs the demands
    demands: RunDemands | None = None

    def demands_now(self) -> RunDemands | None:
        if self.demands is None and self.demands_of is not None:
            self.demands, self.demands_of = self.demands_of(), None
        return self.demands


@dataclass(slots=True)
class SharedRuns:
    """The outcomes summarised so far on one window, by the runs they came from."""

    num_requests: int  # the window's requests: running, waiting and arriving
    same_priority: bool  # every one of them has the same priority
    runs: dict[Policy, list[_Run]] = field(default_factory=dict)  # by `_share_key`

    def get(self, policy: Policy, label: str) -> CandidateOutcome | None:
        """The outcome of a run that `policy` runs too, under `label`; None if none is known yet."""
        for run in self.runs.get(_share_key(policy, self.same_priority), ()):
            if self._runs_too(run, policy):
                return dataclasses.replace(run.outcome, label=label)
        return None

    def add(
        self, policy: Policy, outcome: CandidateOutcome, demands_of: Callable[[], RunDemands] | None = None
    ) -> None:
        """`outcome`: `policy` simulated on the window and summarised (not a failure); `demands_of`: the run's
        `run_demands`, where they can be had, called only if a policy looked up later needs them."""
        self.runs.setdefault(_share_key(policy, self.same_priority), []).append(
            _Run(policy, outcome, demands_of)
        )

    def _runs_too(self, run: _Run, policy: Policy) -> bool:
        """Whether `policy`, which has `run.policy`'s share key, runs `run` too: every knob it sets otherwise
        is one the run never reached, neither at its own setting nor at `policy`'s."""
        ran = run.policy
        if ran == policy:
            return True
        preempted = run.outcome.preemptions > 0
        if preempted and (ran.victim != policy.victim or ran.order != policy.order):
            return False
        cap = min(ran.max_num_seqs, policy.max_num_seqs)
        if ran.max_num_seqs != policy.max_num_seqs and cap < self.num_requests:
            demands = run.demands_now()
            if demands is None or demands.running >= cap:
                return False
        if (ran.max_num_batched_tokens, ran.chunked_prefill) != (
            policy.max_num_batched_tokens,
            policy.chunked_prefill,
        ):
            demands = run.demands_now()
            if demands is None or demands.tokens > min(
                ran.max_num_batched_tokens, policy.max_num_batched_tokens
            ):
                return False
        thresholds = (ran.long_prefill_token_threshold, policy.long_prefill_token_threshold)
        if thresholds[0] != thresholds[1]:
            demands = run.demands_now()
            if demands is None or any(0 < t < demands.prefill_chunk for t in thresholds):
                return False
        return True


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
