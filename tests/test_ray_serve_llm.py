"""Ray Serve LLM deployed for real: deploy/ray/serve_llm.py's application on a local Ray cluster, the CPU build
of vLLM (tiny Llama with its bundled tokenizer) in the replica, the mirror hook passed through `engine_kwargs`,
and the shadow actor reached through its Ray handle (SHADOW_RAY_ACTOR, with the shadow's token): no port.
OpenAI-compatible completions through Serve's HTTP proxy are then counted by the shadow, request for request,
with each finish's token count checked against the steps'.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("vllm", reason="the CPU build of vLLM is installed by `make test`")
pytest.importorskip("ray.serve.llm")

import ray
from ray import serve

from deploy.ray import serve_llm
from tests.waiting import wait_until
from vllm_shadow.adapters.vllm.engine_run import TINY_LLAMA
from vllm_shadow.runtime.actor import start_shadow_actor
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig
from vllm_shadow.runtime.service import ServiceConfig
from vllm_shadow.tracking.windows import WindowRules

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL_ID = "tiny-llama"
ENGINE = "ray-serve"
NAMESPACE = "serve-llm-test"
TOKEN = "serve-llm-s3cret"
REQUESTS = 6
MAX_TOKENS = 8
DEPLOY_SECONDS = 300  # replica start, vLLM import and engine start on 2 CPUs: about 100 s


@dataclass
class Deployment:
    shadow: Any  # the shadow actor's handle
    url: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    if ray.is_initialized():
        ray.shutdown()
    # A fresh local cluster: the shadow actor, Serve's controller and proxy, the ingress and the LLM replica
    # (one CPU bundle); the shadow's evaluation tasks share what is left.
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    try:
        config = ServiceConfig(
            shadow=ShadowConfig(
                windows=WindowRules(seconds=2.0),
                hardware="cpu",
                evaluation=EvaluationSettings(optimal_time_limit=0.5, optimal_max_requests=16),
            ),
            grpc_address=None,  # the engine reaches the actor through Ray: no gRPC ingest
            grpc_token=TOKEN,  # the actor's ingest checks it too
            metrics_port=None,
            tick_seconds=0.1,
        )
        shadow = start_shadow_actor(config, name="shadow", namespace=NAMESPACE, task_cpus=0.5)
        llm_config = serve_llm.build_llm_config(
            MODEL_ID,
            model_source=str(TINY_LLAMA),
            shadow_actor="shadow",
            shadow_namespace=NAMESPACE,
            cpu=True,
            min_replicas=1,
            max_replicas=1,
            engine_kwargs=dict(
                load_format="dummy",
                enforce_eager=True,
                max_model_len=1024,
                max_num_seqs=4,
                max_num_batched_tokens=512,
                num_gpu_blocks_override=24,
                gpu_memory_utilization=0.2,
                enable_prefix_caching=False,
                seed=0,
            ),
            env_vars={"SHADOW_ENGINE": ENGINE},
            shadow_token=TOKEN,
        )
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # serve.run waits until every replica is healthy (the engine started, the hook attached).
        serve.run(serve_llm.build_app(llm_config), blocking=False)
        yield Deployment(shadow, f"http://127.0.0.1:{port}")
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()


def complete(url: str, prompt: str) -> dict:
    body = json.dumps({"model": MODEL_ID, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True})
    request = urllib.request.Request(
        f"{url}/v1/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def engines(deployment: Deployment) -> list:
    return ray.get(deployment.shadow.snapshot.remote(), timeout=30).engines


def test_ray_serve_llm_replica_streams_to_the_shadow_actor(deployment: Deployment) -> None:
    prompts = [" ".join(["the Azure trace"] * (i + 1)) for i in range(REQUESTS)]  # 3, 6, ... 18 tokens
    with ThreadPoolExecutor(max_workers=REQUESTS) as pool:
        answers = list(pool.map(lambda p: complete(deployment.url, p), prompts))
    usage = [a["usage"] for a in answers]
    assert [u["completion_tokens"] for u in usage] == [MAX_TOKENS] * REQUESTS
    assert [u["prompt_tokens"] for u in usage] == [3 * (i + 1) for i in range(REQUESTS)]

    wait_until(
        lambda: (found := engines(deployment)) and found[0].tracker.requests_finished >= REQUESTS,
        60,
        lambda: f"the shadow actor to see {REQUESTS} requests finish: {engines(deployment)}",
        every=0.2,
    )
    (engine,) = engines(deployment)
    # The mirror hook ran inside the replica's engine (it sends steps) and labelled the engine as told.
    assert (engine.engine, engine.mode) == (ENGINE, "steps")
    assert engine.info.num_kv_blocks == 24 and engine.info.scheduler.max_num_seqs == 4
    assert engine.tracker.requests_arrived == engine.tracker.requests_finished == REQUESTS
    assert engine.tracker.events["arrival"] == engine.tracker.events["finish"] == REQUESTS
    # Tokens: every finish's output count agrees with the tokens the steps emitted for that request, and each
    # request needed one step per generated token at the least.
    assert engine.tracker.inconsistencies == engine.tracker.unknown_requests == 0
    assert engine.tracker.steps >= MAX_TOKENS
    assert engine.sequence.sender_dropped == 0
