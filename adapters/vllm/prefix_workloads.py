"""Workloads whose prompts share prefixes, as token ids vLLM's prefix cache really hits.

A prompt is built from runs of pseudo-random token ids, one run per key: two prompts that start with the same
keys share those tokens, so their full KV blocks hash alike and the second finds them in vLLM's prefix cache.
`prompt_from_keys` is how the GPU-scale fidelity harness (benchmarks/fidelity_scale.py) turns Mooncake's hash
ids into prompts; the tiny CPU engine's workloads below use it the same way:

- `shared_system_prompts`: a few system prompts of a few blocks each, every request adding its own question;
- `conversations`: multi-turn chats whose every turn extends the previous turn's prompt token for token (its
  prompt, an assistant reply of the previous turn's output length, then a new user message), each turn sent
  when the previous one finished;
- `mooncake_conversations`: the bundled Mooncake trace's requests that continue an earlier one, with their hash
  ids mapped to runs of tokens.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_shadow.adapters.events import RequestArrival

_POOL = [random.Random(7).randrange(100, 30000) for _ in range(1 << 18)]


def token_run(key: int, n: int) -> list[int]:
    """`n` pseudo-random token ids, a function of `key`; different keys start differently (two leading ids
    spell the key), so their chained block hashes never meet."""
    offset = (key * 7919) % (len(_POOL) - n - 2) if n + 2 < len(_POOL) else 0
    head = [100 + key % 20000, 100 + (key // 20000) % 20000]
    return (head + _POOL[offset : offset + n])[:n] if n + 2 < len(_POOL) else head + _POOL[: n - 2]


def prompt_from_keys(keys: Sequence[int], length: int, run_tokens: int) -> list[int]:
    """A prompt of `length` tokens: the runs of `run_tokens` tokens of `keys` in order, cut to `length` (one
    key: its run alone, `length` long)."""
    if len(keys) == 1:
        return token_run(keys[0], length)
    return [t for key in keys for t in token_run(key, run_tokens)][:length]


@dataclass(frozen=True, slots=True)
class PromptedRequest:
    """A request with its prompt's token ids. `after` names the request whose finish it waits for (a
    conversation's previous turn); its `arrival.time` then counts from that finish, else from the start.
    `after_output`: its prompt is the `after` request's prompt and the tokens the engine generated for it, then
    `prompt_token_ids` (a chat client sending the whole history back); `arrival.prompt_tokens` counts it all."""

    arrival: RequestArrival
    prompt_token_ids: tuple[int, ...]
    after: str | None = None
    after_output: bool = False


def _prompted(arrival: RequestArrival, tokens: Sequence[int], after: str | None = None) -> PromptedRequest:
    return PromptedRequest(dataclasses.replace(arrival, prompt_tokens=len(tokens)), tuple(tokens), after)


def shared_system_prompts(
    requests: Sequence[RequestArrival],
    *,
    system_prompts: int = 3,
    block_size: int = 128,
    min_system_blocks: int = 2,
    max_system_blocks: int = 4,
    max_question_tokens: int = 300,
    seed: int = 11,
) -> list[PromptedRequest]:
    """Each request of `requests` (times, output lengths, priorities kept) asks its own question after one of
    `system_prompts` system prompts of `min_system_blocks`..`max_system_blocks` whole blocks; its question is
    its own prompt length, capped at `max_question_tokens`."""
    rng = random.Random(seed)
    systems = [
        token_run(10**6 + s, block_size * rng.randint(min_system_blocks, max_system_blocks))
        for s in range(system_prompts)
    ]
    return [
        _prompted(
            r,
            systems[rng.randrange(system_prompts)]
            + token_run(2 * 10**6 + i, max(1, min(max_question_tokens, r.prompt_tokens))),
        )
        for i, r in enumerate(requests)
    ]


def conversations(
    count: int,
    turns: int,
    *,
    first_message_tokens: tuple[int, int] = (100, 400),
    user_message_tokens: tuple[int, int] = (20, 120),
    output_tokens: tuple[int, int] = (16, 96),
    think_seconds: float = 0.05,
    priorities: int = 0,
    system_prompts: int = 0,
    system_prompt_tokens: int = 256,
    engine_replies: bool = False,
    seed: int = 5,
) -> list[PromptedRequest]:
    """`count` conversations of `turns` turns. Turn k's prompt is turn k-1's prompt, then an assistant reply as
    long as turn k-1's output (token ids chosen here: the engine's own output is random-weight noise), then a
    new user message; it is sent `think_seconds` after turn k-1 finished. First turns arrive 0.1 s apart.
    `priorities` > 0 gives conversation c priority c mod `priorities`; `system_prompts` > 0 starts conversation
    c with system prompt c mod `system_prompts` (`system_prompt_tokens` long), shared across conversations.
    `engine_replies`: the assistant reply in turn k's prompt is what the engine generated for turn k-1, as a
    chat client sends it back (see `PromptedRequest.after_output`)."""
    rng = random.Random(seed)
    out: list[PromptedRequest] = []
    for c in range(count):
        priority = c % priorities if priorities else 0
        system = token_run(10**6 + 7 + c % system_prompts, system_prompt_tokens) if system_prompts else []
        prompt = system + token_run(3 * 10**6 + c * 100, rng.randint(*first_message_tokens))
        previous: str | None = None
        message: list[int] = []
        for k in range(turns):
            request_id = f"c{c}t{k}"
            output = rng.randint(*output_tokens)
            arrival = RequestArrival(
                request_id,
                think_seconds if previous else 0.1 * c,
                len(prompt),
                output,
                priority=priority,
            )
            if engine_replies and previous:
                out.append(PromptedRequest(arrival, tuple(message), previous, after_output=True))
            else:
                out.append(_prompted(arrival, prompt, previous))
            reply = token_run(4 * 10**6 + c * 100 + k, output)  # with engine_replies, its length only
            message = token_run(5 * 10**6 + c * 100 + k, rng.randint(*user_message_tokens))  # the next turn's
            prompt = prompt + reply + message
            previous = request_id
    return out


def _parents(requests: Sequence[RequestArrival], min_shared: int) -> dict[int, int]:
    """For each request that shares at least `min_shared` leading hash ids with an earlier one, the latest such
    request with the longest shared prefix: the turn it continues."""
    latest: dict[tuple[int, ...], int] = {}
    parents: dict[int, int] = {}
    for i, r in enumerate(requests):
        hashes = r.prefix_block_hashes
        for n in range(len(hashes), min_shared - 1, -1):
            parent = latest.get(hashes[:n])
            if parent is not None:
                parents[i] = parent
                break
        for n in range(1, len(hashes) + 1):
            latest[hashes[:n]] = i
    return parents


def mooncake_conversations(
    requests: Sequence[RequestArrival],
    trace_block_tokens: int,
    *,
    count: int = 40,
    block_tokens: int = 128,
    max_prompt_tokens: int = 1000,
    max_output_tokens: int = 128,
    seconds: float = 2.0,
    priorities: int = 0,
) -> list[PromptedRequest]:
    """Whole conversations of a trace with hash ids (Mooncake), the earliest first, up to `count` requests: a
    request continues the latest earlier one with which it shares the most (2+) leading hash ids. In trace
    order, their arrivals squeezed into `seconds`. Each trace block of `trace_block_tokens` becomes `block_tokens`
    tokens (one CPU block), so prompt and output lengths scale by the same factor, capped for the tiny engine;
    a prompt is its hash ids' runs, as the GPU-scale harness builds it."""
    parents = _parents(requests, 2)
    conversations: dict[int, list[int]] = {}  # first turn -> its turns, in trace order
    first_turn: dict[int, int] = {}
    for i in range(len(requests)):
        first_turn[i] = first_turn[parents[i]] if i in parents else i
        conversations.setdefault(first_turn[i], []).append(i)
    members: list[int] = []
    for turns in conversations.values():  # whole conversations, by first turn, up to `count` requests
        if len(turns) > 1 and len(members) + len(turns) <= count:
            members += turns
    members.sort()
    if not members:
        return []
    scale = block_tokens / trace_block_tokens
    t0, span = requests[members[0]].time, (requests[members[-1]].time - requests[members[0]].time) or 1.0
    out = []
    for n, i in enumerate(members):
        r = requests[i]
        length = max(1, min(max_prompt_tokens, round(r.prompt_tokens * scale)))
        arrival = dataclasses.replace(
            r,
            request_id=f"m{i}",
            time=(r.time - t0) / span * seconds,
            output_tokens=max(1, min(max_output_tokens, round((r.output_tokens or 1) * scale))),
            priority=n % priorities if priorities else 0,
        )
        out.append(_prompted(arrival, prompt_from_keys(r.prefix_block_hashes, length, block_tokens)))
    return out
