"""How tests wait: on a condition that fails the test when it times out, or on a clock the test moves itself.

A test never sleeps for a guessed time. Work that finishes on its own (a thread, a Ray actor, a server) is
awaited with `wait_until`, which names what it waited for when it gives up; time that must pass for the code
under test (a reorder buffer giving up on a gap, an idle engine) passes on a `ManualClock` the test advances.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import pytest

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], timeout: float, what: str | Callable[[], str], *, every: float = 0.02
) -> T:
    """Poll `condition` until it returns something truthy, and return that; fail the test after `timeout`
    seconds, saying `what` it waited for (a callable is asked then, for the state it gave up in). The
    condition may do work between polls (tick a core, for one)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout:g}s waiting for {described}", pytrace=False)
        time.sleep(every)  # the poll interval: the one pause in the tests that is not waiting on time itself
    return result


class ManualClock:
    """A clock that moves only when the test says so; pass it wherever the code takes `clock=`."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Evaluating(Protocol):
    def flush(self) -> None: ...
    def tick(self) -> None: ...
    def idle(self) -> bool: ...


def drain(core: _Evaluating, timeout: float = 60.0) -> None:
    """Close every open window of a `ShadowCore` and wait until each is evaluated, ticking it meanwhile."""
    core.flush()

    def evaluated() -> bool:
        core.tick()  # submits queued windows, collects finished evaluations
        return core.idle()

    wait_until(evaluated, timeout, "the shadow to evaluate every window")
