"""Ray transport: hand event batches to a named Ray actor (the shadow, when the engine runs in a Ray cluster).

The actor is looked up by name (`ray.get_actor(name, namespace=...)`) on first use and again after a failure,
so a restarted shadow is found. Calls are fire-and-forget up to `max_in_flight` unacknowledged batches; past
that the sink waits (in the publisher's thread, never the engine's) and raises if the actor does not keep up,
so the publisher backs off and counts the loss instead of letting Ray's queues grow without bound. With a token
(the shadow's SHADOW_TOKEN), every call carries it: a shadow with a token refuses Ray calls without it too.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

import ray

from vllm_shadow.adapters.publisher import EventBatch


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
