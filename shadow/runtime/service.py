"""The shadow as a running service: the core, its ingest endpoints, its metrics endpoint, its maintenance loop.

One process hosts it (the Ray actor in `vllm_shadow.runtime.actor`, or any process that wants one). Ingest arrives three
ways, all into the same core: `ingest(batch)` called directly (the Ray handle transport), the gRPC ingest
server (adapters.grpc_ingest), and an OTLP span receiver (adapters.otlp). Everything binds to loopback unless
told otherwise. A maintenance thread drives the core's `tick()`, mirrors metrics into Ray's metrics system when
asked, and keeps the engines' announcements in a state file: an engine announces itself once, so a restarted
shadow would otherwise not know what the engines it keeps hearing from are. When given an address file, the
service publishes its snapshot on a loopback status endpoint and says where in that file (`shadow status`
reads it). Its files live in the user's private directory (`runtime.user_files`), written atomically.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vllm_shadow.adapters.events import EngineInfo
from vllm_shadow.adapters.grpc_ingest import DEFAULT_MAX_MESSAGE_BYTES, IngestServer
from vllm_shadow.adapters.otlp import OtlpSpanReceiver
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.recorder import event_from_json, event_to_json
from vllm_shadow.adapters.validation import InvalidBatch, validate_batch
from vllm_shadow.readout.exporter import MetricsServer
from vllm_shadow.readout.snapshot import ShadowSnapshot
from vllm_shadow.runtime.core import ShadowConfig, ShadowCore
from vllm_shadow.runtime.status_endpoint import AddressRecord, StatusServer, publish_address, withdraw_address
from vllm_shadow.runtime.tasks import TaskRunner
from vllm_shadow.runtime.user_files import UnsafePathError, read_own_file, user_dir, write_atomic
from vllm_shadow.tracking.reasons import RefusalReason

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    grpc_address: str | None = "127.0.0.1:0"  # None: no gRPC ingest
    grpc_token: str | None = None  # the shared secret of gRPC and OTLP ingest; None: any sender is taken
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    otlp_address: str | None = None  # None: no OTLP receiver
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 0  # None: no HTTP endpoint; 0: any free port
    tick_seconds: float = 0.25
    state_path: str | None = None  # where engine announcements are kept across restarts; None: not kept
    ray_metrics: bool = False  # also export through ray.util.metrics (as ray_vllm_shadow_*)
    ray_metrics_seconds: float = 5.0
    address_path: str | None = None  # where to say where the status endpoint is; None: no status endpoint


def default_state_path(name: str) -> str:
    return str(user_dir() / f"{name}-engines.json")


class ShadowService:
    def __init__(
        self, config: ServiceConfig, runner: TaskRunner, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.core = ShadowCore(config.shadow, runner, clock=clock)  # the clock tests move to let time pass
        self._runner = runner
        self._state_path = Path(config.state_path) if config.state_path else None
        self._saved_infos: dict[str, EngineInfo] = {}
        if self._state_path is not None:
            self._saved_infos = _load_infos(self._state_path)
            self.core.restore(self._saved_infos)
        self._grpc: IngestServer | None = None
        self._otlp: OtlpSpanReceiver | None = None
        self._metrics: MetricsServer | None = None
        self._status: StatusServer | None = None
        self._address_path = Path(config.address_path) if config.address_path else None
        self._ray_metrics = None
        self._ray_refused_unauthenticated = 0  # Ray calls to ingest without the token (counted under _lock)
        self._ray_refused_invalid = 0  # Ray batches with an impossible number (likewise)
        self._lock = threading.Lock()
        try:
            if config.grpc_address is not None:
                self._grpc = IngestServer(
                    lambda batch: self.core.ingest(batch, "grpc"),
                    address=config.grpc_address,
                    token=config.grpc_token,
                    max_message_bytes=config.max_message_bytes,
                ).start()
            if config.otlp_address is not None:
                self._otlp = OtlpSpanReceiver(
                    lambda batch: self.core.ingest(batch, "otlp"),
                    address=config.otlp_address,
                    token=config.grpc_token,
                ).start()
            if config.metrics_port is not None:
                self._metrics = MetricsServer(
                    self.snapshot, host=config.metrics_host, port=config.metrics_port
                )
            if config.ray_metrics:
                from vllm_shadow.readout.ray_metrics import RayMetricsMirror

                self._ray_metrics = RayMetricsMirror()
            if self._address_path is not None:
                self._status = StatusServer(self.snapshot)
                record = AddressRecord(os.getpid(), self._status.url, self.addresses(), time.time())
                publish_address(self._address_path, record)
        except Exception:
            self.close()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shadow-maintenance", daemon=True)
        self._thread.start()

    # ---- the service's interface (also the Ray actor's methods) ----------------------------------------------

    def ingest(self, batch: EventBatch, token: str | None = None) -> int:
        """The Ray transport's entry. With a token configured, a call without it is refused (PermissionError)
        and counted: the same rule as gRPC and OTLP. It guards against a misdirected sender, not an attacker:
        whoever can reach the Ray cluster can run code in it (see the README on the actor's trust boundary)."""
        expected = self.config.grpc_token
        if expected is not None and not hmac.compare_digest((token or "").encode(), expected.encode()):
            with self._lock:
                self._ray_refused_unauthenticated += 1
            raise PermissionError("the shadow takes batches only with its token (SHADOW_TOKEN)")
        try:
            validate_batch(batch)  # gRPC checks on decoding; a Ray caller's batch arrives as objects
        except InvalidBatch:
            with self._lock:
                self._ray_refused_invalid += 1
            raise
        return self.core.ingest(batch, "ray")

    def snapshot(self) -> ShadowSnapshot:
        snapshot = self.core.snapshot(refused=self._refused())
        return _with_addresses(snapshot, self.addresses())

    def addresses(self) -> dict[str, str]:
        out = {}
        if self._grpc is not None:
            out["grpc"] = self._grpc.address
        if self._otlp is not None:
            out["otlp"] = self._otlp.address
        if self._metrics is not None:
            out["metrics"] = self._metrics.url
        return out

    def flush(self) -> None:
        """Close every open window now (the end of a run)."""
        self.core.flush()

    def idle(self) -> bool:
        return self.core.idle()

    def close(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self._thread.join(timeout=5)
        for server in (self._grpc, self._otlp):
            if server is not None:
                server.stop(grace=0.5)
        if self._metrics is not None:
            self._metrics.stop()
        if self._status is not None:
            if self._address_path is not None:
                withdraw_address(self._address_path)
            self._status.stop()
        self._runner.shutdown()

    # ---- internals ------------------------------------------------------------------------------------------

    def _refused(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            out["ray"] = {RefusalReason.INVALID: self._ray_refused_invalid}
            if self.config.grpc_token is not None:
                out["ray"][RefusalReason.UNAUTHENTICATED] = self._ray_refused_unauthenticated
        if self._grpc is not None:
            s = self._grpc.stats
            out["grpc"] = {
                RefusalReason.MALFORMED: s.refused_malformed,
                RefusalReason.INVALID: s.refused_invalid,
                RefusalReason.OVERSIZED: s.refused_oversized,
                RefusalReason.UNAUTHENTICATED: s.refused_unauthenticated,
                RefusalReason.SINK_FAILURE: s.sink_failures,
            }
        if self._otlp is not None:
            s = self._otlp.stats
            out["otlp"] = {
                RefusalReason.MALFORMED: s.refused_malformed,
                RefusalReason.INVALID: s.refused_invalid,  # checked by the receiver, as gRPC's on decoding
                RefusalReason.UNAUTHENTICATED: s.refused_unauthenticated,
                RefusalReason.SINK_FAILURE: s.sink_failures,
                RefusalReason.INCOMPLETE_SPAN: s.incomplete_spans,
            }
        return out

    def _loop(self) -> None:
        since_ray_push = 0.0
        while not self._stop.wait(self.config.tick_seconds):
            try:
                self.core.tick()
                self._save_infos()
                since_ray_push += self.config.tick_seconds
                if self._ray_metrics is not None and since_ray_push >= self.config.ray_metrics_seconds:
                    since_ray_push = 0.0
                    self._ray_metrics.push(self.snapshot())
            except Exception:  # the loop must outlive any one failure; the failure is logged
                logger.exception("shadow maintenance failed")

    def _save_infos(self) -> None:
        if self._state_path is None:
            return
        infos = self.core.engine_infos()
        if infos == self._saved_infos:
            return
        # A fresh file renamed over the state file: never written through a link someone planted there.
        write_atomic(self._state_path, json.dumps({name: event_to_json(i) for name, i in infos.items()}))
        self._saved_infos = infos


def _load_infos(path: Path) -> dict[str, EngineInfo]:
    try:
        raw = json.loads(read_own_file(path))
        infos = {name: event_from_json(obj) for name, obj in raw.items()}
    except FileNotFoundError:
        return {}
    except UnsafePathError as exc:
        logger.warning("not trusting shadow state %s: %s", path, exc)
        return {}
    except (ValueError, TypeError, AttributeError) as exc:
        logger.warning("ignoring unreadable shadow state %s: %s", path, exc)
        return {}
    return {name: info for name, info in infos.items() if isinstance(info, EngineInfo)}


def _with_addresses(snapshot: ShadowSnapshot, addresses: dict[str, str]) -> ShadowSnapshot:
    return dataclasses.replace(snapshot, addresses=addresses)
