"""The relaxation bound over numpy columns (`bounds._columns`, built once per window) gives the very floats and
counts of the per-request definition it replaced, which is kept here as the reference: the same batches, GPU
seconds and mean latencies, bit for bit, with and without deadlines, a proven batch count and schedule seconds;
requests running at the start, arrivals before and after it, prompts and outputs long enough that the sums
leave the small integers, and cost coefficients of every magnitude."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver import bounds
from vllm_shadow.solver.bounds import RelaxationBound, deadline_min_batches, min_batches, relaxation_bound
from vllm_shadow.solver.problem import EngineLimits, Window, WindowRequest, cdiv
from vllm_shadow.solver.schedule import Deadlines

# ---- the per-request definitions as they were (commit 313055a), the reference ------------------------------


def _sum_range(lo: int, hi: int) -> int:
    return (lo + hi) * (hi - lo + 1) // 2 if hi >= lo else 0


def prefill_extra_bound(request: WindowRequest, cost: LinearCostModel) -> float:
    return min(cost.c, cost.d) * _sum_range(request.computed_tokens + 1, request.target_tokens - 1)


def request_work_seconds(request: WindowRequest, cost: LinearCostModel) -> float:
    target, remaining = request.target_tokens, request.remaining_outputs
    tokens = target - request.computed_tokens + remaining - 1
    attended = _sum_range(target, target + remaining - 1)
    return cost.b * tokens + cost.c * attended + prefill_extra_bound(request, cost) + cost.e * remaining


def block_area(request: WindowRequest, block_size: int) -> int:
    """blocks(target + t) summed over the remaining outputs, token by token."""
    return sum(cdiv(request.target_tokens + t, block_size) for t in range(request.remaining_outputs))


def reference_min_batches(window: Window, deadlines: Deadlines | None) -> int:
    limits = window.limits
    requests = window.requests
    unconstrained = max(
        max((r.remaining_outputs for r in requests), default=0),
        cdiv(sum(block_area(r, limits.block_size) for r in requests), limits.kv_blocks),
        cdiv(sum(r.remaining_outputs for r in requests), limits.max_num_seqs),
        cdiv(sum(r.peak_tokens - r.computed_tokens for r in requests), limits.max_num_batched_tokens),
    )
    if deadlines is None or not deadlines.finish:
        return unconstrained
    # The deadline programme has its own reference (tests/test_deadline_batches.py); here it must only be
    # handed the same window.
    return max(unconstrained, deadline_min_batches(window, deadlines))


def reference_bound(
    window: Window,
    cost: LinearCostModel,
    deadlines: Deadlines | None,
    least_batches: int,
    least_schedule_seconds: float,
) -> RelaxationBound:
    batches = max(reference_min_batches(window, deadlines), least_batches)
    gpu = max(cost.a * batches, least_schedule_seconds) + sum(
        request_work_seconds(r, cost) for r in window.requests
    )
    e2e, ttft = [], []
    for r in window.requests:
        wait = max(window.start - r.arrival, 0.0)
        alone = cost.a * r.remaining_outputs + request_work_seconds(r, cost)
        e2e.append(wait + alone)
        if r.generated_tokens == 0:
            chunk = r.target_tokens - r.computed_tokens
            ttft.append(
                wait
                + cost.a
                + cost.b * chunk
                + cost.c * r.target_tokens
                + prefill_extra_bound(r, cost)
                + cost.e
            )
    return RelaxationBound(
        batches=batches,
        gpu_seconds=gpu,
        mean_e2e=sum(e2e) / len(e2e) if e2e else math.nan,
        mean_ttft=sum(ttft) / len(ttft) if ttft else math.nan,
    )


# ---- random windows ----------------------------------------------------------------------------------------

coefficient = st.sampled_from([0.0, 1.0]) | st.floats(0, 1e-2) | st.floats(1e-12, 1e-6) | st.floats(0, 3.0)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Window, LinearCostModel, Deadlines | None, int, float]:
    long = draw(st.booleans())  # prompts and outputs of thousands of tokens, as the live shadow's windows
    tokens = st.integers(1, 4000 if long else 12)
    requests, finish = [], {}
    start = draw(st.sampled_from([0.0, 0.5, 2.0]) | st.floats(0, 5))
    for i in range(draw(st.integers(0, 40))):
        prompt, output = draw(tokens), draw(tokens)
        generated = draw(st.integers(0, output - 1)) if draw(st.booleans()) else 0
        computed = draw(st.integers(0, prompt + generated - 1)) if draw(st.booleans()) else 0
        arrival = draw(st.floats(0, 6) | st.integers(0, 6))
        requests.append(WindowRequest(f"r{i}", arrival, prompt, output, computed, generated))
        if draw(st.booleans()):
            finish[f"r{i}"] = arrival + draw(st.floats(0, 10))
    block_size = draw(st.sampled_from([1, 2, 16, 17]))
    need = max(
        [cdiv(r.peak_tokens, block_size) for r in requests]
        + [sum(cdiv(r.computed_tokens, block_size) for r in requests), 1]
    )
    limits = EngineLimits(
        kv_blocks=need + draw(st.integers(0, 50)),
        block_size=block_size,
        max_num_seqs=draw(st.sampled_from([1, 4, 2**31 - 1])),
        max_num_batched_tokens=draw(st.sampled_from([1, 64, 2**31 - 1])),
    )
    window = Window(tuple(requests), limits, start)
    cost = LinearCostModel(*(draw(coefficient) for _ in range(5)))
    deadlines = draw(st.sampled_from([None, Deadlines({}, finish, "test")]))
    least_batches = draw(st.integers(0, 3) | st.integers(0, 10**5))
    least_seconds = draw(st.just(0.0) | st.floats(0, 1e3))
    return window, cost, deadlines, least_batches, least_seconds


@settings(max_examples=300, deadline=None)
@given(cases())
def test_the_bound_over_columns_is_the_per_request_bound_bit_for_bit(case) -> None:
    window, cost, deadlines, least_batches, least_seconds = case
    expected = reference_bound(window, cost, deadlines, least_batches, least_seconds)
    got = relaxation_bound(window, cost, deadlines, least_batches, least_seconds)
    assert repr(got) == repr(expected)  # repr: nan equals nan, and floats are compared to the last bit
    # Again, from the columns and terms the window's memo keeps: the same, and without deadlines too.
    assert repr(relaxation_bound(window, cost, deadlines, least_batches, least_seconds)) == repr(expected)
    assert repr(relaxation_bound(window, cost)) == repr(reference_bound(window, cost, None, 0, 0.0))
    assert min_batches(window, deadlines) == reference_min_batches(window, deadlines)


@settings(max_examples=200, deadline=None)
@given(cases())
def test_each_column_is_its_per_request_definition(case) -> None:
    window, cost, _, _, _ = case
    columns = bounds._columns(window)
    requests = window.requests
    assert columns.ids == tuple(r.request_id for r in requests)
    assert columns.arrival.tolist() == [float(r.arrival) for r in requests]
    assert columns.target.tolist() == [r.target_tokens for r in requests]
    assert columns.remaining.tolist() == [r.remaining_outputs for r in requests]
    assert columns.tokens.tolist() == [r.peak_tokens - r.computed_tokens for r in requests]
    assert columns.fresh.tolist() == [r.generated_tokens == 0 for r in requests]
    assert columns.area.tolist() == [block_area(r, window.limits.block_size) for r in requests]
    extra = bounds._prefill_extra_array(columns, cost)
    assert extra.tolist() == [prefill_extra_bound(r, cost) for r in requests]
    work = bounds._work_seconds_array(columns, cost, extra)
    assert work.tolist() == [request_work_seconds(r, cost) for r in requests]


def test_the_columns_are_the_window_s_own_and_stay_out_of_its_value() -> None:
    """Built once per window object; a window made from it (`replace`, a pickle, a copy) builds its own, and
    windows with and without columns are equal and hash alike."""
    limits = EngineLimits(kv_blocks=64, block_size=4)
    window = Window((WindowRequest("a", 0.0, 9, 5), WindowRequest("b", 1.0, 3, 2, 2, 0)), limits)
    fresh = Window(window.requests, limits)
    cost = LinearCostModel(0.01, 1e-4, 1e-6, 1e-6, 1e-5)
    relaxation_bound(window, cost)
    columns = bounds._columns(window)
    assert bounds._columns(window) is columns
    assert window == fresh and hash(window) == hash(fresh) and repr(window) == repr(fresh)
    moved = dataclasses.replace(window, start=5.0)
    assert bounds._columns(moved) is not columns
    assert relaxation_bound(moved, cost).mean_e2e > relaxation_bound(window, cost).mean_e2e
    shipped = pickle.loads(pickle.dumps(window))
    assert shipped == window and shipped.memo == {}
    assert repr(relaxation_bound(shipped, cost)) == repr(relaxation_bound(window, cost))
    # The memo keeps the work and latency terms per cost model: another one's are its own.
    other, anew = LinearCostModel(0.02, 3e-4, 2e-6, 0.0, 1e-5), Window(window.requests, limits)
    assert repr(relaxation_bound(window, other)) == repr(relaxation_bound(anew, other))
    assert np.array_equal(bounds._columns(shipped).area, columns.area)


def reference_window_error(requests: tuple[WindowRequest, ...], limits: EngineLimits) -> str | None:
    """`Window`'s checks as they were (commit 313055a): the error message, or None."""
    ids = [r.request_id for r in requests]
    if len(set(ids)) != len(ids):
        return "request ids in a window must be unique"
    held = sum(limits.blocks(r.computed_tokens) for r in requests)
    if held > limits.kv_blocks:
        return f"running requests hold {held} blocks, more than the {limits.kv_blocks} usable"
    for r in requests:
        if limits.blocks(r.peak_tokens) > limits.kv_blocks:
            return f"request {r.request_id} can never fit in {limits.kv_blocks} KV blocks"
    return None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 6), st.integers(1, 40), st.integers(1, 40), st.integers(0, 39)),
        max_size=8,
    ),
    st.integers(1, 12),
    st.sampled_from([1, 2, 16]),
)
@example([(0, 5, 4, 0)], 7, 1)  # the longest needs one block more than there are: 8 tokens in 7
@example([(0, 4, 4, 0), (1, 10, 8, 0), (2, 9, 9, 0)], 4, 4)  # r1 and r2 never fit: r1 is named
def test_a_window_refuses_what_it_refused_and_names_the_same_request(shapes, kv_blocks, block_size) -> None:
    """Duplicate ids, more blocks held than usable, and (the first) request that can never fit: the same
    error as the checks request by request, and a window wherever they made one."""
    requests = tuple(
        WindowRequest(f"r{i}", 0.0, prompt, output, min(computed, prompt - 1))
        for i, prompt, output, computed in shapes
    )
    limits = EngineLimits(kv_blocks=kv_blocks, block_size=block_size)
    expected = reference_window_error(requests, limits)
    try:
        Window(requests, limits)
    except ValueError as error:
        assert str(error) == expected
    else:
        assert expected is None
