"""A fleet of shadow actors: placement by engine key, engines moving to the survivors when a member dies and
their streams resuming there, and one scrape configuration for the whole fleet.

The placement and the sender's moves are checked in-process against real shadow cores; the fleet itself on a
local two-node Ray cluster (ray.cluster_utils.Cluster) with three actors, one of them killed mid-stream."""

from __future__ import annotations

import dataclasses
import json
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import shadow_support as support
from tests.ray_cluster import wait_until_every_node_schedulable
from tests.waiting import ManualClock, wait_until
from vllm_shadow.adapters.events import EngineInfo, EngineStep
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.ray_transport import FleetSink, engine_key, owner_of
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig, ShadowCore
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.tracking.windows import WindowRules

KEYS = [f"llama-3-8b[{i}]" for i in range(1000)]


def test_placement_spreads_engines_evenly_and_every_sender_agrees() -> None:
    members = [f"shadow-{i}" for i in range(4)]
    owners = Counter(owner_of(key, members) for key in KEYS)
    assert set(owners) == set(members)
    assert max(owners.values()) < 1.25 * len(KEYS) / len(members), owners  # 250 each on average
    # The order in which a sender lists the members does not matter.
    assert all(owner_of(key, members) == owner_of(key, members[::-1]) for key in KEYS)


def test_when_a_member_leaves_only_its_engines_move() -> None:
    members = [f"shadow-{i}" for i in range(4)]
    before = {key: owner_of(key, members) for key in KEYS}
    survivors = members[:1] + members[2:]
    after = {key: owner_of(key, survivors) for key in KEYS}
    moved = [key for key in KEYS if before[key] != after[key]]
    assert moved and all(before[key] == members[1] for key in moved)
    assert all(after[key] == before[key] for key in KEYS if before[key] != members[1])
    # The departed member's engines spread over all the survivors, not onto one of them.
    assert set(after[key] for key in moved) == set(survivors)


def _config() -> ShadowConfig:
    return ShadowConfig(
        windows=WindowRules(seconds=0.5), hardware="cpu", evaluation=EvaluationSettings(optimal=False)
    )


def _stream(name: str, source: str, engine: str, copies: int = 2, size: int = 8) -> list[EventBatch]:
    """A recorded engine stream played `copies` times back to back as engine `engine`, in batches of `size`
    events as a publisher numbers them: after a move mid-way through the first copy, the next is all fresh
    traffic, so that windows cut at the new owner show the stream resumed there."""
    recorded = support.events(name)
    info = dataclasses.replace(support.info_of(recorded), engine=engine)
    span = max(e.start_time + e.duration for e in recorded if isinstance(e, EngineStep)) + 1.0
    events = [info]
    for copy in range(copies):
        events += support.repetition(recorded[1:], copy, copy * span, lambda r, copy=copy: f"{copy}-{r}")
    return [
        EventBatch(events[i : i + size], source, n, incarnation=1)
        for n, i in enumerate(range(0, len(events), size))
    ]


def test_a_stream_moves_to_a_survivor_announced_and_resumes_there() -> None:
    clock = ManualClock(0.0)
    runner = LocalTasks(1)
    cores = {name: ShadowCore(_config(), runner, monotonic=clock) for name in ("a", "b", "c")}
    live = dict(cores)

    def connect(name: str):
        return lambda batch: live[name].ingest(batch)  # a member gone from `live` fails like a dead actor

    batches = _stream("fcfs-kv12", "host-x:1", "7")
    info = batches[0].events[0]
    assert isinstance(info, EngineInfo)
    sink = FleetSink(["a", "b", "c"], connect=connect, clock=clock)
    half = len(batches) // 4
    for batch in batches[:half]:
        sink(batch)
    first = owner_of(engine_key(info), ["a", "b", "c"])
    assert sink.owner == first and sink.moves == 0
    assert [len(c.snapshot().engines) for c in cores.values()] == [name == first for name in cores]

    del live[first]  # the owner dies mid-stream
    for batch in batches[half:]:
        sink(batch)
    survivors = [name for name in cores if name != first]
    second = owner_of(engine_key(info), survivors)
    assert sink.owner == second and sink.moves == 1
    clock.advance(2.0)  # past the new owner's reorder wait: it gives up on the stream's start and goes on
    cores[second].tick()
    (engine,) = cores[second].snapshot().engines
    assert (engine.model_name, engine.engine) == (info.model, "7")  # announced to the new owner by the sink
    assert engine.info == info
    assert engine.tracker.steps > 0 and engine.tracker.windows_ready >= 1  # the stream resumed there
    assert sum(engine.tracker.events.values()) == sum(len(b.events) for b in batches[half:])
    (other,) = set(survivors) - {second}
    assert cores[other].snapshot().engines == ()
    runner.shutdown()


