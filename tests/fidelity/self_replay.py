"""Self replay of a mirrored engine run through `solver`'s vLLM policy, and the step-by-step comparison.

The replay uses the engine's own settings (from its EngineInfo), the arrivals and real output lengths, and
feeds each request before the same non-empty step at which the engine received it; only the policy decides
the rest. A step matches when the same requests ran with the same token counts and the same requests were
preempted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm_shadow.adapters.events import EngineStep, SchedulerSettings
from tests.support.mirror_stream import MirroredRun
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.records import SimResult, StepRecord
from vllm_shadow.solver.simulator import simulate


def policy_spec(settings: SchedulerSettings) -> str:
    """The `solver` policy that stands for an engine's scheduler settings."""
    return (
        f"vllm(max_num_seqs={settings.max_num_seqs},max_num_batched_tokens={settings.max_num_batched_tokens},"
        f"long_prefill_token_threshold={settings.long_prefill_token_threshold},policy={settings.policy},"
        f"chunked_prefill={settings.enable_chunked_prefill},watermark={settings.watermark},"
        f"admission={'full-prompt' if settings.scheduler_reserve_full_isl else 'chunk'})"
    )


def replay_in_step_space(run: MirroredRun, cost: LinearCostModel) -> SimResult:
    if run.info is None:
        raise ValueError("the mirrored run has no EngineInfo: cannot know the engine's settings")
    return simulate(
        run.finished_requests,
        policy_spec(run.info.scheduler),
        cost,
        num_kv_blocks=run.info.num_kv_blocks,
        block_size=run.info.block_size,
        record_steps=True,
        arrival_steps=run.arrival_steps,
    )


@dataclass(frozen=True, slots=True)
class StepMismatch:
    index: int  # position among non-empty steps
    kinds: tuple[str, ...]  # "membership", "tokens", "preemption", "missing-in-sim", "extra-in-sim"
    real: dict[str, int] | None
    simulated: dict[str, int] | None
    real_preempted: tuple[str, ...] = ()
    simulated_preempted: tuple[str, ...] = ()


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


def compare_steps(real: Sequence[EngineStep], simulated: Sequence[StepRecord]) -> StepComparison:
    """Compare the i-th non-empty real step with the i-th simulated step, for every i."""
    real = [s for s in real if s.scheduled_tokens]
    result = StepComparison(len(real), len(simulated), 0)
    for i in range(max(len(real), len(simulated))):
        r = real[i] if i < len(real) else None
        s = simulated[i] if i < len(simulated) else None
        if r is None or s is None:
            kind = "extra-in-sim" if r is None else "missing-in-sim"
            result.mismatches.append(
                StepMismatch(i, (kind,), r.scheduled_tokens if r else None, s.scheduled_tokens if s else None)
            )
            continue
        kinds = []
        if r.scheduled_tokens.keys() != s.scheduled_tokens.keys():
            kinds.append("membership")
        elif r.scheduled_tokens != s.scheduled_tokens:
            kinds.append("tokens")
        if set(r.preempted) != set(s.preempted):
            kinds.append("preemption")
        if kinds:
            result.mismatches.append(
                StepMismatch(
                    i, tuple(kinds), r.scheduled_tokens, s.scheduled_tokens, r.preempted, s.preempted
                )
            )
        else:
            result.matched += 1
    return result
