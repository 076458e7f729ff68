"""A fast upper bound for GPU cost: pack the requests' KV profiles into batches, one request at a time.

For GPU cost alone, a schedule is a packing: each request's run occupies consecutive batch indices with a
KV footprint that grows one block every `block_size` batches, the footprints of one batch must fit the KV
cache, and the cost is `a` per batch plus a constant. Placing requests in a fixed order, each at the first
batch where its whole profile fits (the serial schedule-generation scheme of project scheduling), gives a
feasible run-form schedule in O(requests x batches); trying a few orders and keeping the best gives CP-SAT a
strong warm start, and gives windows too large for CP-SAT an upper bound to set against `vllm_shadow.solver.bounds`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from vllm_shadow.solver.problem import Window, WindowRequest

Order = Callable[[WindowRequest], tuple]

ORDERS: dict[str, Order] = {
    # Longest first leaves the short ones to fill the gaps (LPT); largest footprint first does the same in KV.
    "longest": lambda r: (-r.remaining_outputs, -r.target_tokens),
    "largest": lambda r: (-(r.target_tokens + r.remaining_outputs), -r.remaining_outputs),
    "widest": lambda r: (-r.target_tokens, -r.remaining_outputs),
    "arrival": lambda r: (r.arrival,),
}


def kv_profile(request: WindowRequest, block_size: int) -> np.ndarray:
    """Blocks held in each batch of an uninterrupted run from the request's current state."""
    tokens = request.target_tokens + np.arange(request.remaining_outputs)
    return -(-tokens // block_size)


def pack(window: Window, order: Order) -> dict[str, list[tuple[int, int]]]:
    """Runs placing each request, in `order`, at the first batch index where its KV profile fits; running
    requests keep running from batch 0 (they hold KV already)."""
    limits = window.limits
    horizon = sum(r.remaining_outputs for r in window.requests)
    usage = np.zeros(horizon + 1, dtype=np.int64)
    runs: dict[str, list[tuple[int, int]]] = {}
    running = [r for r in window.requests if r.running]
    waiting = sorted((r for r in window.requests if not r.running), key=order)
    end = 0  # batches used so far: a request always fits from here on, so no start past it is tried
    for request in [*running, *waiting]:
        profile = kv_profile(request, limits.block_size)
        start = 0
        if not request.running:
            start = _first_fit(usage[: end + len(profile)], profile, limits.kv_blocks)
        usage[start : start + len(profile)] += profile
        end = max(end, start + len(profile))
        runs[request.request_id] = [(start, request.remaining_outputs)]
    return runs


def _first_fit(usage: np.ndarray, profile: np.ndarray, capacity: int) -> int:
    """The first start at which `profile` fits under `capacity - usage`. The profile is a staircase, so each
    step of equal demand is one sliding-window minimum over the free blocks."""
    free = capacity - usage
    starts = len(free) - len(profile) + 1
    fits = np.ones(starts, dtype=bool)
    steps = np.flatnonzero(np.diff(profile)) + 1
    for lo, hi in zip(np.r_[0, steps], np.r_[steps, len(profile)], strict=True):
        lowest = sliding_window_view(free, hi - lo).min(axis=1)[lo : lo + starts]
        fits &= lowest >= profile[lo]
    return int(np.argmax(fits)) if fits.any() else starts


def makespan(runs: dict[str, list[tuple[int, int]]]) -> int:
    return max((s + n for rs in runs.values() for s, n in rs), default=0)


def best_packing(
    window: Window, orders: Sequence[str] = tuple(ORDERS)
) -> tuple[str, dict[str, list[tuple[int, int]]]]:
    """The order (by name) whose packing uses the fewest batches, and its runs."""
    packed = {name: pack(window, ORDERS[name]) for name in orders}
    name = min(packed, key=lambda k: makespan(packed[k]))
    return name, packed[name]