def test_with_no_member_left_the_batch_fails_for_the_publisher_to_count() -> None:
    def connect(name: str):
        def dead(batch: EventBatch) -> None:
            raise ConnectionError(f"{name} is gone")

        return dead

    sink = FleetSink(["a", "b"], connect=connect)
    with pytest.raises(ConnectionError, match="no shadow fleet member took the batch") as refused:
        sink(EventBatch([], "host:1"))
    assert "a is gone" in str(refused.value) and "b is gone" in str(refused.value)  # each member was tried


def test_a_member_that_only_falls_behind_keeps_its_engines() -> None:
    taken: dict[str, list[EventBatch]] = {"a": [], "b": []}
    behind = {"a": False, "b": False}

    def connect(name: str):
        def sink(batch: EventBatch) -> None:
            if behind[name]:
                raise TimeoutError(f"{name} did not take a batch in time")
            taken[name].append(batch)

        return sink

    sink = FleetSink(["a", "b"], connect=connect)
    sink(EventBatch([], "host:1", 0))
    owner = sink.owner
    assert owner is not None and len(taken[owner]) == 1
    behind[owner] = True
    with pytest.raises(TimeoutError):  # the publisher backs off and counts the batch, as with one shadow
        sink(EventBatch([], "host:1", 1))
    behind[owner] = False
    sink(EventBatch([], "host:1", 2))
    assert sink.owner == owner and sink.moves == 0
    assert [b.sequence for b in taken[owner]] == [0, 2] and not any(taken[m] for m in taken if m != owner)


def test_the_hook_given_several_actor_names_places_its_engine_in_the_fleet() -> None:
    from vllm_shadow.adapters.ray_transport import RayActorSink
    from vllm_shadow.adapters.vllm.env import ShadowEnv

    (fleet,) = ShadowEnv.from_environ({"SHADOW_RAY_ACTOR": "shadow-0, shadow-1,shadow-2"}).sinks()
    assert isinstance(fleet, FleetSink) and fleet.members == ("shadow-0", "shadow-1", "shadow-2")
    (single,) = ShadowEnv.from_environ({"SHADOW_RAY_ACTOR": "shadow"}).sinks()
    assert isinstance(single, RayActorSink) and single.actor_name == "shadow"


# ---- the fleet on a multi-node Ray cluster ------------------------------------------------------------------


def _scrape(target: str) -> set[tuple[str, str]]:
    """(model_name, engine) of every engine that `target`'s /metrics has a step count for."""
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.labels["model_name"], s.labels["engine"])
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vllm_shadow_engine_steps_total"
    }


