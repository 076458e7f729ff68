"""The step comparison: the engine's real steps against the simulator's, batch by batch.

The i-th non-empty engine step is compared with the i-th simulated step. A step matches when the same requests
ran with the same token counts and the same requests were preempted. Empty engine steps (vLLM runs one each
time it drains its last request, to tell the workers what finished) decide nothing a simulator must match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm_shadow.adapters.events import EngineStep

MEMBERSHIP, TOKENS, PREEMPTION = "membership", "tokens", "preemption"
MISSING_IN_SIM, EXTRA_IN_SIM = "missing-in-sim", "extra-in-sim"


@dataclass(frozen=True, slots=True)
class StepMismatch:
    index: int  # position among non-empty steps
    kinds: tuple[str, ...]  # MEMBERSHIP, TOKENS, PREEMPTION, MISSING_IN_SIM, EXTRA_IN_SIM
    real: dict[str, int] | None
    simulated: dict[str, int] | None
    real_preempted: tuple[str, ...] = ()
    simulated_preempted: tuple[str, ...] = ()

    def describe(self) -> str:
        """What each side ran, as the shadow's status and metrics report the first mismatch of a window."""
        real = f"engine ran {self.real if self.real is not None else 'nothing'}"
        simulated = f"replay ran {self.simulated if self.simulated is not None else 'nothing'}"
        return (
            f"step {self.index}: {real} preempting {list(self.real_preempted)}; "
            f"{simulated} preempting {list(self.simulated_preempted)}"
        )


@dataclass(slots=True)
class StepComparison:
    real_steps: int
    simulated_steps: int
    matched: int
    mismatches: list[StepMismatch] = field(default_factory=list)

    @property
    def match_ratio(self) -> float:
        total = max(self.real_steps, self.simulated_steps)
        return self.matched / total if total else 1.0

    @property
    def first_mismatch(self) -> StepMismatch | None:
        return self.mismatches[0] if self.mismatches else None

    def describe(self) -> str:
        head = f"{self.matched}/{max(self.real_steps, self.simulated_steps)} steps identical"
        first = self.first_mismatch
        if first is None:
            return head
        return (
            f"{head}; first mismatch at step {first.index} ({', '.join(first.kinds)}): "
            f"real {first.real} preempted {first.real_preempted}, "
            f"simulated {first.simulated} preempted {first.simulated_preempted}"
        )


def compare_steps(real: Sequence[EngineStep], simulated: Sequence[EngineStep]) -> StepComparison:
    """Compare the i-th non-empty real step with the i-th simulated step, for every i."""
    real = [s for s in real if s.scheduled_tokens]
    result = StepComparison(len(real), len(simulated), 0)
    mismatches = result.mismatches
    for i, (r, s) in enumerate(zip(real, simulated, strict=False)):  # the longer side's rest below
        # Most steps match: one comparison of each side decides them (every window's self replay is compared).
        if r.scheduled_tokens == s.scheduled_tokens and r.preempted == s.preempted:
            result.matched += 1
            continue
        kinds = []
        if r.scheduled_tokens != s.scheduled_tokens:
            kinds.append(MEMBERSHIP if r.scheduled_tokens.keys() != s.scheduled_tokens.keys() else TOKENS)
        if r.preempted != s.preempted and set(r.preempted) != set(s.preempted):
            kinds.append(PREEMPTION)
        if kinds:
            mismatches.append(
                StepMismatch(
                    i, tuple(kinds), r.scheduled_tokens, s.scheduled_tokens, r.preempted, s.preempted
                )
            )
        else:
            result.matched += 1
    # The steps past the shorter side's last.
    for i in range(min(len(real), len(simulated)), max(len(real), len(simulated))):
        r = real[i] if i < len(real) else None
        s = simulated[i] if i < len(simulated) else None
        mismatches.append(
            StepMismatch(
                i,
                (EXTRA_IN_SIM if r is None else MISSING_IN_SIM,),
                r.scheduled_tokens if r else None,
                s.scheduled_tokens if s else None,
                r.preempted if r else (),
                s.preempted if s else (),
            )
        )
    return result
