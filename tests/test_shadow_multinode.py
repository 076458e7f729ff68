"""Evaluation spread over a multi-node Ray cluster (a local one: ray.cluster_utils.Cluster, two nodes), with
two engines feeding one shadow."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from tests import shadow_support as support  # noqa: E402
from tests.ray_cluster import wait_until_every_node_schedulable  # noqa: E402
from tests.waiting import wait_until  # noqa: E402
from vllm_shadow.adapters.events import EngineInfo  # noqa: E402
from vllm_shadow.adapters.publisher import EventBatch  # noqa: E402
from vllm_shadow.adapters.ray_transport import RayActorSink  # noqa: E402
from vllm_shadow.readout.snapshot import ShadowSnapshot  # noqa: E402
from vllm_shadow.runtime.actor import start_shadow_actor  # noqa: E402
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig  # noqa: E402
from vllm_shadow.runtime.service import ServiceConfig  # noqa: E402
from vllm_shadow.tracking.windows import WindowRules  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def as_engine(batches: list[EventBatch], source: str, engine: str) -> list[EventBatch]:
    return [
        EventBatch(
            [dataclasses.replace(e, engine=engine) if isinstance(e, EngineInfo) else e for e in b.events],
            source,
            b.sequence,
            b.dropped,
        )
        for b in batches
    ]


def test_two_engines_windows_are_evaluated_on_both_nodes() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, namespace="shadow-multinode", log_to_driver=False)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        wait_until_every_node_schedulable(ray, nodes)  # or SPREAD may place every task on the head node
        config = ServiceConfig(
            shadow=ShadowConfig(
                windows=WindowRules(seconds=0.5),
                hardware="cpu",
                evaluation=EvaluationSettings(optimal=False, candidate_tasks=3),
            ),
            tick_seconds=0.1,
        )
        handle = start_shadow_actor(config, name="shadow", namespace="shadow-multinode")
        streams = [
            as_engine(support.batches("fcfs-kv12"), "host-a:1", "0"),
            as_engine(support.batches("priority-kv16"), "host-b:1", "1"),
        ]
        sinks = [
            RayActorSink("shadow", namespace="shadow-multinode") for _ in streams
        ]  # as two engines would
        for pair in itertools.zip_longest(*streams):
            for sink, batch in zip(sinks, pair, strict=True):
                if batch is not None:
                    sink(batch)
        for sink in sinks:
            sink.close()
        ray.get(handle.flush.remote())
        locations: set[str] = set()

        def evaluated() -> ShadowSnapshot | None:
            snapshot = ray.get(handle.snapshot.remote())
            for engine in snapshot.engines:
                if engine.last is not None:
                    locations.update(engine.last.task_locations)  # every window's, not only the final one's
            return snapshot if ray.get(handle.idle.remote()) and len(snapshot.engines) == 2 else None

        snapshot = wait_until(evaluated, 120, "both engines' windows evaluated", every=0.05)
        assert [e.engine for e in snapshot.engines] == ["0", "1"]
        for e in snapshot.engines:
            assert e.windows_evaluated >= 3, (e.engine, e.windows_skipped, e.sequence)
            assert e.last.fidelity.step_match_ratio == 1.0, e.last.fidelity.first_mismatch
        assert locations == nodes  # every node ran evaluation tasks
    finally:
        ray.shutdown()
        cluster.shutdown()
