"""The OpenAI-compatible server (`vllm serve`, CPU build, mirror hook recording) driven by concurrent clients.

Each client is one chain of `PromptedRequest`s (a conversation): it posts a turn to /v1/completions with the
prompt as token ids, waits for the answer, thinks `arrival.time` seconds, and posts the next. The clients run
at once in threads, so the engine sees their requests interleave as a served engine does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vllm_shadow.adapters.vllm.engine_run import EngineSetup, serve_command
from vllm_shadow.adapters.vllm.prefix_workloads import PromptedRequest

STARTUP_SECONDS = 240  # a server starting on 2 shared cores takes 60-120 s
REQUEST_SECONDS = 120


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    recording: Path  # the engine core's mirror stream (SHADOW_RECORD)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def running_server(setup: EngineSetup, directory: Path, name: str) -> Iterator[Server]:
    """`vllm serve` for `setup`, its mirror recording to directory/name.jsonl; stopped (SIGTERM, so the hook
    flushes; its whole process group killed if it lingers) when the block ends."""
    port = _free_port()
    recording = directory / f"{name}.jsonl"
    log = directory / f"{name}.log"
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "SHADOW_RECORD": str(recording)}
    for variable in ("SHADOW_ADDRESS", "SHADOW_RAY_ACTOR"):
        env.pop(variable, None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            serve_command(setup, port), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(f"http://127.0.0.1:{port}", process, log, recording)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _healthy(server.url):
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({process.returncode}):\n{server.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {STARTUP_SECONDS} s:\n{server.tail()}")
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def _complete(server: Server, model: str, request: PromptedRequest) -> int:
    body = {
        "model": model,
        "prompt": list(request.prompt_token_ids),
        "max_tokens": request.arrival.output_tokens,
        "ignore_eos": True,
        "priority": request.arrival.priority,
    }
    call = urllib.request.Request(
        f"{server.url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(call, timeout=REQUEST_SECONDS) as response:
        return json.load(response)["usage"]["completion_tokens"]


def chains(requests: Sequence[PromptedRequest]) -> list[list[PromptedRequest]]:
    """The requests as clients: each chain starts with a request that follows none, then its followers."""
    followers = {r.after: r for r in requests if r.after is not None}
    out = []
    for first in (r for r in requests if r.after is None):
        chain = [first]
        while (nxt := followers.get(chain[-1].arrival.request_id)) is not None:
            chain.append(nxt)
        out.append(chain)
    return out


def drive_clients(server: Server, model: str, requests: Sequence[PromptedRequest]) -> dict[str, int]:
    """One client thread per chain; each waits its first request's `time`, then turn by turn. Returns the
    completion tokens per request id; raises what a client met."""
    produced: dict[str, int] = {}
    errors: list[BaseException] = []
    start = time.monotonic()

    def client(chain: list[PromptedRequest]) -> None:
        try:
            time.sleep(max(0.0, chain[0].arrival.time - (time.monotonic() - start)))
            for k, request in enumerate(chain):
                if k:
                    time.sleep(request.arrival.time)  # the user's think time after the previous answer
                produced[request.arrival.request_id] = _complete(server, model, request)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in chains(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=REQUEST_SECONDS * 10)
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise TimeoutError("a client did not finish")
    return produced
