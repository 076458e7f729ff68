"""Test oracle: reassemble a whole mirrored engine run from its event stream, independently of the shadow's
tracker (which does the same job window by window), to check the tracker and to replay a run in step space.

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
from vllm_shadow.solver.records import RequestRecord


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
        requests = [
            dataclasses.replace(a, output_tokens=finishes[a.request_id].output_tokens)
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
    produced its last token."""
    prompt = {r.request_id: r.prompt_tokens for r in run.requests}
    computed: dict[str, int] = {}
    first_token: dict[str, float] = {}
    finish: dict[str, float] = {}
    for step in run.steps:
        end = step.start_time + step.duration
        for request_id in step.preempted:
            computed[request_id] = 0
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
