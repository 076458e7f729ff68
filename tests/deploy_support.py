"""Shared by the deployment tests: a real Prometheus on loopback, recorded streams played in real time into a
running shadow, and a recorded vLLM /metrics endpoint played back beside it."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.waiting import wait_until
from vllm_shadow.adapters.events import EngineStep, Event, RequestArrival, RequestFinish
from vllm_shadow.adapters.publisher import EventBatch

DATA = Path(__file__).resolve().parent / "data" / "deploy"
VLLM_METRICS = DATA / "fcfs-kv12-vllm-metrics.jsonl.gz"


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package; `make test` installs it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a real Prometheus -----------------------------------------------------------------------------------------


class Prometheus:
    """`prometheus` on 127.0.0.1 with a temporary data directory, and a client for its HTTP API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str | Sequence[str]) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        return self.get(
            "/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}"
        )["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self.get(f"/api/v1/label/{label}/values", **{"match[]": match})

    def wait_until_scraping(self, timeout: float = 30.0) -> None:
        """Until every target has been scraped once: traffic played before that would go unseen."""

        def all_up() -> bool:
            health = self.targets_health()
            return bool(health) and all(h == "up" for _, h in health)

        wait_until(
            all_up, timeout, lambda: f"every target scraped once: {self.get('/api/v1/targets')}", every=0.2
        )

    def wait_until_settled(self, scrapes: int = 2, timeout: float = 30.0) -> None:
        """Until every target has been scraped `scrapes` more times from now and every rule group evaluated
        since the latest scrape: queries then see the final state of what they watch, rules included."""

        def scrape_counts() -> dict[tuple[str, str], float]:
            found = self.query("count_over_time(up[1h])")
            return {(r["metric"]["job"], r["metric"]["instance"]): float(r["value"][1]) for r in found}

        before = scrape_counts()
        wait_until(
            lambda: all(scrape_counts().get(target, 0) >= seen + scrapes for target, seen in before.items()),
            timeout,
            f"{scrapes} more scrapes of every target",
        )
        latest = max(_seconds(t["lastScrape"]) for t in self.get("/api/v1/targets")["activeTargets"])
        wait_until(
            lambda: all(_seconds(g["lastEvaluation"]) > latest for g in self.get("/api/v1/rules")["groups"]),
            timeout,
            "every rule group to evaluate after those scrapes",
        )

    def targets_health(self) -> list[tuple[str, str]]:
        return sorted((t["labels"]["job"], t["health"]) for t in self.get("/api/v1/targets")["activeTargets"])


def _seconds(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339).timestamp()


@contextmanager
def prometheus(
    tmp: Path, targets: dict[str, list[str]], rule_files: Sequence[Path] = (), interval: str = "1s"
) -> Iterator[Prometheus]:
    """Scrape each job's `host:port` targets every `interval`, evaluate `rule_files` as often."""
    binary = require("prometheus")
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": addresses}]}
            for job, addresses in targets.items()
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{(tmp / 'prometheus.log').read_text()}")
            try:
                urllib.request.urlopen(f"{server.url}/-/ready", timeout=1).close()
            except OSError:  # not listening yet
                return False
            return True

        wait_until(
            ready, 30, lambda: f"prometheus to start:\n{(tmp / 'prometheus.log').read_text()}", every=0.2
        )
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


# ---- recorded streams, played in real time ---------------------------------------------------------------------


def shifted(event: Event, offset: float) -> Event:
    """The same event `offset` seconds later: a recording played now looks like traffic happening now."""
    if isinstance(event, RequestArrival | RequestFinish):
        return dataclasses.replace(event, time=event.time + offset)
    if isinstance(event, EngineStep):
        return dataclasses.replace(event, start_time=event.start_time + offset)
    return event


def _event_time(event: Event) -> float | None:
    if isinstance(event, RequestArrival | RequestFinish):
        return event.time
    if isinstance(event, EngineStep):
        return event.start_time + event.duration  # a hook sends a step once it has run
    return None


def play(
    sink: Any,
    events: Sequence[Event],
    source: str,
    *,
    batch_seconds: float = 0.02,
    skip_batches: Sequence[int] = (),
) -> threading.Thread:
    """Send `events` to `sink(batch)` in a thread as a mirror hook would: in real time from now, in batches
    every `batch_seconds` (the hook's flush period). Batches numbered in `skip_batches` are lost in transit."""
    times = [t for t in map(_event_time, events) if t is not None]
    offset = time.time() - min(times)
    moved = [shifted(e, offset) for e in events]

    def run() -> None:
        batch: list[Event] = []
        sequence, due = 0, time.time() + batch_seconds
        for event in moved:
            at = _event_time(event)
            if at is not None and at > due:
                if batch:
                    if sequence not in skip_batches:
                        sink(EventBatch(batch, source, sequence))
                    sequence, batch = sequence + 1, []
                # Real time on purpose: Prometheus scrapes and evaluates rules on the wall clock, which no test
                # can move, so the traffic it watches must happen in it.
                time.sleep(max(0.0, at - time.time()))
                due = max(at, time.time()) + batch_seconds
            batch.append(event)
        if batch:
            sink(EventBatch(batch, source, sequence))

    thread = threading.Thread(target=run, name=f"play-{source}", daemon=True)
    thread.start()
    return thread


class ExpositionPlayer:
    """Serves recorded /metrics expositions on 127.0.0.1, each from its recorded time since `start()`."""

    def __init__(self, path: Path = VLLM_METRICS) -> None:
        with gzip.open(path, "rt") as f:
            self.samples = [json.loads(line) for line in f]
        self._started: float | None = None
        player = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = player.current().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def start(self) -> None:
        self._started = time.monotonic()

    def current(self) -> str:
        elapsed = -1.0 if self._started is None else time.monotonic() - self._started
        text = self.samples[0]["text"]
        for sample in self.samples:
            if sample["seconds"] <= elapsed:
                text = sample["text"]
        return text

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
