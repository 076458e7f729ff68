"""What the optimal scheduler is asked: a window of requests, the engine's limits, what to minimise.

A window is self-contained: the requests that arrive in it (output lengths known: the optimum is an oracle,
as in INFERMAX) plus the requests already in the engine when it starts, each with the KV it holds and the
tokens it has emitted. The CP-SAT model, the exhaustive search, the bounds and the verifier read only these.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from vllm_shadow.adapters.events import RequestArrival

UNLIMITED = 2**31 - 1  # a token budget or sequence cap that never binds


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True, init=False)
class WindowRequest:
    request_id: str
    arrival: float  # seconds; before the window start for a request already running
    prompt_tokens: int
    output_tokens: int
    computed_tokens: int = 0  # KV tokens held at the window start
    generated_tokens: int = 0  # output tokens already emitted at the window start

    # Written out rather than generated: the live shadow makes ~240 a window for its bounds, and the generated
    # __init__ (an attribute lookup and object.__setattr__ per field, then __post_init__ reading them back)
    # cost 2.5 times this. The checks read the arguments; the fields are set through their slots.
    def __init__(
        self,
        request_id: str,
        arrival: float,
        prompt_tokens: int,
        output_tokens: int,
        computed_tokens: int = 0,
        generated_tokens: int = 0,
    ) -> None:
        if prompt_tokens < 1 or output_tokens < 1:
            raise ValueError(f"request {request_id}: prompt and output must be >= 1 token")
        if not 0 <= generated_tokens < output_tokens:
            raise ValueError(f"request {request_id}: generated tokens must be in [0, output)")
        if not 0 <= computed_tokens < prompt_tokens + generated_tokens:
            # The step that emits the next output token processes at least one token.
            raise ValueError(f"request {request_id}: computed tokens {computed_tokens} out of range")
        _set_request_id(self, request_id)
        _set_arrival(self, arrival)
        _set_prompt_tokens(self, prompt_tokens)
        _set_output_tokens(self, output_tokens)
        _set_computed_tokens(self, computed_tokens)
        _set_generated_tokens(self, generated_tokens)

    @property
    def target_tokens(self) -> int:
        """KV tokens after the step that emits the next output token: the prompt plus what was emitted."""
        return self.prompt_tokens + self.generated_tokens

    @property
    def remaining_outputs(self) -> int:
        return self.output_tokens - self.generated_tokens

    @property
    def running(self) -> bool:
        return self.computed_tokens > 0

    @property
    def peak_tokens(self) -> int:
        """KV tokens held in the step that emits the last output token (the last token is never computed)."""
        return self.prompt_tokens + self.output_tokens - 1


# The slots' own setters: they write a frozen instance's fields without its __setattr__ (which refuses).
_set_request_id = WindowRequest.request_id.__set__
_set_arrival = WindowRequest.arrival.__set__
_set_prompt_tokens = WindowRequest.prompt_tokens.__set__
_set_output_tokens = WindowRequest.output_tokens.__set__
_set_computed_tokens = WindowRequest.computed_tokens.__set__
_set_generated_tokens = WindowRequest.generated_tokens.__set__


_request_id = attrgetter("request_id")
_computed_tokens = attrgetter("computed_tokens")
_prompt_tokens = attrgetter("prompt_tokens")
_output_tokens = attrgetter("output_tokens")


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """What bounds a batch. `kv_blocks` counts usable blocks (vLLM's count minus its null block).

    The token budget and sequence cap are scheduler settings, not hardware: the optimum is unlimited by
    default, so that it bounds every configuration the shadow could recommend.
    """

    kv_blocks: int
    block_size: int = 16
    max_num_seqs: int = UNLIMITED
    max_num_batched_tokens: int = UNLIMITED

    def __post_init__(self) -> None:
        if min(self.kv_blocks, self.block_size, self.max_num_seqs, self.max_num_batched_tokens) < 1:
            raise ValueError(f"engine limits must be positive: {self}")

    def blocks(self, tokens: int) -> int:
        return cdiv(tokens, self.block_size)


@dataclass(frozen=True, slots=True)
class Window:
    requests: tuple[WindowRequest, ...]
    limits: EngineLimits
    start: float = 0.0  # when the engine may run its first batch
    # What analyses derive from the window and read more than once, computed on first use (the bounds' per-request
    # columns: the live shadow bounds each window twice, and walking its requests in Python was most of that).
    # Not part of the window's value: neither compared, nor printed, nor passed on by `dataclasses.replace`.
    memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The live shadow makes a window per evaluated window: the checks read the requests' fields with
        # attrgetter (no bytecode per request), and count exactly only where a cheap upper bound does not fit.
        requests, kv_blocks, block_size = self.requests, self.limits.kv_blocks, self.limits.block_size
        if len(set(map(_request_id, requests))) != len(requests):
            raise ValueError("request ids in a window must be unique")
        # Each request holds at most one block more than its tokens fill whole: an upper bound of what they hold.
        if sum(map(_computed_tokens, requests)) // block_size + len(requests) > kv_blocks:
            held = sum([-(-r.computed_tokens // block_size) for r in requests])
            if held > kv_blocks:
                raise ValueError(f"running requests hold {held} blocks, more than the {kv_blocks} usable")
        # Blocks grow with tokens: if the longest prompt and the longest output would fit together, every
        # request does; else the first that does not is named.
        if (
            requests
            and cdiv(max(map(_prompt_tokens, requests)) + max(map(_output_tokens, requests)) - 1, block_size)
            > kv_blocks
        ):
            for r in requests:
                if self.limits.blocks(r.peak_tokens) > kv_blocks:
                    raise ValueError(f"request {r.request_id} can never fit in {kv_blocks} KV blocks")

    def __getstate__(self) -> tuple:
        return self.requests, self.limits, self.start  # a copy or a pickle starts with an empty memo

    def __setstate__(self, state: tuple) -> None:
        for name, value in zip(("requests", "limits", "start"), state, strict=True):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "memo", {})

    def by_id(self) -> dict[str, WindowRequest]:
        return {r.request_id: r for r in self.requests}

    @classmethod
    def from_arrivals(cls, arrivals: Sequence[RequestArrival], limits: EngineLimits) -> Window:
        """A window of fresh requests from trace or mirror arrivals (output lengths must be known)."""
        requests = []
        for a in arrivals:
            if a.output_tokens is None:
                raise ValueError(f"request {a.request_id}: the optimum needs its output length")
            requests.append(WindowRequest(a.request_id, a.time, a.prompt_tokens, a.output_tokens))
        start = min((r.arrival for r in requests), default=0.0)
        return cls(tuple(requests), limits, start)

    def to_arrivals(self) -> list[RequestArrival]:
        return [
            RequestArrival(r.request_id, r.arrival, r.prompt_tokens, r.output_tokens) for r in self.requests
        ]


_TERMS = ("gpu", "e2e", "ttft")


@dataclass(frozen=True, slots=True)
class Objective:
    """Weighted sum of GPU seconds (sum of batch times), mean end-to-end latency and mean TTFT (seconds).

    TTFT is averaged over the requests that emit their first token inside the window; a running request's
    first token is history.
    """

    gpu: float = 1.0
    e2e: float = 0.0
    ttft: float = 0.0
    weights: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = (self.gpu, self.e2e, self.ttft)
        if any(not (math.isfinite(v) and v >= 0) for v in values) or not any(values):
            raise ValueError(f"objective weights must be non-negative and not all zero: {values}")
        object.__setattr__(self, "weights", values)

    @property
    def needs_time(self) -> bool:
        """GPU cost alone does not depend on when batches run: idle time is free, so arrivals never bind
        it (any schedule, delayed to start after the last arrival, is feasible at the same cost)."""
        return self.e2e > 0 or self.ttft > 0

    def value(self, gpu_seconds: float, mean_e2e: float, mean_ttft: float) -> float:
        total = self.gpu * gpu_seconds + self.e2e * mean_e2e
        if self.ttft:
            total += self.ttft * (mean_ttft if mean_ttft == mean_ttft else 0.0)
        return total

    def __str__(self) -> str:
        nonzero = [(name, w) for name, w in zip(_TERMS, self.weights, strict=True) if w]
        if len(nonzero) == 1 and nonzero[0][1] == 1.0:
            return nonzero[0][0]
        return "mix:" + ",".join(f"{name}={w:g}" for name, w in nonzero)


_MIX_ITEM = re.compile(r"^\s*(gpu|e2e|ttft)\s*=\s*([0-9.eE+-]+)\s*$")


def parse_objective(text: str) -> Objective:
    """`gpu`, `e2e`, `ttft`, or `mix:gpu=1,e2e=0.5,ttft=2` (weights on seconds)."""
    text = text.strip().lower()
    if text in _TERMS:
        return Objective(**{name: float(name == text) for name in _TERMS})
    if text.startswith("mix:"):
        weights = dict.fromkeys(_TERMS, 0.0)
        for item in filter(None, text[4:].split(",")):
            match = _MIX_ITEM.match(item)
            if not match:
                raise ValueError(f"bad objective term {item!r}: expected gpu=W, e2e=W or ttft=W")
            weights[match.group(1)] = float(match.group(2))
        return Objective(**weights)
    raise ValueError(f"unknown objective {text!r}: expected gpu, e2e, ttft or mix:gpu=W,e2e=W,ttft=W")
