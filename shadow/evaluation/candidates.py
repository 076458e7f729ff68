"""The configurations the shadow tries on each window: a grid around the engine's current settings.

The current configuration is read from the engine's own announcement (`EngineInfo.scheduler`) and written as a
`solver` policy; every candidate is that policy with some vLLM knobs changed (max_num_seqs, the token budget,
chunked prefill, the long-prefill threshold, the scheduling policy, prefix caching), plus a few other
schedulers for reference (Sarathi-Serve, Orca, LightLLM, shortest-prompt-first, no-eviction) at the same
sequence cap and budget. Only candidates that vLLM can run by changing flags are "actionable": the others show
how far a different scheduler would go, and are never recommended; they keep the engine's prefix caching where
they can (not those that reserve blocks at admission: Orca, no-eviction), so that they differ from it in
scheduling only. Labels are the policies' canonical spellings; the grid is bounded, so is the label set it exports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vllm_shadow.adapters.events import SchedulerSettings
from vllm_shadow.solver.policies import PRESETS, Policy, parse_policy

# vLLM refuses a token budget below the sequence cap, and without chunked prefill one below max_model_len.
_MIN_BUDGET = 16


@dataclass(frozen=True, slots=True)
class SearchSpace:
    max_num_seqs_factors: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    batched_tokens_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    toggle_chunked_prefill: bool = True
    long_prefill_fraction: float = 0.25  # try a long-prefill threshold of this share of the budget (0: don't)
    toggle_priority: bool = True  # try the other of fcfs / priority
    toggle_prefix_caching: bool = True  # try the engine's settings with prefix caching flipped
    presets: tuple[str, ...] = ("sarathi", "orca", "lightllm", "sjf", "no-eviction")
    extra: tuple[str, ...] = ()  # further policy specs, tried as written
    max_candidates: int = 64  # a hard bound on the label set (Prometheus cardinality)

    def __post_init__(self) -> None:
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown:
            raise ValueError(f"unknown presets {unknown}; known: {', '.join(PRESETS)}")
        if any(f <= 0 for f in (*self.max_num_seqs_factors, *self.batched_tokens_factors)):
            raise ValueError("grid factors must be positive")
        if not 0 <= self.long_prefill_fraction < 1:
            raise ValueError("long_prefill_fraction must be in [0, 1)")
        if self.max_candidates < 1:
            raise ValueError("max_candidates must be >= 1")
        for spec in self.extra:
            parse_policy(spec)  # fail at configuration time, not in a window


@dataclass(frozen=True, slots=True)
class Candidate:
    policy: Policy
    actionable: bool  # vLLM runs it by changing command-line flags

    @property
    def label(self) -> str:
        return str(self.policy)


def current_policy(settings: SchedulerSettings) -> Policy:
    """The `solver` policy that reproduces an engine's scheduler settings (its self replay)."""
    return dataclasses.replace(
        PRESETS["vllm"],
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        chunked_prefill=settings.enable_chunked_prefill,
        long_prefill_token_threshold=settings.long_prefill_token_threshold,
        order="priority" if settings.policy == "priority" else "fcfs",
        watermark=settings.watermark,
        admission="full-prompt" if settings.scheduler_reserve_full_isl else "chunk",
        enable_prefix_caching=settings.enable_prefix_caching,
        async_scheduling=settings.async_scheduling,
    )


def _valid_for_vllm(policy: Policy, max_model_len: int) -> bool:
    budget = policy.max_num_batched_tokens
    if budget < max(policy.max_num_seqs, _MIN_BUDGET):
        return False
    return policy.chunked_prefill or budget >= max_model_len


def _is_actionable(policy: Policy, current: Policy) -> bool:
    # Same loop as the engine's, differing only in knobs that vLLM exposes as flags.
    exposed = {
        "max_num_seqs",
        "max_num_batched_tokens",
        "chunked_prefill",
        "long_prefill_token_threshold",
        "order",
        "enable_prefix_caching",
    }
    return policy.preset == "vllm" and all(
        getattr(policy, f.name) == getattr(current, f.name)
        for f in dataclasses.fields(Policy)
        if f.name not in exposed
    )


def build_candidates(settings: SchedulerSettings, space: SearchSpace = SearchSpace()) -> list[Candidate]:
    """The current configuration first, then the grid, without duplicates, at most `max_candidates`."""
    current = current_policy(settings)
    seqs, budget = current.max_num_seqs, current.max_num_batched_tokens
    policies = [current]
    for fs in space.max_num_seqs_factors:
        for fb in space.batched_tokens_factors:
            policies.append(
                dataclasses.replace(
                    current,
                    max_num_seqs=max(1, round(seqs * fs)),
                    max_num_batched_tokens=max(_MIN_BUDGET, round(budget * fb)),
                )
            )
    if space.toggle_chunked_prefill:
        policies.append(dataclasses.replace(current, chunked_prefill=not current.chunked_prefill))
    if space.long_prefill_fraction and current.chunked_prefill:
        threshold = 0 if current.long_prefill_token_threshold else round(budget * space.long_prefill_fraction)
        policies.append(dataclasses.replace(current, long_prefill_token_threshold=threshold))
    if space.toggle_priority:
        policies.append(
            dataclasses.replace(current, order="fcfs" if current.order == "priority" else "priority")
        )
    if space.toggle_prefix_caching:
        policies.append(dataclasses.replace(current, enable_prefix_caching=not current.enable_prefix_caching))
    # Least-computed-first victims (vLLM RFC #54644): not actionable until vLLM exposes the choice as a flag.
    policies.append(dataclasses.replace(current, victim="least-computed"))
    for name in space.presets:
        preset = PRESETS[name]
        policies.append(
            dataclasses.replace(
                preset,
                max_num_seqs=seqs,
                max_num_batched_tokens=budget,
                enable_prefix_caching=current.enable_prefix_caching and preset.eviction,
            )
        )
    policies.extend(parse_policy(spec) for spec in space.extra)

    out: list[Candidate] = []
    seen: set[str] = set()
    for policy in policies:
        label = str(policy)
        actionable = _is_actionable(policy, current)
        if label in seen or (actionable and not _valid_for_vllm(policy, settings.max_model_len)):
            continue
        seen.add(label)
        out.append(Candidate(policy, actionable))
        if len(out) == space.max_candidates:
            break
    return out


def flag_changes(current: Policy, candidate: Policy) -> list[str]:
    """The vLLM flags to pass to move from `current` to `candidate` (only those that differ)."""
    before = set(current.vllm_flags())
    changes = [flag for flag in candidate.vllm_flags() if flag not in before]
    if current.enable_prefix_caching and not candidate.enable_prefix_caching:
        changes.append("--no-enable-prefix-caching")  # vLLM's default is on: turning it off takes a flag
    return changes
