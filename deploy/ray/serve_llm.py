"""Ray Serve LLM with the shadow's mirror hook: every engine replica streams its scheduling events to the
shadow actor that `shadow serve --ray-address auto --detached` started on the same cluster (see cluster.yaml).

The hook goes in through `engine_kwargs` (vLLM's `scheduler_cls`); where to send the events goes in through the
replicas' runtime environment (SHADOW_RAY_ACTOR / SHADOW_RAY_NAMESPACE, read by adapters/vllm/env.py), which
Ray Serve LLM passes to the replica and the engine workers. Inside one Ray cluster the events travel as Ray
actor calls, so no port is needed; the shadow's token (SHADOW_TOKEN, when `shadow serve` has one) is passed
to the replicas as well, since the actor's `ingest` refuses batches without it. The `vllm-shadow` package must
be installed on every node (cluster.yaml's setup_commands do it): vLLM imports the hook by name in the engine
process.

On the head node, from the repository root:

    serve run deploy.ray.serve_llm:app_builder model_id=Qwen/Qwen2.5-0.5B-Instruct

or `python -m deploy.ray.serve_llm`. The OpenAI-compatible API is then on port 8000; the shadow's metrics on
its --metrics-port (9400), and with `log_engine_metrics` vLLM's own through Ray's metrics agent (ray_vllm_*).
With the CPU build of vLLM add `cpu=true` (or `--cpu`); tests/test_ray_serve_llm.py deploys it so.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.llm import LLMConfig

MIRROR_SCHEDULER = "vllm_shadow.MirrorScheduler"
SHADOW_ACTOR = "vllm-shadow"  # `shadow serve --name` (its default)
SHADOW_NAMESPACE = "vllm-shadow"  # `shadow serve --namespace` (its default)
DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def build_llm_config(
    model_id: str = DEFAULT_MODEL,
    *,
    model_source: str | None = None,
    shadow_actor: str = SHADOW_ACTOR,
    shadow_namespace: str = SHADOW_NAMESPACE,
    engine_kwargs: Mapping[str, Any] | None = None,
    accelerator_type: str | None = None,
    min_replicas: int = 1,
    max_replicas: int = 2,
    cpu: bool = False,
    env_vars: Mapping[str, str] | None = None,
    shadow_token: str | None = None,
) -> LLMConfig:
    """The LLMConfig of one model with the mirror hook in its engine and the shadow actor in its environment.

    `engine_kwargs` are vLLM engine arguments; `scheduler_cls` is always the mirror hook (it wraps vLLM's own
    scheduler, so scheduling is unchanged). `cpu` runs the CPU build of vLLM (Ray Serve LLM's CPU accelerator:
    a one-CPU placement bundle and vLLM's multiprocessing executor); `env_vars` are added to the replicas'
    environment, `shadow_token` the shadow's SHADOW_TOKEN. Nothing starts here: Ray Serve builds the engines
    on deployment.
    """
    from ray.serve.llm import LLMConfig

    kwargs: dict[str, Any] = {"max_num_seqs": 256, "max_num_batched_tokens": 8192}
    kwargs.update(engine_kwargs or {})
    kwargs["scheduler_cls"] = MIRROR_SCHEDULER
    # SHADOW_ENGINE is left unset unless given: each engine is then labelled by its data-parallel rank.
    variables = {"SHADOW_RAY_ACTOR": shadow_actor, "SHADOW_RAY_NAMESPACE": shadow_namespace}
    if shadow_token:
        variables["SHADOW_TOKEN"] = shadow_token
    if cpu:
        variables["VLLM_TARGET_DEVICE"] = "cpu"
    variables.update(env_vars or {})
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model_source or model_id},
        engine_kwargs=kwargs,
        runtime_env={"env_vars": variables},
        deployment_config={
            "autoscaling_config": {"min_replicas": min_replicas, "max_replicas": max_replicas}
        },
        accelerator_type=accelerator_type,
        accelerator_config={"kind": "cpu"} if cpu else None,
        log_engine_metrics=True,
    )


def build_app(llm_config: LLMConfig | None = None) -> Application:
    """The OpenAI-compatible Ray Serve application around one LLMConfig (not yet deployed)."""
    from ray.serve.llm import build_openai_app

    return build_openai_app({"llm_configs": [llm_config or build_llm_config()]})


def app_builder(args: dict[str, str]) -> Application:
    """For `serve run deploy.ray.serve_llm:app_builder key=value ...` (Ray Serve passes the pairs as strings)."""
    return build_app(
        build_llm_config(
            args.get("model_id", DEFAULT_MODEL),
            model_source=args.get("model_source"),
            shadow_actor=args.get("shadow_actor", SHADOW_ACTOR),
            shadow_namespace=args.get("shadow_namespace", SHADOW_NAMESPACE),
            accelerator_type=args.get("accelerator_type"),
            min_replicas=int(args.get("min_replicas", 1)),
            max_replicas=int(args.get("max_replicas", 2)),
            cpu=args.get("cpu", "false").lower() in ("1", "true", "yes"),
            shadow_token=os.environ.get("SHADOW_TOKEN"),
        )
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", default=DEFAULT_MODEL)
    parser.add_argument("--accelerator-type", default=None, help="e.g. H100; default: any GPU")
    parser.add_argument("--shadow-actor", default=SHADOW_ACTOR)
    parser.add_argument("--shadow-namespace", default=SHADOW_NAMESPACE)
    parser.add_argument(
        "--cpu", action="store_true", help="the CPU build of vLLM (Ray Serve LLM's CPU accelerator)"
    )
    args = parser.parse_args(argv)

    from ray import serve

    config = build_llm_config(
        args.model_id,
        shadow_actor=args.shadow_actor,
        shadow_namespace=args.shadow_namespace,
        accelerator_type=args.accelerator_type,
        cpu=args.cpu,
        shadow_token=os.environ.get("SHADOW_TOKEN"),
    )
    serve.run(build_app(config), blocking=True)


if __name__ == "__main__":
    main()
