"""`shadow status` answers quickly whether the shadow is alive, dead or stuck, and trusts only the user's own
files; the shadow's files are private and never written through a planted link."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import shadow_support as support
from tests.waiting import wait_until
from vllm_shadow.cli import status as status_cmd
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig
from vllm_shadow.runtime.service import ServiceConfig, ShadowService
from vllm_shadow.runtime.status_endpoint import AddressRecord, address_path
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.runtime.user_files import UnsafePathError, user_dir
from vllm_shadow.tracking.windows import WindowRules

ROOT = Path(__file__).resolve().parent.parent
NAME, NAMESPACE = "vllm-shadow", "vllm-shadow"
# Generous: the answer comes in well under 2 s; before, a dead shadow kept `shadow status` for minutes.
ANSWER_TIMEOUT = 30


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A session's $XDG_RUNTIME_DIR of its own, for this process and the commands it starts."""
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    return path


def status_command(*extra: str, timeout: float = ANSWER_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vllm_shadow", "status", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def plant_record(pid: int, url: str) -> Path:
    path = address_path(NAMESPACE, NAME)
    path.write_text(AddressRecord(pid, url, {}, time.time()).to_text())
    return path


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    return process.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the user's private directory and its files ---------------------------------------------------------------


def test_the_user_directory_is_created_private(runtime_dir: Path) -> None:
    path = user_dir()
    assert path == runtime_dir / "vllm-shadow"
    info = os.lstat(path)
    assert info.st_mode & 0o777 == 0o700 and info.st_uid == os.geteuid()


def test_without_a_runtime_dir_the_directory_is_per_user_in_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert user_dir() == tmp_path / f"vllm-shadow-{os.geteuid()}"


@pytest.mark.parametrize("planted", ["symlink", "open to all", "someone else's"])
def test_a_planted_user_directory_is_refused(
    planted: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    path = tmp_path / f"vllm-shadow-{os.geteuid()}"
    if planted == "symlink":
        (tmp_path / "attacker").mkdir(mode=0o700)
        path.symlink_to(tmp_path / "attacker")
    elif planted == "open to all":
        path.mkdir()
        path.chmod(0o777)
    else:
        if os.geteuid() != 0:
            pytest.skip("only root can give a directory to another user")
        path.mkdir(mode=0o700)
        os.chown(path, 65534, 65534)
    with pytest.raises(UnsafePathError):
        user_dir()


def test_the_state_file_is_never_written_through_a_planted_symlink(tmp_path: Path) -> None:
    """A shared directory where another user planted links at the state file's names (its old `.tmp` path
    and the file itself): the victim files stay as they were, the state file is the shadow's own."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    victim, other_victim = tmp_path / "victim", tmp_path / "other-victim"
    victim.write_text("precious")
    other_victim.write_text("precious too")
    state = shared / "engines.json"
    (shared / "engines.tmp").symlink_to(victim)
    state.symlink_to(other_victim)
    config = ServiceConfig(
        shadow=ShadowConfig(windows=WindowRules(seconds=0.5), evaluation=EvaluationSettings(optimal=False)),
        metrics_port=None,
        grpc_address=None,
        tick_seconds=0.05,
        state_path=str(state),
    )
    s = ShadowService(config, LocalTasks())
    try:
        s.ingest(support.batches("fcfs-kv12")[0])  # its engine announcement: the state to save
        wait_until(lambda: not state.is_symlink(), 10, "the service to save its state")
    finally:
        s.close()
    assert victim.read_text() == "precious" and other_victim.read_text() == "precious too"
    saved = json.loads(state.read_text())
    assert len(saved) == 1 and os.lstat(state).st_mode & 0o777 == 0o600


# ---- `shadow status` --------------------------------------------------------------------------------------------


def test_status_of_a_running_shadow_shows_its_snapshot(runtime_dir: Path) -> None:
    config = ServiceConfig(
        shadow=ShadowConfig(windows=WindowRules(seconds=0.5), evaluation=EvaluationSettings(optimal=False)),
        metrics_port=None,
        address_path=str(address_path(NAMESPACE, NAME)),
    )
    s = ShadowService(config, LocalTasks())
    try:
        for batch in support.batches("fcfs-kv12")[:20]:
            s.ingest(batch)
        result = status_command("--json")
        assert result.returncode == 0, result.stderr
        shown = json.loads(result.stdout)
        (engine,) = shown["engines"]
        assert engine["model_name"] == s.snapshot().engines[0].model_name
        assert shown["addresses"]["grpc"] == s.addresses()["grpc"]
        view = status_command()
        assert view.returncode == 0 and "tiny-llama[0]" in view.stdout, view.stderr
    finally:
        s.close()
    assert not address_path(NAMESPACE, NAME).exists()  # a shadow that stops withdraws its address


def test_status_with_no_shadow_says_so(runtime_dir: Path) -> None:
    result = status_command()
    assert result.returncode == 2
    assert "no shadow is running" in result.stderr and "shadow serve" in result.stderr


def test_status_of_a_dead_shadow_says_the_address_file_is_stale(runtime_dir: Path) -> None:
    pid = dead_pid()
    path = plant_record(pid, f"http://127.0.0.1:{free_port()}/status")
    result = status_command()
    assert result.returncode == 2
    assert (
        f"process {pid} is gone" in result.stderr and "stale" in result.stderr and str(path) in result.stderr
    )


def test_status_with_a_live_pid_and_a_closed_port_says_nothing_listens(runtime_dir: Path) -> None:
    plant_record(os.getpid(), f"http://127.0.0.1:{free_port()}/status")
    with pytest.raises(status_cmd.ShadowUnavailable, match="nothing listens"):
        status_cmd.fetch(status_cmd.read_record(address_path(NAMESPACE, NAME)), timeout=1.5)


def test_status_of_a_shadow_that_does_not_answer_gives_up_within_its_timeout(runtime_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as black_hole:  # connects, never answers
        plant_record(os.getpid(), f"http://127.0.0.1:{black_hole.getsockname()[1]}/status")
        result = status_command("--timeout", "0.5")
    assert result.returncode == 2 and "did not answer" in result.stderr and "0.5s" in result.stderr


def test_status_ends_at_once_on_sigterm_while_it_waits(runtime_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as black_hole:
        black_hole.settimeout(ANSWER_TIMEOUT)
        plant_record(os.getpid(), f"http://127.0.0.1:{black_hole.getsockname()[1]}/status")
        process = subprocess.Popen(
            [sys.executable, "-m", "vllm_shadow", "status", "--timeout", "600"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            connection, _ = black_hole.accept()  # the command is now waiting for the answer
            with connection:
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=ANSWER_TIMEOUT) == -signal.SIGTERM
        finally:
            process.kill()
            process.wait()


def test_status_does_not_trust_a_symlinked_address_file(runtime_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "planted.json"
    elsewhere.write_text(AddressRecord(os.getpid(), "http://127.0.0.1:1/status", {}, 0.0).to_text())
    address_path(NAMESPACE, NAME).symlink_to(elsewhere)
    result = status_command()
    assert result.returncode == 2 and "symbolic link" in result.stderr and "not trusted" in result.stderr
