"""The shadow as a named Ray actor on a real local Ray cluster: ingest through its handle, evaluation as Ray
tasks, death and restart, and export through Ray's own metrics agent."""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from tests import shadow_support as support  # noqa: E402
from tests.waiting import wait_until  # noqa: E402
from vllm_shadow.adapters.ray_transport import RayActorSink  # noqa: E402
from vllm_shadow.runtime.actor import find_shadow_actor, start_shadow_actor  # noqa: E402
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig  # noqa: E402
from vllm_shadow.runtime.service import ServiceConfig  # noqa: E402
from vllm_shadow.runtime.status_endpoint import address_path  # noqa: E402
from vllm_shadow.tracking.windows import WindowRules  # noqa: E402

pytestmark = pytest.mark.integration

NAMESPACE = "shadow-actor-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    metrics_port = free_port()
    ray.init(
        address="local",  # always a fresh cluster, never one another process left running on this machine
        num_cpus=2,
        include_dashboard=False,
        namespace=NAMESPACE,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 500},
    )
    yield metrics_port
    ray.shutdown()


def config(tmp_path: Path, **overrides) -> ServiceConfig:
    shadow = ShadowConfig(
        windows=WindowRules(seconds=0.5),
        hardware="cpu",
        evaluation=EvaluationSettings(optimal_time_limit=0.5, optimal_max_requests=24),
    )
    return ServiceConfig(
        shadow=shadow,
        grpc_address=f"127.0.0.1:{free_port()}",
        metrics_port=free_port(),
        state_path=str(tmp_path / "engines.json"),
        tick_seconds=0.1,
        **overrides,
    )


def evaluated(handle) -> int:
    return sum(e.windows_evaluated for e in ray.get(handle.snapshot.remote()).engines)


def test_batches_through_the_ray_handle_are_evaluated_as_ray_tasks(cluster, tmp_path: Path) -> None:
    handle = start_shadow_actor(config(tmp_path), name="shadow-a", namespace=NAMESPACE)
    try:
        sink = RayActorSink("shadow-a", namespace=NAMESPACE)
        for batch in support.batches("fcfs-kv12"):
            sink(batch)
        sink.close()
        ray.get(handle.flush.remote())
        wait_until(
            lambda: ray.get(handle.idle.remote()) and evaluated(handle) >= 5,
            60,
            "five windows evaluated",
            every=0.2,
        )
        snapshot = ray.get(handle.snapshot.remote())
        (engine,) = snapshot.engines
        assert snapshot.batches == {"ray": len(support.batches("fcfs-kv12"))}
        assert engine.last.fidelity.step_match_ratio == 1.0
        assert set(engine.last.task_locations) == {ray.get_runtime_context().get_node_id()}
        found = find_shadow_actor("shadow-a", NAMESPACE)
        assert ray.get(found.ping.remote()) == ray.get(handle.ping.remote())  # by name, the same actor's id
    finally:
        ray.kill(handle, no_restart=True)


