"""A fleet of shadow actors in one Ray cluster, each owning a share of the engines.

One actor keeps up with a bounded number of engines (one core's worth, `benchmarks/shadow_scale.py`); a fleet
of N named actors, `NAME-0` .. `NAME-{N-1}`, spread over the cluster's nodes, holds N times as many. Nothing
coordinates them: each engine's sender places itself (`adapters.ray_transport.FleetSink`) by rendezvous
hashing of its engine key over the members, so every sender agrees on the owner without asking anyone, and
when a member dies only its engines move, spread over the survivors, where their streams resume. Each actor is
a whole shadow (its own windows, evaluations, recommendations and /metrics) for the engines it owns.

Operators scrape the fleet through one Prometheus file_sd file (`write_file_sd`) listing every live member's
/metrics endpoint, labelled with the member's name: Prometheus re-reads the file when it changes, so a
member that dies drops out of the scrape and a restarted one comes back, without touching the Prometheus
configuration (README: the fleet's scrape job). Series carry the engine's labels, and an engine is owned by one
member at a time, so sums over the fleet need no de-duplication.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ray

from vllm_shadow.readout.snapshot import ShadowSnapshot
from vllm_shadow.runtime.actor import DEFAULT_NAME, DEFAULT_NAMESPACE, launch_shadow_actor
from vllm_shadow.runtime.service import ServiceConfig
from vllm_shadow.runtime.user_files import write_atomic

__all__ = ["FleetMember", "ShadowFleet", "member_names", "start_shadow_fleet"]

_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def member_names(name: str, size: int) -> list[str]:
    """The fleet's actor names: what its engines' senders are given (SHADOW_RAY_ACTOR=NAME-0,NAME-1,...)."""
    if size < 1:
        raise ValueError(f"a fleet needs at least one member, not {size}")
    return [f"{name}-{i}" for i in range(size)]


@dataclass(frozen=True, slots=True)
class FleetMember:
    name: str
    handle: Any  # the Ray actor handle
    node_id: str  # the node it started on (Ray may restart it elsewhere)


class ShadowFleet:
    """The driver's view of a fleet: its members, what each owns, and the one scrape configuration."""

    def __init__(self, members: list[FleetMember], namespace: str, *, timeout: float = 10.0) -> None:
        self.members = members
        self.namespace = namespace
        self._timeout = timeout

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def _ask(self, method: str) -> dict[str, Any]:
        """`method`'s answer from every member that gives one within the time-out; a dead member gives none."""
        refs = {m.name: getattr(m.handle, method).remote() for m in self.members}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self._timeout)
        done = set(ready)
        out = {}
        for name, ref in refs.items():
            if ref not in done:
                continue
            try:
                out[name] = ray.get(ref)
            except ray.exceptions.RayError:  # died, or dying: it owns nothing now
                continue
        return out

    def snapshots(self) -> dict[str, ShadowSnapshot]:
        return self._ask("snapshot")

    def engines(self) -> dict[str, list[str]]:
        """Each live member's engines, as `model[engine]` (what the senders place by)."""
        return {
            name: [f"{e.model_name}[{e.engine}]" for e in snapshot.engines]
            for name, snapshot in self.snapshots().items()
        }

    def scrape_targets(self) -> list[dict[str, Any]]:
        """Prometheus file_sd target groups: one per live member, its /metrics `host:port` with its name as
        the `shadow_actor` label. A member bound to a wildcard address is listed under its node's IP."""
        nodes = self._ask("node")
        groups = []
        for name, addresses in sorted(self._ask("addresses").items()):
            url = addresses.get("metrics")
            if url is None or name not in nodes:
                continue
            parts = urlsplit(url)
            host = nodes[name][1] if parts.hostname in _WILDCARD_HOSTS else parts.hostname
            target = f"[{host}]:{parts.port}" if ":" in (host or "") else f"{host}:{parts.port}"
            groups.append({"targets": [target], "labels": {"shadow_actor": name}})
        return groups

    def write_file_sd(self, path: str | Path) -> list[dict[str, Any]]:
        """Write the scrape targets to `path` for Prometheus' file_sd (atomically, readable by Prometheus);
        returns them. Call it again when members come and go."""
        groups = self.scrape_targets()
        path = Path(path)
        write_atomic(path, json.dumps(groups, indent=1) + "\n")
        os.chmod(path, 0o644)  # endpoints, not secrets: Prometheus usually runs as its own user
        return groups

    def flush(self) -> None:
        self._ask("flush")

    def close(self) -> None:
        """Stop every member (a fleet started detached outlives its driver until this is called)."""
        for member in self.members:
            with contextlib.suppress(ValueError):  # already gone
                ray.kill(member.handle, no_restart=True)


def start_shadow_fleet(
    config: ServiceConfig,
    size: int,
    *,
    name: str = DEFAULT_NAME,
    namespace: str = DEFAULT_NAMESPACE,
    detached: bool = False,
    task_cpus: float = 1.0,
    max_restarts: int = -1,
    timeout: float = 120.0,
) -> ShadowFleet:
    """Start `size` named actors (Ray must be initialised), member i on the i-th alive node in turn, and wait
    until all are up. Each gets `config` as it is: with endpoint ports 0 (the default) each picks free ones."""
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    members = []
    for i, member in enumerate(member_names(name, size)):
        node = nodes[i % len(nodes)]
        handle = launch_shadow_actor(
            config,
            name=member,
            namespace=namespace,
            detached=detached,
            task_cpus=task_cpus,
            node_id=node,
            max_restarts=max_restarts,
        )
        members.append(FleetMember(member, handle, node))
    ray.get([m.handle.ping.remote() for m in members], timeout=timeout)
    # Affinity is soft (a member must survive its node), so a node the local scheduler has not heard of yet
    # is passed over: record where each member really runs, not where it was asked to.
    started = ray.get([m.handle.node.remote() for m in members], timeout=timeout)
    return ShadowFleet(
        [FleetMember(m.name, m.handle, node) for m, (node, _) in zip(members, started, strict=True)],
        namespace,
    )
