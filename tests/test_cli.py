"""The `shadow` command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_shadow.cli.main import main

REPLAY_KEYS = {
    "policy",
    "requests",
    "gpu_seconds",
    "makespan_s",
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "e2e_p99_s",
    "preemptions",
    "recomputed_tokens",
    "recompute_gpu_seconds",
}


def test_replay_json_compares_policies_on_the_bundled_trace(capsys):
    code = main(
        [
            "replay",
            "azure-conv",
            "--limit",
            "300",
            "--kv-blocks",
            "600",
            "--json",
            "--policies",
            "vllm,sarathi,no-eviction,vllm(max_num_seqs=16,max_num_batched_tokens=1024)",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in rows] == [
        "vllm",
        "sarathi",
        "no-eviction",
        "vllm(max_num_seqs=16,max_num_batched_tokens=1024)",
    ]
    for row in rows:
        assert row.keys() >= REPLAY_KEYS
        # Llama-2-7B's context is 4,096 tokens: one prompt of the window is longer, and vLLM refuses it.
        assert row["rejected"] == {"prompt_too_long": 1, "never_fits_kv_cache": 0}
        assert row["requests"] == row["finished"] == 299 == row["trace_requests"] - 1
        assert row["gpu_seconds"] > 0 and row["makespan_s"] >= row["gpu_seconds"] * 0.99
    no_eviction = rows[2]
    assert no_eviction["preemptions"] == 0 and no_eviction["recomputed_tokens"] == 0
    assert no_eviction["recompute_gpu_seconds"] == 0
    assert rows[0]["preemptions"] > 0  # 600 blocks put vLLM under memory pressure on this window
    # What vLLM's preemptions cost: some of its busy time, never all of it.
    assert 0 < rows[0]["recompute_gpu_seconds"] < rows[0]["gpu_seconds"]


def test_replay_table_names_the_engine_and_every_policy(capsys):
    assert main(["replay", "azure-code", "--limit", "100", "--policies", "vllm,orca", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "H100" in out and "llama-2-7b" in out
    assert "vllm" in out and "orca" in out and "TTFT p99" in out


def test_rate_scale_and_slice_change_the_window(capsys):
    main(["replay", "azure-conv", "--start", "60", "--end", "120", "--json", "--policies", "vllm"])
    sliced = json.loads(capsys.readouterr().out)[0]
    main(
        [
            "replay",
            "azure-conv",
            "--start",
            "60",
            "--end",
            "120",
            "--rate-scale",
            "4",
            "--json",
            "--policies",
            "vllm",
        ]
    )
    dense = json.loads(capsys.readouterr().out)[0]
    assert sliced["requests"] == dense["requests"] > 0
    assert dense["makespan_s"] < sliced["makespan_s"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["replay", "no-such-trace"], "neither a bundled trace"),
        (["replay", "azure-conv", "--policies", "vllm(colour=red)"], "bad setting 'colour=red'"),
        (["replay", "azure-conv", "--policies", "fifo"], "unknown policy 'fifo'"),
        (["replay", "azure-conv", "--gpu", "tpu9"], "tpu9"),
        (["replay", "azure-conv", "--start", "99999"], "no requests"),
    ],
)
def test_errors_are_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_malformed_trace_error_names_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,abc,109\n"
    )
    assert main(["replay", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.csv:3" in err and "ContextTokens" in err


def test_console_script_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "vllm_shadow.cli.main", "--help"], capture_output=True, text=True, check=True
    )
    assert "replay" in out.stdout


@pytest.mark.parametrize(
    ("missing", "argv", "extra"),
    [
        ("rich", ["replay", "azure-conv", "--limit", "10"], "shadow"),
        ("ortools", ["optimal", "azure-conv", "--help"], "shadow"),
        ("ray", ["serve", "--grpc-port", "0"], "ray"),
    ],
)
def test_a_missing_extra_is_named_with_its_install_command(missing, argv, extra):
    # `pip install vllm-shadow` alone is the engine-side hook: the command says which extra it lacks.
    script = (
        f"import sys; sys.modules[{missing!r}] = None  # import {missing} now fails as if not installed\n"
        f"from vllm_shadow.cli.main import main; sys.exit(main({argv!r}))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"shadow {argv[0]} cannot run: {missing} is missing" in done.stderr
    assert f"pip install 'vllm-shadow[{extra}]'" in done.stderr and "Traceback" not in done.stderr


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's line breaks depend on the terminal


@pytest.mark.parametrize("command", ["demo", "replay", "optimal", "profile", "serve", "status", "report"])
def test_every_command_has_its_help(command, capsys):
    out = _help(command, capsys)
    assert out.startswith(f"usage: shadow {command}") and "(not installed" not in out


def test_shared_option_groups_show_each_command_s_own_defaults(capsys):
    # The windows-and-evaluation group is shared; its help gives the defaults the command really uses.
    demo = _help("demo", capsys)
    assert "calibration (default cpu)" in demo and "CP-SAT seconds per window (default 2)" in demo
    serve = _help("serve", capsys)
    assert "calibration (default h100)" in serve and "CP-SAT seconds per window (default 5)" in serve
    report = _help("report", capsys)
    assert "engine time (default 1)" in report and "max_num_seqs (default 2)" in report
    assert "actor name (default" in _help("status", capsys)


def test_replay_reports_a_policy_that_never_finishes_and_replays_the_others() -> None:
    # A policy that readmits and preempts without end on 7 usable blocks: its row says so instead of the command
    # stopping with a traceback, and vLLM's policy is replayed beside it as usual.
    from rich.console import Console

    from tests.test_simulator import thrashing_workload
    from vllm_shadow.adapters.traces import Trace
    from vllm_shadow.cli.options import Setup
    from vllm_shadow.cli.replay import print_table, replay_all
    from vllm_shadow.costmodel.linear import LinearCostModel

    requests, thrashing = thrashing_workload()
    setup = Setup("m", "cpu", 1, 16, 8, LinearCostModel(a=1e-3, b=1e-5, c=0.0, d=0.0), "test", 4096)
    failed, replayed = replay_all(requests, [thrashing, "vllm"], setup)
    assert set(failed) == {"policy", "error", "wall_s"} and "thrashes" in failed["error"]
    assert replayed["finished"] == len(requests) and "error" not in replayed
    console = Console(width=200, record=True)
    print_table([failed, replayed], Trace(None, "test", requests), setup, console)
    text = console.export_text()
    assert f"{thrashing}: not replayed:" in " ".join(text.split()) and "vllm " in text
