"""Window evaluations as Ray tasks, spread over the cluster's nodes."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import ray

from vllm_shadow.runtime.tasks import TaskResult


def _located(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> TaskResult:
    return TaskResult(fn(*args, **kwargs), ray.get_runtime_context().get_node_id())


class RayTasks:
    """Each task takes `num_cpus` CPUs and is placed with the SPREAD strategy, so a multi-node cluster shares
    the work. A cancelled task's worker is killed (force): a simulation stuck on a huge window must not hold
    a CPU the next windows need."""

    def __init__(self, *, num_cpus: float = 1.0, strategy: str = "SPREAD") -> None:
        self._remote = ray.remote(_located).options(
            num_cpus=num_cpus, scheduling_strategy=strategy, max_retries=0
        )
        self._refs: dict[Future, ray.ObjectRef] = {}

    def share(self, value: Any) -> Any:
        return ray.put(value)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[TaskResult]:
        ref = self._remote.remote(fn, *args, **kwargs)  # top-level ObjectRefs (shared values) are resolved
        future = ref.future()
        self._refs[future] = ref
        future.add_done_callback(lambda f: self._refs.pop(f, None))
        return future

    def cancel(self, future: Future[TaskResult]) -> None:
        ref = self._refs.pop(future, None)
        if ref is not None:
            ray.cancel(ref, force=True)

    def shutdown(self) -> None:
        for ref in list(self._refs.values()):
            ray.cancel(ref, force=True)
        self._refs.clear()
