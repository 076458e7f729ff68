"""The shadow as a named Ray actor: the production deployment and the demo's.

The actor hosts a `ShadowService` whose window evaluations run as Ray tasks spread over the cluster. It is
named (engines' `RayActorSink` find it with `ray.get_actor(name, namespace=...)`), optionally detached so it
outlives the process that started it, restarted by Ray if its process dies (its counters start again; the
engines it hears from are remembered in the state file), and threaded, so that ingest calls, status reads and
the maintenance loop never wait on one another. It takes no CPU of its own from Ray's accounting: its work is
bookkeeping, and the CPUs belong to the evaluation tasks. It is pinned to the node that starts it (softly),
because its endpoints bind that node's loopback by default. Several such actors make a fleet
(`vllm_shadow.runtime.fleet`).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from vllm_shadow.runtime.ray_tasks import RayTasks
from vllm_shadow.runtime.service import ServiceConfig, ShadowService
from vllm_shadow.runtime.status_endpoint import DEFAULT_NAME, DEFAULT_NAMESPACE

__all__ = [
    "DEFAULT_NAME",
    "DEFAULT_NAMESPACE",
    "ShadowActor",
    "find_shadow_actor",
    "launch_shadow_actor",
    "start_shadow_actor",
]


class ShadowActor(ShadowService):
    def __init__(self, config: ServiceConfig, task_cpus: float = 1.0) -> None:
        super().__init__(config, RayTasks(num_cpus=task_cpus))

    def ping(self) -> str:
        return ray.get_runtime_context().get_actor_id()

    def node(self) -> tuple[str, str]:
        """(node id, node IP address) of the node this actor runs on."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


def start_shadow_actor(
    config: ServiceConfig,
    *,
    name: str = DEFAULT_NAME,
    namespace: str = DEFAULT_NAMESPACE,
    detached: bool = False,
    task_cpus: float = 1.0,
    max_concurrency: int = 16,
) -> Any:
    """Start the named actor (Ray must be initialised) and wait until it is up; returns its handle."""
    handle = launch_shadow_actor(
        config,
        name=name,
        namespace=namespace,
        detached=detached,
        task_cpus=task_cpus,
        max_concurrency=max_concurrency,
    )
    ray.get(handle.ping.remote())
    return handle


def launch_shadow_actor(
    config: ServiceConfig,
    *,
    name: str,
    namespace: str,
    detached: bool = False,
    task_cpus: float = 1.0,
    max_concurrency: int = 16,
    node_id: str | None = None,
    max_restarts: int = -1,
) -> Any:
    """Create the named actor on `node_id` (softly; default: this node) without waiting for it."""
    options: dict[str, Any] = dict(
        name=name,
        namespace=namespace,
        num_cpus=0,
        max_restarts=max_restarts,
        max_concurrency=max_concurrency,
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id or ray.get_runtime_context().get_node_id(), soft=True
        ),
    )
    if detached:
        options["lifetime"] = "detached"
    return ray.remote(ShadowActor).options(**options).remote(config, task_cpus)


def find_shadow_actor(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> Any:
    return ray.get_actor(name, namespace=namespace)
