"""The recompute tax's definition, shared by the engine's tracker (shadow/tracking/recompute.py prices a real
step) and the simulator (which prices its own steps the same way): which of a step's new tokens are
recomputation, and the same step without them.

vLLM's recompute preemption frees a victim's KV blocks and resets its computed tokens to 0; when the victim is
admitted again it prefills its prompt and every token it had emitted once more. The tokens it computes below
the KV it held when it was preempted are the recomputation (a request preempted again while recomputing still
owes the most it ever held). What they cost is the step's time minus the time of the same step without them:
each victim's recomputed tokens are the first of its new ones, so without them it would run only the rest, from
where its KV had been (and not at all if nothing is left).
"""

from __future__ import annotations

from collections.abc import Sequence


def recomputed_tokens(computed: int, new: int, dropped_kv: int) -> int:
    """Of `new` tokens scheduled for a request holding `computed` KV tokens, those below `dropped_kv` (the KV
    its preemption dropped): computed before, computed again now."""
    # max(0, min(computed + new, dropped_kv) - computed), without the builtins' calls: the simulator calls it
    # on every recomputing chunk, the engine's tracker on every step of a request that owes some.
    end = computed + new
    if end > dropped_kv:
        end = dropped_kv
    return end - computed if end > computed else 0


def without_recompute(
    new_tokens: Sequence[int], context_tokens: Sequence[int], recomputed: Sequence[int]
) -> tuple[list[int], list[int]]:
    """The step without its recomputation, as (new tokens, context tokens) per request: each request's
    recomputed tokens leave its new tokens and join the KV it held before the step. The tax is the step's time
    minus this step's time, on the same cost model."""
    return (
        [new - again for new, again in zip(new_tokens, recomputed, strict=True)],
        [context + again for context, again in zip(context_tokens, recomputed, strict=True)],
    )
