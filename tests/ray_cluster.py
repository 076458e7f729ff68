"""Local multi-node Ray clusters for tests (ray.cluster_utils.Cluster)."""

from __future__ import annotations

from tests.waiting import wait_until


def _probe_lands_on(ray, node: str) -> bool:
    """Whether a task and an actor placed on `node` (soft affinity) land there: tasks are placed by the driver's
    raylet, actors by the GCS, and each learns of a new node on its own."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    class Where:
        def node(self) -> str:
            return where()

    strategy = NodeAffinitySchedulingStrategy(node, soft=True)
    task = ray.remote(num_cpus=0)(where).options(scheduling_strategy=strategy)
    actor = ray.remote(num_cpus=0)(Where).options(scheduling_strategy=strategy).remote()
    try:
        return ray.get(task.remote(), timeout=60) == node and ray.get(actor.node.remote(), timeout=60) == node
    finally:
        ray.kill(actor)


def wait_until_every_node_schedulable(ray, nodes: set[str]) -> None:
    """The GCS lists a new node before the driver's raylet (tasks) or the GCS's own actor scheduler can place
    work on it, and placement (soft affinity, SPREAD) passes over a node it does not know yet: wait until a
    probe task and a probe actor land on each node as asked."""
    wait_until(lambda: all(_probe_lands_on(ray, node) for node in nodes), 60, "every node schedulable")
