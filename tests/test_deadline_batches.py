"""`deadline_min_batches` (the staircases of `bounds._Staircase`, or one end at a time where a request is due by
its own arrival) equals the dynamic programme it replaced, one interval end at a time, on random windows: ties
in arrivals and deadlines, requests running at the start, some without a deadline, some due by their own
arrival."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_shadow.solver.bounds import _block_area, deadline_min_batches, min_batches
from vllm_shadow.solver.problem import EngineLimits, Window, WindowRequest
from vllm_shadow.solver.schedule import Deadlines


def one_end_at_a_time(window: Window, deadlines: Deadlines) -> int:
    """The programme as it was (commit 9ba8dc6): for each deadline in order, the requests due by it sorted
    latest arrival first, their forced batches, and the best count over intervals ending before each start."""
    limits = window.limits
    requests = [r for r in window.requests if r.request_id in deadlines.finish]
    if not requests:
        return 0
    arrival = np.array([max(r.arrival, window.start) for r in requests])
    due = np.array([deadlines.finish[r.request_id] for r in requests])
    longest = np.array([r.remaining_outputs for r in requests])
    area = np.array([_block_area(r, limits.block_size) for r in requests])
    tokens = np.array([r.peak_tokens - r.computed_tokens for r in requests])
    ends = np.unique(due)
    best = np.zeros(len(ends), dtype=np.int64)
    for k, end in enumerate(ends):
        inside = np.flatnonzero(due <= end)
        order = inside[np.argsort(-arrival[inside], kind="stable")]
        forced = np.maximum.reduce(
            [
                np.maximum.accumulate(longest[order]),
                -(-np.cumsum(area[order]) // limits.kv_blocks),
                -(-np.cumsum(longest[order]) // limits.max_num_seqs),
                -(-np.cumsum(tokens[order]) // limits.max_num_batched_tokens),
            ]
        )
        before = np.searchsorted(ends, arrival[order], side="right") - 1
        earlier = np.where(before >= 0, best[np.maximum(before, 0)], 0)
        best[k] = max(best[k - 1] if k else 0, int((earlier + forced).max()))
    return int(best[-1])


@st.composite
def windows_with_deadlines(draw: st.DrawFn, due_by_arrival: bool = True) -> tuple[Window, Deadlines]:
    # Times on a coarse grid, so that arrivals and deadlines tie often.
    time = st.integers(0, 12).map(lambda t: t / 4)
    requests, finish = [], {}
    kinds = ["after", "after", "after", "none"] + (["by arrival"] if due_by_arrival else [])
    start = draw(st.sampled_from([0.0, 0.5, 1.0]))
    for i in range(draw(st.integers(1, 24))):
        prompt, output = draw(st.integers(1, 40)), draw(st.integers(1, 12))
        generated = draw(st.integers(0, output - 1)) if draw(st.booleans()) else 0
        computed = draw(st.integers(0, prompt + generated - 1)) if generated else 0
        arrival = draw(time)
        requests.append(WindowRequest(f"r{i}", arrival, prompt, output, computed, generated))
        choice = draw(st.sampled_from(kinds))
        if choice == "after":  # after the window start too, where only the staircases are drawn
            finish[f"r{i}"] = (arrival if due_by_arrival else max(arrival, start)) + draw(time) + 0.25
        elif choice == "by arrival":  # no schedule meets it; the programme must still count the same
            finish[f"r{i}"] = arrival - draw(time)
    block_size = draw(st.sampled_from([1, 2, 16]))
    blocks = [-(-r.peak_tokens // block_size) for r in requests]
    held = sum(-(-r.computed_tokens // block_size) for r in requests)
    limits = EngineLimits(
        kv_blocks=max(*blocks, held) + draw(st.integers(0, 20)),
        block_size=block_size,
        max_num_seqs=draw(st.integers(1, 8)),
        max_num_batched_tokens=draw(st.integers(1, 64)),
    )
    window = Window(tuple(requests), limits, start=start)
    return window, Deadlines({}, finish, "test")


@settings(max_examples=150, deadline=None)
@given(windows_with_deadlines())
def test_the_programme_counts_what_the_one_end_at_a_time_programme_did(case) -> None:
    window, deadlines = case
    assert deadline_min_batches(window, deadlines) == one_end_at_a_time(window, deadlines)


@settings(max_examples=300, deadline=None)
@given(windows_with_deadlines(due_by_arrival=False))
def test_the_staircases_count_what_the_one_end_at_a_time_programme_did(case) -> None:
    """Without a request due by its own arrival: every window takes the staircases."""
    window, deadlines = case
    assert deadline_min_batches(window, deadlines) == one_end_at_a_time(window, deadlines)


def test_disjoint_intervals_add_up_and_a_shared_one_does_not() -> None:
    """Three requests, two of them in disjoint intervals [0, 10] and [10, 20] (4 + 3 batches), the third due
    by 20 from 0: it only adds to the interval that spans everything, whose own count is lower."""
    window = Window(
        (
            WindowRequest("x", 0.0, 2, 4),
            WindowRequest("y", 10.0, 2, 3),
            WindowRequest("z", 0.0, 2, 2),
        ),
        EngineLimits(kv_blocks=64, block_size=2),
    )
    deadlines = Deadlines({}, {"x": 10.0, "y": 20.0, "z": 20.0}, "test")
    assert one_end_at_a_time(window, deadlines) == 7
    assert deadline_min_batches(window, deadlines) == 7
    assert min_batches(window, deadlines) == 7
    assert min_batches(window) == 4


@pytest.mark.parametrize("requests", [0, 1])
def test_no_deadline_forces_nothing(requests: int) -> None:
    window = Window(tuple(WindowRequest(f"r{i}", 0.0, 3, 5) for i in range(requests)), EngineLimits(8, 2))
    assert deadline_min_batches(window, Deadlines({}, {}, "test")) == 0
