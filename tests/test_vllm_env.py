"""SHADOW_* environment variables -> the in-engine publisher's destinations."""

from __future__ import annotations

import os
from pathlib import Path

from vllm_shadow.adapters.grpc_ingest import GrpcSink
from vllm_shadow.adapters.recorder import Recorder
from vllm_shadow.adapters.vllm.env import DEFAULT_QUEUE_CAPACITY, ShadowEnv


def test_nothing_set_means_no_publisher() -> None:
    env = ShadowEnv.from_environ({"SHADOW_TOKEN": "t", "SHADOW_ADDRESS": ""})
    assert not env.enabled and env.publisher() is None


def test_destinations_and_options_are_read(tmp_path: Path) -> None:
    env = ShadowEnv.from_environ(
        {
            "SHADOW_ADDRESS": "127.0.0.1:5555",
            "SHADOW_TOKEN": "s3cret",
            "SHADOW_RECORD": str(tmp_path / "engine-{pid}.jsonl"),
            "SHADOW_QUEUE_CAPACITY": "123",
            "SHADOW_ENGINE": "replica-7",
        }
    )
    assert (env.queue_capacity, env.engine, env.token) == (123, "replica-7", "s3cret")
    recorder, grpc_sink = env.sinks()
    assert isinstance(recorder, Recorder) and recorder.path == tmp_path / f"engine-{os.getpid()}.jsonl"
    assert isinstance(grpc_sink, GrpcSink) and grpc_sink.address == "127.0.0.1:5555"
    recorder.close()
    assert ShadowEnv.from_environ({"SHADOW_RECORD": "x"}).queue_capacity == DEFAULT_QUEUE_CAPACITY
