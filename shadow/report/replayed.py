"""A replayed mirror stream: what the mirror hook of an engine running the simulator's vLLM policy would send.

For traffic that was never served by a real engine (a trace, a capacity plan), the simulator plays the engine:
it serves the requests with the engine's settings on a cost model, and its step log becomes the events a real
engine's hook sends (announcement, arrivals, steps with their finished requests, finishes). The shadow then
evaluates it like any mirror stream. Its self replay is exact by construction, so a replayed stream measures
what the candidates would gain, never the simulator's fidelity: that takes a recorded real stream.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

from vllm_shadow.adapters.events import EngineInfo, Event, RequestArrival, RequestFinish
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.evaluation.candidates import current_policy
from vllm_shadow.solver.simulator import simulate

# Order of events at the same instant, as the engine emits them: a request arriving at a step's start time
# is seen by that step; a request finishing ends with the step that finished it.
_ARRIVAL, _STEP, _FINISH = 0, 1, 2


def replayed_stream(
    info: EngineInfo, requests: Sequence[RequestArrival], cost: LinearCostModel
) -> list[Event]:
    """The events of `requests` (output lengths known) served under `info`'s scheduler settings."""
    result = simulate(
        requests,
        current_policy(info.scheduler),
        cost,
        num_kv_blocks=info.num_kv_blocks,
        block_size=info.block_size,
        record_steps=True,
    )
    steps = result.steps or []
    # The simulator records when a request finished, not in which step: the step that ended at that time.
    ends = [s.start_time + s.duration for s in steps]
    finished_in: dict[int, list[str]] = {}
    for record in result.requests:
        index = bisect.bisect_left(ends, record.finish - 1e-9)
        finished_in.setdefault(index, []).append(record.request_id)

    timed: list[tuple[float, int, Event]] = []
    original = {r.request_id: r for r in requests}
    for record in result.requests:
        # The simulator's clock is in picoseconds: its arrival time, not the trace's, orders arrivals and steps.
        request = original[record.request_id]
        arrival = dataclasses.replace(
            request, time=record.arrival, output_tokens=None, max_tokens=request.output_tokens
        )  # a live engine does not know the output length at arrival
        timed.append((record.arrival, _ARRIVAL, arrival))
        timed.append(
            (record.finish, _FINISH, RequestFinish(record.request_id, record.finish, record.output_tokens))
        )
    for i, step in enumerate(steps):
        timed.append(
            (step.start_time, _STEP, dataclasses.replace(step, finished=tuple(finished_in.get(i, ()))))
        )
    timed.sort(key=lambda item: (item[0], item[1]))
    return [info, *(event for _, _, event in timed)]