@pytest.mark.integration
def test_fleet_on_two_nodes_rebalances_when_a_member_dies(tmp_path) -> None:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from vllm_shadow.runtime.fleet import start_shadow_fleet
    from vllm_shadow.runtime.service import ServiceConfig

    namespace = "shadow-fleet"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, namespace=namespace, log_to_driver=False)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        wait_until_every_node_schedulable(ray, nodes)
        config = ServiceConfig(shadow=_config(), grpc_address=None, tick_seconds=0.1)
        # Soft affinity may still pass over a node Ray's actor scheduler learned of moments ago (the first
        # member started often lands on the head node): a fleet that does not span both nodes is stopped and
        # started again under new names (start_shadow_fleet records where each member really runs).
        tries: list[str] = []

        def spanning_fleet() -> object:
            fleet = start_shadow_fleet(
                config, 3, name=f"shadow{len(tries)}", namespace=namespace, max_restarts=0
            )
            tries.append(fleet.names[0])
            if {ray.get(m.handle.node.remote())[0] for m in fleet.members} == nodes:
                return fleet
            for member in fleet.members:
                ray.kill(member.handle, no_restart=True)
            return None

        fleet = wait_until(spanning_fleet, 90, "a fleet spanning both nodes", every=0.5)

        names = ["fcfs-kv12", "priority-kv16", "fcfs-kv6-crowded", "fcfs-kv12", "priority-kv16"]
        streams = [_stream(n, f"host-{i}:1", str(i)) for i, n in enumerate(names)]
        infos = [s[0].events[0] for s in streams]
        keys = [engine_key(info) for info in infos]
        # A generous wait for a member that falls behind: this machine's other jobs must not fail the test.
        sinks = [FleetSink(fleet.names, namespace=namespace, timeout=30) for _ in streams]
        halves = [len(s) // 4 for s in streams]
        for sink, stream, half in zip(sinks, streams, halves, strict=True):
            for batch in stream[:half]:
                sink(batch)

        placed = {k: owner_of(k, fleet.names) for k in keys}

        def owned_as_placed() -> dict | None:
            owned = fleet.engines()
            seen = sorted(k for ks in owned.values() for k in ks)
            return owned if seen == sorted(keys) else None

        owned = wait_until(owned_as_placed, 30, "every engine at its owner")
        assert {k: m for m, ks in owned.items() for k in ks} == placed

        # Kill the member that owns the most engines, for good; the senders go on.
        victim = Counter(placed.values()).most_common(1)[0][0]
        handle = next(m.handle for m in fleet.members if m.name == victim)
        ray.kill(handle, no_restart=True)
        survivors = [n for n in fleet.names if n != victim]
        for sink, stream, half in zip(sinks, streams, halves, strict=True):
            for batch in stream[half:]:
                sink(batch)
        for sink in sinks:
            sink.close(timeout=5)
        moved = [k for k in keys if placed[k] == victim]
        assert [s.moves for s in sinks] == [int(placed[k] == victim) for k in keys]
        expected = {k: owner_of(k, survivors) for k in keys}
        assert all(expected[k] == placed[k] for k in keys if k not in moved)  # the others stayed put

        def resumed() -> dict | None:
            snapshots = fleet.snapshots()
            found = {f"{e.model_name}[{e.engine}]": (m, e) for m, s in snapshots.items() for e in s.engines}
            if set(snapshots) != set(survivors) or sorted(found) != sorted(keys):
                return None
            if any(found[k][1].tracker.windows_ready < 1 for k in moved):
                return None
            return found

        found = wait_until(resumed, 30, "the moved engines' streams resumed at the survivors")
        assert {k: m for k, (m, _) in found.items()} == expected
        for k in moved:
            engine = found[k][1]
            assert engine.info == infos[keys.index(k)]  # announced to its new owner
            assert engine.tracker.steps > 0

        # One scrape configuration: every live member's endpoint, each engine's series at its owner only.
        groups = fleet.write_file_sd(tmp_path / "shadow-fleet.json")
        assert json.loads((tmp_path / "shadow-fleet.json").read_text()) == groups
        assert sorted(g["labels"]["shadow_actor"] for g in groups) == sorted(survivors)
        scraped = {g["labels"]["shadow_actor"]: _scrape(g["targets"][0]) for g in groups}
        for k in keys:
            info = infos[keys.index(k)]
            assert [m for m, engines in scraped.items() if (info.model, info.engine) in engines] == [
                expected[k]
            ]
        per_actor = {m: len(ks) for m, ks in fleet.engines().items()}
        assert sum(per_actor.values()) == len(keys)
        fleet.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
