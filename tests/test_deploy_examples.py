"""The deployment examples in deploy/ray/ and deploy/kubernetes/: every file parses, the Kubernetes manifests
validate against the Kubernetes schemas (kubernetes-validate bundles them: no cluster, no network), the
ServiceMonitor reaches both /metrics endpoints, the commands use real flags of `shadow serve` and vLLM, and the
Ray Serve LLM example builds a real application around an LLMConfig that carries the mirror hook (deployed for
real in tests/test_ray_serve_llm.py)."""

from __future__ import annotations

import importlib
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from vllm_shadow.cli.main import build_parser
from vllm_shadow.cli.serve import service_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
RAY = ROOT / "deploy" / "ray"
MIRROR = "vllm_shadow.MirrorScheduler"
K8S_VERSION = "1.33"


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def test_every_yaml_parses() -> None:
    paths = sorted((ROOT / "deploy").glob("*/*.yaml"))
    assert {p.parent.name for p in paths} >= {"ray", "kubernetes"}
    for path in paths:
        assert [doc for doc in yaml.safe_load_all(path.read_text()) if doc], path


# Kubernetes


def test_core_manifests_match_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kinds = set()
    for doc in manifests():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a custom resource: checked below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # strict: unknown fields fail too
        kinds.add(doc["kind"])
    assert kinds == {"Deployment", "Service", "NetworkPolicy"}


