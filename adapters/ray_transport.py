"""Ray transport: hand event batches to a named Ray actor (the shadow, when the engine runs in a Ray cluster).

The actor is looked up by name (`ray.get_actor(name, namespace=...)`) on first use and again after a failure,
so a restarted shadow is found. Calls are fire-and-forget up to `max_in_flight` unacknowledged batches; past
that the sink waits (in the publisher's thread, never the engine's) and raises if the actor does not keep up,
so the publisher backs off and counts the loss instead of letting Ray's queues grow without bound. With a token
(the shadow's SHADOW_TOKEN), every call carries it: a shadow with a token refuses Ray calls without it too.

A fleet of shadow actors shares the engines: `FleetSink` sends an engine's batches to the member that owns the
engine by rendezvous hashing of its key (`owner_of`), moves the engine to a survivor when its member fails, and
announces the engine to its new owner.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray

from vllm_shadow.adapters.events import EngineInfo
from vllm_shadow.adapters.publisher import BatchSink, EventBatch


class RayActorSink:
    def __init__(
        self,
        actor_name: str,
        *,
        namespace: str | None = None,
        method: str = "ingest",
        max_in_flight: int = 8,
        timeout: float = 2.0,
        token: str | None = None,
    ) -> None:
        self.actor_name = actor_name
        self._token_kwargs = {"token": token} if token else {}
        self.namespace = namespace
        self._method = method
        self._max_in_flight = max_in_flight
        self._timeout = timeout
        self._handle: Any = None
        self._in_flight: deque[Any] = deque()

    def __repr__(self) -> str:
        return f"RayActorSink({self.actor_name!r}, namespace={self.namespace!r})"

    def __call__(self, batch: EventBatch) -> None:
        try:
            if self._handle is None:
                if not ray.is_initialized():
                    # Inside an engine process started by Ray (or beside a running cluster): join it.
                    ray.init(
                        address=os.environ.get("RAY_ADDRESS", "auto"),
                        namespace=self.namespace,
                        log_to_driver=False,
                    )
                self._handle = ray.get_actor(self.actor_name, namespace=self.namespace)
            self._in_flight.append(getattr(self._handle, self._method).remote(batch, **self._token_kwargs))
            self._settle()
        except Exception:
            self._handle = None  # look the actor up again next time: it may have been restarted
            self._in_flight.clear()
            raise

    def _settle(self) -> None:
        """Collect finished calls (raising their errors); wait while too many are outstanding."""
        while self._in_flight:
            must_wait = len(self._in_flight) > self._max_in_flight
            ready, _ = ray.wait([self._in_flight[0]], timeout=self._timeout if must_wait else 0)
            if not ready:
                if must_wait:
                    raise TimeoutError(
                        f"shadow actor {self.actor_name!r} did not take a batch in {self._timeout}s"
                    )
                return
            ray.get(self._in_flight.popleft())

    def close(self, timeout: float | None = None) -> None:
        """Wait for the batches still in flight: `timeout` at most (the publisher's close bound), else the
        sink's own."""
        wait = self._timeout if timeout is None else min(timeout, self._timeout)
        try:
            if self._in_flight:
                ray.wait(list(self._in_flight), num_returns=len(self._in_flight), timeout=wait)
        finally:
            self._in_flight.clear()


def engine_key(info: EngineInfo) -> str:
    """What places an engine in a fleet: vLLM's own labels, as the shadow keys its engines (model[engine])."""
    return f"{info.model}[{info.engine}]"


def owner_of(key: str, members: Sequence[str]) -> str:
    """The member that owns `key`: rendezvous (highest random weight) hashing. Every sender computes the same
    owner from the same members without talking to anyone, the keys spread evenly, and when a member leaves
    only its own keys move, spread evenly over the rest (modulo placement would move nearly all of them)."""
    if not members:
        raise ValueError("a fleet needs at least one member")
    return max(members, key=lambda member: (_weight(key, member), member))


def _weight(key: str, member: str) -> int:
    digest = hashlib.blake2b(f"{member}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class FleetSink:
    """Sends one engine's batches to the fleet member that owns it (`owner_of` its `engine_key`, from the
    engine's announcement; the sender's source name until one is seen).

    The owner stays the owner while it takes batches. A member whose call fails (its actor died, or is not
    there; a member that only falls behind, a `TimeoutError`, keeps its engines) is passed over for
    `retry_seconds`, and the same batch goes at once to the owner among the rest,
    preceded by the engine's announcement so that the new owner knows the engine: there the stream resumes
    mid-way (the new owner's reorder buffer gives up on the batches before it, its tracker starts afresh).
    The engine does not move back when the old member returns, so one engine's stream is in one place at a
    time and a member that comes and goes does not make its engines flap. Raises only when no member takes
    the batch (the publisher then backs off and counts it lost, as with one shadow).
    """

    def __init__(
        self,
        members: Sequence[str],
        *,
        namespace: str | None = None,
        token: str | None = None,
        retry_seconds: float = 30.0,
        timeout: float = 2.0,
        connect: Callable[[str], BatchSink] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not members or len(set(members)) != len(members):
            raise ValueError(f"a fleet needs distinct member names, got {list(members)}")
        self.members = tuple(members)
        if connect is None:

            def connect(name: str) -> BatchSink:
                return RayActorSink(name, namespace=namespace, token=token, timeout=timeout)

        self._sinks = {name: connect(name) for name in self.members}
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._down_until: dict[str, float] = {}
        self._info: EngineInfo | None = None  # the engine's latest announcement
        self.owner: str | None = None  # where the stream goes now
        self.moves = 0  # times the stream moved to another member

    def __repr__(self) -> str:
        return f"FleetSink({list(self.members)!r}, owner={self.owner!r})"

    def __call__(self, batch: EventBatch) -> None:
        for event in batch.events:
            if isinstance(event, EngineInfo):
                self._info = event
        key = engine_key(self._info) if self._info is not None else batch.source
        failures = []
        while True:
            now = self._clock()
            alive = [m for m in self.members if self._down_until.get(m, -math.inf) <= now]
            if self.owner in alive:
                target = self.owner
            elif alive:
                target = owner_of(key, alive)
            else:
                raise ConnectionError(f"no shadow fleet member took the batch: {'; '.join(failures)}")
            moving = self.owner is not None and target != self.owner
            sent = batch
            if moving and self._info is not None and self._info not in batch.events:
                sent = dataclasses.replace(batch, events=[self._info, *batch.events])
            try:
                self._sinks[target](sent)
            except TimeoutError:
                raise  # alive but behind: moving would not help it; the publisher backs off, as with one shadow
            except Exception as exc:  # this member is down: the next one in the engine's order takes it
                self._down_until[target] = now + self._retry_seconds
                failures.append(f"{target}: {type(exc).__name__}: {str(exc).strip()[:200]}")
                continue
            self.moves += moving
            self.owner = target
            return

    def close(self, timeout: float | None = None) -> None:
        for sink in self._sinks.values():
            close = getattr(sink, "close", None)
            if close is None:
                continue
            if "timeout" in inspect.signature(close).parameters:
                close(timeout=timeout)
            else:
                close()
