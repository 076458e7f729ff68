"""A whole recorded engine run, reassembled from its mirror stream, and its self replay in step space.

`shadow fidelity` uses it to tell an operator whether the simulator reproduces their engine before they trust a
recommendation; the tests use it as an oracle for the live tracker, which does the same job window by window.

The mirror (adapters.vllm.mirror) orders the stream so that an arrival follows the event of the step
before the one that could first schedule it. `MirroredRun.from_events` turns that into `arrival_steps` in the
simulator's step space, which counts only NON-EMPTY steps: vLLM also runs steps that schedule no token (one
each time it drains its last request, to tell the workers what finished), and those decide nothing a
simulator must match.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from vllm_shadow.adapters.events import EngineInfo, EngineStep, Event, RequestArrival, RequestFinish
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.evaluation.candidates import current_policy
from vllm_shadow.evaluation.step_match import StepComparison, compare_steps
from vllm_shadow.solver.records import RequestRecord, SimResult
from vllm_shadow.solver.simulator import simulate

# Step space needs no calibrated model: arrivals are fed by step, so batch times decide nothing compared.
STEP_SPACE_COST = LinearCostModel(a=1e-3, b=1e-5, c=1e-8)


@dataclass(slots=True)
class MirroredRun:
    info: EngineInfo | None
    requests: list[RequestArrival]  # in arrival order; output_tokens filled in from the finishes
    arrival_steps: dict[str, int]  # request id -> non-empty steps the engine had run when it arrived
    steps: list[EngineStep]  # non-empty steps, in order
    finishes: dict[str, RequestFinish] = field(default_factory=dict)
    empty_steps: int = 0

    @classmethod
    def from_events(cls, events: Iterable[Event]) -> MirroredRun:
        info: EngineInfo | None = None
        arrivals: list[RequestArrival] = []
        arrival_steps: dict[str, int] = {}
        steps: list[EngineStep] = []
        finishes: dict[str, RequestFinish] = {}
        empty = 0
        for event in events:
            if isinstance(event, EngineStep):
                if event.scheduled_tokens:
                    steps.append(event)
                else:
                    empty += 1
            elif isinstance(event, RequestArrival):
                arrivals.append(event)
                arrival_steps[event.request_id] = len(steps)
            elif isinstance(event, RequestFinish):
                finishes[event.request_id] = event
            elif isinstance(event, EngineInfo):
                info = event
        # A finish adds the hashes of the blocks its output filled (vLLM caches them too: a prompt holding
        # that output, a conversation's next turn, hits them).
        requests = [
            dataclasses.replace(
                a,
                output_tokens=(f := finishes[a.request_id]).output_tokens,
                block_hashes=a.block_hashes + f.block_hashes,
            )
            if a.request_id in finishes
            else a
            for a in arrivals
        ]
        return cls(info, requests, arrival_steps, steps, finishes, empty)

    @property
    def finished_requests(self) -> list[RequestArrival]:
        return [r for r in self.requests if r.request_id in self.finishes]


def request_latencies(run: MirroredRun) -> dict[str, RequestRecord]:
    """What the engine delivered to every finished request, on the engine's clock, from the step stream: its
    first token at the end of the step that completed its prefill, its finish at the end of the step that
    produced its last token. A request admitted or resumed with a prefix-cache hit starts from the hit."""
    prompt = {r.request_id: r.prompt_tokens for r in run.requests}
    computed: dict[str, int] = {}
    first_token: dict[str, float] = {}
    finish: dict[str, float] = {}
    for step in run.steps:
        end = step.start_time + step.duration
        for request_id in step.preempted:
            computed[request_id] = 0
        computed.update(step.cached_tokens)
        for request_id, n in step.scheduled_tokens.items():
            done = computed.get(request_id, 0) + n
            computed[request_id] = done
            if request_id not in first_token and done >= prompt.get(request_id, done + 1):
                first_token[request_id] = end
        for request_id in step.finished:
            finish[request_id] = end
    return {
        r.request_id: RequestRecord(
            r.request_id,
            r.time,
            r.prompt_tokens,
            r.output_tokens or 0,
            r.priority,
            first_token=first_token[r.request_id],
            finish=finish[r.request_id],
        )
        for r in run.requests
        if r.request_id in first_token and r.request_id in finish
    }


def replay_in_step_space(run: MirroredRun, cost: LinearCostModel = STEP_SPACE_COST) -> SimResult:
    """The self replay of a whole run: the engine's own settings, the real output lengths, each request fed
    before the same non-empty step at which the engine received it; only the policy decides the rest."""
    if run.info is None:
        raise ValueError("the recording has no EngineInfo: the engine's settings are unknown")
    return simulate(
        run.finished_requests,
        current_policy(run.info.scheduler),
        cost,
        num_kv_blocks=run.info.num_kv_blocks,
        block_size=run.info.block_size,
        record_steps=True,
        arrival_steps=run.arrival_steps,
    )


def check_run(run: MirroredRun) -> StepComparison:
    """The engine's non-empty steps against the self replay's, step by step."""
    if not run.steps:
        raise ValueError(
            "the recording has no engine steps: only the mirror scheduler (--scheduler-cls "
            "vllm_shadow.MirrorScheduler) sees them; the stat-logger plugin and OTLP spans do not"
        )
    if not run.finishes:
        raise ValueError(
            "no request finished in the recording: output lengths are unknown, nothing to replay"
        )
    return compare_steps(run.steps, replay_in_step_space(run).steps or [])
