"""Record the mirror streams the shadow's tests replay: real vLLM engines (CPU build, tiny Llama) driven by the
bundled Azure conversation trace, with KV sized for preemption. Re-run to refresh them after a vLLM upgrade:

    python tests/data/shadow/record_streams.py
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

from adapters.traces import bundled_trace, read_trace
from adapters.vllm.engine_run import EngineSetup, drive, start_engine, stop_engine, trace_workload

HERE = Path(__file__).resolve().parent
STREAMS = {
    # FCFS under KV pressure: preemptions, resumptions, chunked prefill.
    "fcfs-kv12": (EngineSetup(num_kv_blocks=12, max_num_seqs=8, max_num_batched_tokens=512), 48, 0),
    # The priority policy: its own waiting order and preemption victims.
    "priority-kv16": (EngineSetup(num_kv_blocks=16, policy="priority", long_prefill_token_threshold=128), 40, 3),
}


def record(name: str, setup: EngineSetup, count: int, priorities: int, directory: Path) -> None:
    requests = trace_workload(
        read_trace(bundled_trace("azure-conv"), limit=count).requests, seconds=3.0, priorities=priorities
    )
    path = directory / f"{name}.jsonl"
    os.environ["SHADOW_RECORD"] = str(path)
    try:
        engine = start_engine(setup)
    finally:
        del os.environ["SHADOW_RECORD"]
    try:
        drive(engine, requests)
    finally:
        stop_engine(engine)
    with path.open("rb") as src, gzip.open(HERE / f"{name}.jsonl.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for name, (setup, count, priorities) in STREAMS.items():
            record(name, setup, count, priorities, Path(tmp))
            print("recorded", name)
