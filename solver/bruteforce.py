"""Exhaustive search for the optimal schedule of a tiny window: the reference the CP-SAT model is tested on.

It enumerates every batch the rules allow, from every reachable state, and keeps the best continuation
(dynamic programming over states; time joins the state only when the objective or deadlines depend on
it). Nothing here is
shared with the CP-SAT model: the two are separate readings of the same rules, and tests hold them equal.
Exponential: meant for 2 to 4 requests of a few tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.problem import Objective, Window
from vllm_shadow.solver.schedule import Batch, Deadlines, Schedule

# Per request: (KV tokens held, output tokens emitted, evictions so far).
_RequestState = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class SearchSpace:
    """Which schedules the search may use. The defaults allow everything the verifier accepts with at most
    `max_evictions` recompute preemptions per request."""

    pause: bool = True  # a request holding KV may sit out a batch
    chunking: bool = True  # a prefill may be split across batches
    max_evictions: int = 1


@dataclass(frozen=True, slots=True)
class _Choice:
    evict: bool
    tokens: int  # 0: not in the batch


def exhaustive_optimum(
    window: Window,
    cost: LinearCostModel,
    objective: Objective,
    space: SearchSpace = SearchSpace(),
    deadlines: Deadlines | None = None,
) -> tuple[float, Schedule]:
    """The optimal objective over `space` (every request meeting `deadlines`, if given) and a schedule
    reaching it (raises ValueError if none exists). Batches run as early as they may: delaying one never
    helps a deadline, and GPU cost does not see time."""
    requests = window.requests
    limits = window.limits
    fresh = [r.generated_tokens == 0 for r in requests]
    e2e_weight = objective.e2e / len(requests)
    ttft_weight = objective.ttft / max(sum(fresh), 1)
    timed = objective.needs_time or deadlines is not None
    inf = float("inf")
    first_due = [deadlines.first_token.get(r.request_id, inf) if deadlines else inf for r in requests]
    finish_due = [deadlines.finish.get(r.request_id, inf) if deadlines else inf for r in requests]

    def choices(i: int, state: _RequestState) -> list[_Choice]:
        computed, generated, evictions = state
        request = requests[i]
        if generated == request.output_tokens:
            return [_Choice(False, 0)]
        target = request.prompt_tokens + generated
        options: list[_Choice] = []
        if computed == 0 or space.pause:
            options.append(_Choice(False, 0))
        sizes = range(1, target - computed + 1) if space.chunking else [target - computed]
        options += [_Choice(False, x) for x in sizes]
        if computed > 0 and evictions < space.max_evictions:
            options.append(_Choice(True, 0))
            options += [_Choice(True, x) for x in (range(1, target + 1) if space.chunking else [target])]
        return options

    def batches(states: tuple[_RequestState, ...]) -> Iterator[tuple[_Choice, ...]]:
        for combo in itertools.product(*(choices(i, s) for i, s in enumerate(states))):
            members = [c.tokens for c in combo if c.tokens]
            if (
                members
                and sum(members) <= limits.max_num_batched_tokens
                and len(members) <= limits.max_num_seqs
            ):
                yield combo

    @cache
    def best(states: tuple[_RequestState, ...], clock: float) -> tuple[float, tuple]:
        if all(s[1] == r.output_tokens for s, r in zip(states, requests, strict=True)):
            return 0.0, ()
        found: tuple[float, tuple] = (float("inf"), ())
        for combo in batches(states):
            step = _advance(states, combo, clock)
            if step is None:
                continue
            next_states, start, end, increment = step
            rest, plan = best(next_states, end if timed else 0.0)
            total = increment + rest
            if total < found[0]:
                found = (total, ((combo, start), *plan))
        return found

    def _advance(
        states: tuple[_RequestState, ...], combo: tuple[_Choice, ...], clock: float
    ) -> tuple[tuple[_RequestState, ...], float, float, float] | None:
        """Run one batch: the next states, its start and end, and what it adds to the objective (None if
        its KV does not fit)."""
        news: list[int] = []
        contexts: list[int] = []
        next_states: list[_RequestState] = []
        blocks = 0
        start = clock
        for request, state, choice in zip(requests, states, combo, strict=True):
            computed, generated, evictions = state
            if choice.evict:
                computed, evictions = 0, evictions + 1
            if choice.tokens:
                news.append(choice.tokens)
                contexts.append(computed)
                start = max(start, request.arrival)
                computed += choice.tokens
            if generated < request.output_tokens:
                blocks += limits.blocks(computed)
            next_states.append((computed, generated, evictions))
        if blocks > limits.kv_blocks:
            return None
        end = start + cost.batch_time(news, contexts)
        increment = objective.gpu * (end - start)
        for i, (request, choice) in enumerate(zip(requests, combo, strict=True)):
            computed, generated, evictions = next_states[i]
            if choice.tokens and computed == request.prompt_tokens + generated:
                generated += 1
                if generated == 1 and fresh[i]:
                    if end > first_due[i] + 1e-9:
                        return None
                    increment += ttft_weight * (end - request.arrival)
                if generated == request.output_tokens:
                    if end > finish_due[i] + 1e-9:
                        return None
                    increment += e2e_weight * (end - request.arrival)
                next_states[i] = (computed, generated, evictions)
        return tuple(next_states), start, end, increment

    initial = tuple((r.computed_tokens, r.generated_tokens, 0) for r in requests)
    value, plan = best(initial, window.start)
    best.cache_clear()
    if value == float("inf"):
        raise ValueError("no feasible schedule in the search space")
    ids = [r.request_id for r in requests]
    schedule = Schedule(
        tuple(
            Batch(
                {rid: c.tokens for rid, c in zip(ids, combo, strict=True) if c.tokens},
                tuple(rid for rid, c in zip(ids, combo, strict=True) if c.evict),
            )
            for combo, _start in plan
        )
    )
    return value, schedule
