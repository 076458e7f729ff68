"""The Ray transport against a real local Ray cluster and a real named actor defined here."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from tests.waiting import wait_until  # noqa: E402
from vllm_shadow.adapters.events import EngineStep, RequestArrival  # noqa: E402
from vllm_shadow.adapters.publisher import EventBatch, Publisher  # noqa: E402
from vllm_shadow.adapters.ray_transport import RayActorSink  # noqa: E402

pytestmark = pytest.mark.integration

NAMESPACE = "shadow-test"


@ray.remote
class EventCollector:
    def __init__(self) -> None:
        self.batches: list[EventBatch] = []

    def ingest(self, batch: EventBatch) -> int:
        self.batches.append(batch)
        return len(batch.events)

    def events(self) -> list:
        return [e for b in self.batches for e in b.events]


def _named(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:  # no live actor holds the name
        return False
    return True


@pytest.fixture(scope="module")
def ray_cluster():
    # address="local": always a fresh cluster, never one another process left running on this machine.
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_batches_reach_a_named_actor_in_order(ray_cluster) -> None:
    actor = EventCollector.options(name="shadow-a", namespace=NAMESPACE).remote()
    events = [RequestArrival(f"r{i}", float(i), 10) for i in range(5)] + [
        EngineStep(0, 0.0, 0.01, {"r0": 10})
    ]
    publisher = Publisher([RayActorSink("shadow-a", namespace=NAMESPACE)], batch_size=2, flush_interval=0.005)
    for event in events:
        publisher.publish(event)
    publisher.close(timeout=10)
    assert ray.get(actor.events.remote()) == events
    assert publisher.sink_stats()[0].failures == 0


def test_a_killed_actor_is_counted_and_a_restarted_one_is_found(ray_cluster) -> None:
    actor = EventCollector.options(name="shadow-b", namespace=NAMESPACE).remote()
    sink = RayActorSink("shadow-b", namespace=NAMESPACE, max_in_flight=0, timeout=5)
    sink(EventBatch([RequestArrival("before", 0.0, 1)]))
    ray.kill(actor)
    wait_until(lambda: not _named("shadow-b"), 30, "Ray to release the killed actor's name")
    with pytest.raises(Exception):  # noqa: B017 - Ray reports a dead actor with several exception types
        sink(EventBatch([RequestArrival("lost", 0.0, 1)]))
    revived = EventCollector.options(name="shadow-b", namespace=NAMESPACE).remote()
    sink(EventBatch([RequestArrival("after", 0.0, 1)]))
    sink.close()
    assert [e.request_id for e in ray.get(revived.events.remote())] == ["after"]
