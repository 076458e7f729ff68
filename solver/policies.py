"""The scheduler family: one parametrised algorithm, and the named presets that set its knobs.

INFERMAX's view is that the schedulers people compare (vLLM, Sarathi-Serve, Orca, FasterTransformer, LightLLM,
ranking variants, no-eviction) are settings of one loop over a waiting queue and a running queue. `Policy` holds
those settings; `vllm_shadow.solver.simulator` runs the loop. A policy is spelled as a preset with keyword
overrides, e.g.
`vllm(max_num_seqs=64,max_num_batched_tokens=2048)`; `str(policy)` gives back the canonical spelling, which the
live shadow uses as the candidate label.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, fields
from typing import Literal

Order = Literal["fcfs", "priority", "prompt", "output"]
Batching = Literal["continuous", "prefill-first", "static"]
Admission = Literal["chunk", "full-prompt", "future-peak"]
Victim = Literal["newest", "least-computed"]


@dataclass(frozen=True, slots=True)
class Policy:
    """Knobs of the one scheduling loop (see `vllm_shadow.solver.simulator` for what each does)."""

    preset: str = "vllm"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # A prompt may be split across steps; off means a waiting prompt must fit whole in the step's budget.
    chunked_prefill: bool = True
    # Cap on a running request's chunk, as vLLM's long_prefill_token_threshold (0 = none).
    long_prefill_token_threshold: int = 0
    # Waiting-queue order: arrival (fcfs), (priority, arrival), shortest prompt first, shortest output first.
    order: Order = "fcfs"
    # continuous: every step walks running then admits (vLLM V1, Sarathi, Orca); prefill-first: a step either
    # admits prefills only or decodes (vLLM V0); static: admit only when the running batch is empty (FT).
    batching: Batching = "continuous"
    # Walk running decodes before running prefill chunks (Sarathi's stall-free order) instead of admission order.
    decode_first: bool = False
    # What a waiting request must fit to be admitted: its first chunk, its whole current sequence (vLLM V1's
    # scheduler_reserve_full_isl), or the projected peak of all running requests (LightLLM).
    admission: Admission = "full-prompt"
    # Recompute preemption when KV runs out; False is INFERMAX's no-eviction mode: admission reserves
    # prompt + output blocks, so nothing is ever preempted.
    eviction: bool = True
    # Fraction of KV blocks kept free when admitting (vLLM V1 default 0.0; V0 used 0.01).
    watermark: float = 0.0
    # vLLM's automatic prefix caching: a request admitted reuses the cached full blocks of its prompt's prefix
    # (and a resumed one its own surviving blocks); freed blocks stay cached until evicted (solver.kv_cache).
    enable_prefix_caching: bool = False
    # vLLM's AsyncScheduler: step N+1 is scheduled before step N's output is processed, so a request that
    # produced its last token in step N still holds its blocks and its place in the running queue then.
    async_scheduling: bool = False
    # Recompute-preemption victim: vLLM's newest running request (the worst priority under priority order), or
    # the one with the fewest computed tokens, the cheapest to recompute (vLLM RFC #54644; not in vLLM yet).
    victim: Victim = "newest"

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0")
        if self.enable_prefix_caching and not self.eviction:
            raise ValueError(
                "enable_prefix_caching needs eviction: reserving blocks at admission ignores hits"
            )
        if self.async_scheduling and self.batching != "continuous":
            raise ValueError("async_scheduling is vLLM V1's: it needs continuous batching")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        for name, allowed in (
            ("order", Order),
            ("batching", Batching),
            ("admission", Admission),
            ("victim", Victim),
        ):
            if getattr(self, name) not in allowed.__args__:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed.__args__)}; got {getattr(self, name)!r}"
                )

    def __str__(self) -> str:
        return _spelling(self)

    def vllm_flags(self) -> list[str]:
        """The vLLM command-line flags that select this policy (only meaningful for the vllm preset)."""
        flags = [
            f"--max-num-seqs {self.max_num_seqs}",
            f"--max-num-batched-tokens {self.max_num_batched_tokens}",
            "--enable-chunked-prefill" if self.chunked_prefill else "--no-enable-chunked-prefill",
            f"--scheduling-policy {self.order}",
        ]
        if self.enable_prefix_caching:
            flags.append("--enable-prefix-caching")
        if self.async_scheduling:
            flags.append("--async-scheduling")
        if self.long_prefill_token_threshold:
            flags.append(f"--long-prefill-token-threshold {self.long_prefill_token_threshold}")
        return flags


_VLLM = Policy(preset="vllm", max_num_seqs=256, max_num_batched_tokens=8192)

# Each preset is documented by the system it stands for; settings follow that system's defaults.
PRESETS: dict[str, Policy] = {
    # vLLM V1 (0.32): continuous batching with chunked prefill, running requests first, FCFS, recompute
    # preemption of the newest request, admission only if the whole sequence fits.
    "vllm": _VLLM,
    # vLLM V0 without chunked prefill: prefill-only batches take priority over decode batches.
    "vllm-v0": dataclasses.replace(
        _VLLM,
        preset="vllm-v0",
        batching="prefill-first",
        chunked_prefill=False,
        admission="chunk",
        watermark=0.01,
    ),
    # Sarathi-Serve: decode-first hybrid batches, prefills chunked under a small token budget.
    "sarathi": dataclasses.replace(_VLLM, preset="sarathi", max_num_batched_tokens=512, decode_first=True),
    # Orca: iteration-level batching of whole prompts; memory for the full sequence is reserved at admission.
    "orca": dataclasses.replace(_VLLM, preset="orca", chunked_prefill=False, eviction=False),
    # FasterTransformer: request-level (static) batching; a new batch starts only when the last one is done.
    "fastertransformer": dataclasses.replace(
        _VLLM, preset="fastertransformer", batching="static", chunked_prefill=False, eviction=False
    ),
    # LightLLM: admits a request only if the projected peak KV of all running requests still fits.
    "lightllm": dataclasses.replace(_VLLM, preset="lightllm", admission="future-peak"),
    # INFERMAX's no-eviction mode of vLLM: reserve prompt + output at admission, never preempt.
    "no-eviction": dataclasses.replace(_VLLM, preset="no-eviction", eviction=False),
    # Ranking variants of vLLM: shortest prompt first, shortest output first (an oracle on output length).
    "sjf": dataclasses.replace(_VLLM, preset="sjf", order="prompt"),
    "sof": dataclasses.replace(_VLLM, preset="sof", order="output"),
}

_ALIASES = {
    "policy": "order",
    "enable_chunked_prefill": "chunked_prefill",
    "preemption": "eviction",
    "prefix_caching": "enable_prefix_caching",
}
_SPEC = re.compile(r"^\s*([A-Za-z][\w-]*)\s*(?:\((.*)\))?\s*$")


# A deployment's grid is a few dozen policies, labelled in every window: each is spelled once.
@functools.lru_cache(maxsize=4096)
def _spelling(policy: Policy) -> str:
    base = PRESETS[policy.preset]
    changed = [
        f"{f.name}={_format_value(getattr(policy, f.name))}"
        for f in fields(policy)
        if f.name != "preset" and getattr(policy, f.name) != getattr(base, f.name)
    ]
    return f"{policy.preset}({','.join(changed)})" if changed else policy.preset


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_value(name: str, text: str, kind: type) -> object:
    text = text.strip()
    if name == "eviction" and text in ("recompute", "none"):  # preemption=recompute|none
        return text == "recompute"
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true or false, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}: expected an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {text!r}") from None
    return text


_FIELD_TYPES = {
    "max_num_seqs": int,
    "max_num_batched_tokens": int,
    "long_prefill_token_threshold": int,
    "chunked_prefill": bool,
    "decode_first": bool,
    "eviction": bool,
    "enable_prefix_caching": bool,
    "async_scheduling": bool,
    "watermark": float,
    "order": str,
    "batching": str,
    "admission": str,
    "victim": str,
}


def parse_policy(spec: str | Policy) -> Policy:
    """Parse `preset(key=value,...)`; unknown presets and keys are errors that list what exists."""
    if isinstance(spec, Policy):
        return spec
    match = _SPEC.match(spec)
    if not match:
        raise ValueError(f"cannot parse policy {spec!r}: expected NAME or NAME(key=value,...)")
    name, args = match.group(1).lower(), match.group(2)
    if name not in PRESETS:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(PRESETS)}")
    overrides: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in (args or "").split(","))):
        key, sep, value = item.partition("=")
        key = _ALIASES.get(key.strip(), key.strip())
        if not sep or key not in _FIELD_TYPES:
            raise ValueError(
                f"policy {spec!r}: bad setting {item!r}; settings: {', '.join(sorted(_FIELD_TYPES))}"
            )
        overrides[key] = _parse_value(key, value, _FIELD_TYPES[key])
    return dataclasses.replace(PRESETS[name], **overrides)


def split_policies(text: str) -> list[str]:
    """Split a comma-separated list of policy specs, keeping the commas inside parentheses."""
    specs, depth, current = [], 0, []
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            specs.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    specs.append("".join(current).strip())
    return [s for s in specs if s]