def test_schema_validation_catches_mistakes() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    bad = find("Deployment", "vllm")
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    typo = find("Service", "vllm-shadow")
    typo["spec"]["prots"] = typo["spec"].pop("ports")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_deployments_select_their_own_pods_and_services_select_them() -> None:
    for name in ("vllm", "vllm-shadow"):
        deployment, service = find("Deployment", name), find("Service", name)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert service["spec"]["selector"].items() <= pod_labels.items()
        port_names = {p["name"] for p in container(deployment)["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_servicemonitor_scrapes_both_metrics_endpoints() -> None:
    monitor = find("ServiceMonitor", "vllm-shadow")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoints = {e["port"]: e for e in monitor["spec"]["endpoints"]}
    scraped = {}
    for service in (d for d in manifests() if d["kind"] == "Service"):
        if selector.items() <= service["metadata"]["labels"].items():
            for port in service["spec"]["ports"]:
                if port["name"] in endpoints:
                    scraped[service["metadata"]["name"]] = (port["port"], endpoints[port["name"]]["path"])
    # The ports of deploy/prometheus/prometheus.yml: vLLM's 8000, the shadow's 9400.
    assert scraped == {"vllm": (8000, "/metrics"), "vllm-shadow": (9400, "/metrics")}
    assert all(e["interval"].endswith("s") for e in endpoints.values())


def test_shadow_binds_all_interfaces_and_requires_the_token() -> None:
    c = container(find("Deployment", "vllm-shadow"))
    args = build_parser().parse_args([*c["command"][1:], *c["args"]])
    config = service_config(args)
    assert config.grpc_address == "0.0.0.0:50151"  # other pods cannot reach loopback
    assert (config.metrics_host, config.metrics_port) == ("0.0.0.0", 9400)
    assert env(c)[args.token_env]["secretKeyRef"] == {"name": "vllm-shadow-token", "key": "token"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50151, "metrics": 9400}


def test_vllm_runs_the_mirror_hook_towards_the_shadow_service() -> None:
    c = container(find("Deployment", "vllm"))
    assert c["command"] == ["vllm", "serve"]
    assert f"--scheduler-cls={MIRROR}" in c["args"]
    variables = env(c)
    host, port = variables["SHADOW_ADDRESS"].split(":")
    shadow_service = find("Service", "vllm-shadow")
    assert host == shadow_service["metadata"]["name"]
    assert int(port) == {p["name"]: p["port"] for p in shadow_service["spec"]["ports"]}["grpc"]
    assert variables["SHADOW_TOKEN"] == env(container(find("Deployment", "vllm-shadow")))["SHADOW_TOKEN"]
    module, _, cls = MIRROR.rpartition(".")
    assert hasattr(importlib.import_module(module), cls)


def test_vllm_args_are_real_engine_flags() -> None:
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # vLLM before 0.11
        from vllm.utils import FlexibleArgumentParser

    c = container(find("Deployment", "vllm"))
    model, *flags = c["args"]
    flags = [f for f in flags if not f.startswith("--port=")]  # the server's, not the engine's
    args = EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", model, *flags])
    assert args.scheduler_cls == MIRROR


def test_networkpolicy_admits_vllm_to_grpc_only() -> None:
    policy = find("NetworkPolicy", "vllm-shadow")
    shadow_pods = find("Deployment", "vllm-shadow")["spec"]["template"]["metadata"]["labels"]
    vllm_pods = find("Deployment", "vllm")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= shadow_pods.items()
    [grpc_rule] = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "grpc"]
    [source] = grpc_rule["from"]
    assert source["podSelector"]["matchLabels"].items() <= vllm_pods.items()


# Ray


def test_ray_cluster_config_matches_rays_schema_and_starts_the_shadow() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    autoscaler = pytest.importorskip("ray.autoscaler")
    config = yaml.safe_load((RAY / "cluster.yaml").read_text())
    schema = json.loads((Path(autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    [shadow] = [c for c in config["head_start_ray_commands"] if c.startswith("shadow serve")]
    args = build_parser().parse_args(shlex.split(shadow)[1:])
    assert args.ray_address == "auto" and args.detached  # joins the cluster and outlives the command
    assert (args.name, args.namespace) == ("vllm-shadow", "vllm-shadow")
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    # vLLM imports the hook inside each engine: the project must be installed on every node.
    assert any("shadow-scheduler" in c for c in config["setup_commands"])


@pytest.fixture(scope="module")
def serve_llm():
    pytest.importorskip("ray.serve.llm")
    import ray

    yield importlib.import_module("deploy.ray.serve_llm")
    # Building a Serve application starts a local Ray; later tests start their own clusters.
    if ray.is_initialized():
        ray.shutdown()


def test_ray_serve_llm_config_carries_the_mirror_hook(serve_llm) -> None:
    from ray.serve.llm import LLMConfig

    config = serve_llm.build_llm_config("Qwen/Qwen2.5-0.5B-Instruct", engine_kwargs={"scheduler_cls": "x.Y"})
    assert isinstance(config, LLMConfig)
    assert config.engine_kwargs["scheduler_cls"] == MIRROR  # never overridden
    assert config.runtime_env["env_vars"] == {
        "SHADOW_RAY_ACTOR": "vllm-shadow",
        "SHADOW_RAY_NAMESPACE": "vllm-shadow",
    }
    # The engine kwargs are vLLM engine arguments.
    from vllm.engine.arg_utils import AsyncEngineArgs

    assert AsyncEngineArgs(model="m", **config.engine_kwargs).scheduler_cls == MIRROR


def test_ray_serve_llm_config_for_the_cpu_build(serve_llm) -> None:
    # What tests/test_ray_serve_llm.py deploys for real: Ray Serve LLM's CPU accelerator (one CPU bundle,
    # vLLM's multiprocessing executor) and the CPU build selected in the replica's environment.
    config = serve_llm.build_llm_config("m", cpu=True, env_vars={"SHADOW_ENGINE": "e"}, shadow_token="t")
    assert config.accelerator_config.kind == "cpu"
    assert config.runtime_env["env_vars"] == {
        "SHADOW_RAY_ACTOR": "vllm-shadow",
        "SHADOW_RAY_NAMESPACE": "vllm-shadow",
        "SHADOW_TOKEN": "t",  # the actor's ingest refuses batches without the shadow's token
        "VLLM_TARGET_DEVICE": "cpu",
        "SHADOW_ENGINE": "e",
    }
    assert config.engine_kwargs["scheduler_cls"] == MIRROR
    assert serve_llm.build_llm_config("m").accelerator_config.kind == "gpu"  # Ray Serve LLM's default
    app = serve_llm.app_builder({"model_id": "org/model", "cpu": "true"})
    [server] = [
        a._bound_deployment for a in _applications(app) if a._bound_deployment.name.startswith("LLMServer")
    ]
    assert server.init_kwargs["llm_config"].accelerator_config.kind == "cpu"


def test_ray_serve_llm_builds_an_application(serve_llm) -> None:
    from ray.serve import Application

    app = serve_llm.app_builder({"model_id": "org/model", "shadow_actor": "s", "shadow_namespace": "ns"})
    assert isinstance(app, Application)
    # Ray Serve LLM bound an LLMServer deployment to our config and gave its replicas the shadow's environment.
    servers = [
        a._bound_deployment for a in _applications(app) if a._bound_deployment.name.startswith("LLMServer")
    ]
    [server] = servers
    assert server.init_kwargs["llm_config"].engine_kwargs["scheduler_cls"] == MIRROR
    env_vars = server.ray_actor_options["runtime_env"]["env_vars"]
    assert env_vars == {"SHADOW_RAY_ACTOR": "s", "SHADOW_RAY_NAMESPACE": "ns"}


def _applications(value: Any) -> list[Any]:
    from ray.serve import Application

    if isinstance(value, Application):
        deployment = value._bound_deployment
        return [value, *_applications([deployment.init_args, deployment.init_kwargs])]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _applications(v)]
    if isinstance(value, list | tuple):
        return [a for v in value for a in _applications(v)]
    return []
