"""Where window evaluations run: a small interface, and the in-process implementation.

The shadow fans each window out as a few independent tasks (self replay, chunks of candidates, the optimum).
`RayTasks` (shadow.ray_tasks) runs them on a Ray cluster; `LocalTasks` runs them on threads of this process,
for a shadow without Ray and for measuring evaluation cost on one core. Both resolve a task's future to a
`TaskResult` that also says where it ran.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class TaskResult:
    value: Any
    location: str  # a Ray node id, or the host name for local tasks


class TaskRunner(Protocol):
    def share(self, value: Any) -> Any:
        """Make `value` available to many tasks at the cost of one copy; pass the result as an argument."""
        ...

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[TaskResult]: ...

    def cancel(self, future: Future[TaskResult]) -> None: ...

    def shutdown(self) -> None: ...


class LocalTasks:
    """Tasks on a thread pool of this process (the simulator is pure Python: one worker is one core)."""

    def __init__(self, max_workers: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="shadow-eval")
        self._where = socket.gethostname()

    def share(self, value: Any) -> Any:
        return value

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[TaskResult]:
        return self._pool.submit(lambda: TaskResult(fn(*args, **kwargs), self._where))

    def cancel(self, future: Future[TaskResult]) -> None:
        future.cancel()  # a task already running finishes; its result is ignored

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