def test_a_killed_actor_is_restarted_finds_its_engines_again_and_keeps_evaluating(
    cluster, tmp_path: Path
) -> None:
    cfg = config(tmp_path)
    handle = start_shadow_actor(cfg, name="shadow-b", namespace=NAMESPACE)
    try:
        batches = support.batches("fcfs-kv12")
        sink = RayActorSink("shadow-b", namespace=NAMESPACE, max_in_flight=0, timeout=10)
        for batch in batches[:20]:
            sink(batch)
        wait_until(Path(cfg.state_path).exists, 60, "the actor to write its state file", every=0.2)
        actor_id = ray.get(handle.ping.remote())
        before = ray.get(handle.snapshot.remote())
        ray.kill(handle, no_restart=False)  # the process dies; Ray starts a new one with the same arguments

        def restarted() -> bool:
            try:
                return ray.get(handle.snapshot.remote(), timeout=5).started_at != before.started_at
            except ray.exceptions.RayError:
                return False

        wait_until(restarted, 60, "Ray to restart the killed actor", every=0.5)
        assert ray.get(handle.ping.remote()) == actor_id  # the same actor, in a new process
        lost = 0
        for batch in batches[20:]:
            try:
                sink(batch)
            except Exception:  # a batch sent while the sink re-finds the actor: the sender counts it
                lost += 1
        sink.close()
        ray.get(handle.flush.remote())
        wait_until(
            lambda: ray.get(handle.idle.remote()) and evaluated(handle) >= 1,
            60,
            "a window evaluated",
            every=0.2,
        )
        snapshot = ray.get(handle.snapshot.remote())
        assert snapshot.addresses == before.addresses  # the same ports: senders find it where it was
        assert "no_engine_info" not in snapshot.unattributed_drops
        (engine,) = snapshot.engines
        assert engine.last.fidelity.step_match_ratio == 1.0 and lost <= 1
    finally:
        ray.kill(handle, no_restart=True)


def test_an_actor_with_a_token_takes_batches_only_from_senders_with_it(cluster, tmp_path: Path) -> None:
    handle = start_shadow_actor(config(tmp_path, grpc_token="s3cret"), name="shadow-t", namespace=NAMESPACE)
    try:
        batch = support.batches("fcfs-kv12")[0]
        without = RayActorSink("shadow-t", namespace=NAMESPACE, max_in_flight=0, timeout=30)
        with pytest.raises(ray.exceptions.RayTaskError, match="token"):
            without(batch)
        with_token = RayActorSink(
            "shadow-t", namespace=NAMESPACE, max_in_flight=0, timeout=30, token="s3cret"
        )
        with_token(batch)
        with_token.close()
        snapshot = ray.get(handle.snapshot.remote())
        assert snapshot.batches == {"ray": 1} and snapshot.refused["ray"]["unauthenticated"] == 1
    finally:
        ray.kill(handle, no_restart=True)


def test_shadow_status_reads_the_actor_s_published_state_without_joining_ray(
    cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's token authentication once made `shadow status` fail after 21.6 s: it no longer joins the cluster."""
    from vllm_shadow.cli import status as status_cmd

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    address = address_path("shadow-status-test", "shadow-s")
    handle = start_shadow_actor(
        config(tmp_path, address_path=str(address)), name="shadow-s", namespace=NAMESPACE
    )
    try:
        for batch in support.batches("fcfs-kv12")[:10]:
            ray.get(handle.ingest.remote(batch))
        record = status_cmd.read_record(address)
        snapshot = status_cmd.fetch(record, timeout=status_cmd.DEFAULT_TIMEOUT)
        assert record.pid != os.getpid()  # the actor's own process published it
        assert (
            snapshot.batches == {"ray": 10}
            and snapshot.addresses == ray.get(handle.snapshot.remote()).addresses
        )
        ray.get(handle.close.remote())
        assert not address.exists()  # a shadow that closes withdraws its address
    finally:
        ray.kill(handle, no_restart=True)


def test_metrics_also_reach_ray_s_metrics_agent(cluster, tmp_path: Path) -> None:
    handle = start_shadow_actor(
        config(tmp_path, ray_metrics=True, ray_metrics_seconds=0.2), name="shadow-c", namespace=NAMESPACE
    )
    try:
        for batch in support.batches("priority-kv16"):
            ray.get(handle.ingest.remote(batch))
        finished = ray.get(handle.snapshot.remote()).engines[0].tracker.requests_finished
        url = f"http://127.0.0.1:{cluster}/metrics"

        def exported() -> bool:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            return any(
                line.startswith("ray_vllm_shadow_requests_finished_total{")
                and line.endswith(f" {finished:.1f}")
                for line in text.splitlines()
            )

        wait_until(exported, 60, "Ray's metrics agent to export the finished count", every=1.0)
    finally:
        ray.kill(handle, no_restart=True)
