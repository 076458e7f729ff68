"""Record the mirror streams the shadow's tests replay: real vLLM engines (CPU build, tiny Llama) driven by the
bundled Azure conversation trace, with KV sized for preemption. Re-run to refresh them after a vLLM upgrade:

    python tests/data/shadow/record_streams.py [NAME ...]
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import tempfile
from pathlib import Path

from vllm_shadow.adapters.traces import bundled_trace, read_trace
from vllm_shadow.adapters.vllm.engine_run import EngineSetup, drive, start_engine, stop_engine, trace_workload

HERE = Path(__file__).resolve().parent
STREAMS = {
    # FCFS under KV pressure: preemptions, resumptions, chunked prefill.
    "fcfs-kv12": (EngineSetup(num_kv_blocks=12, max_num_seqs=8, max_num_batched_tokens=512), 48, 0),
    # The priority policy: its own waiting order and preemption victims.
    "priority-kv16": (
        EngineSetup(num_kv_blocks=16, policy="priority", long_prefill_token_threshold=128),
        40,
        3,
    ),
    # Many short decoders on little KV under FCFS: steps that preempt several requests at once.
    "fcfs-kv6-crowded": (EngineSetup(num_kv_blocks=6, max_num_seqs=16, max_num_batched_tokens=1024), 40, 0),
    # vLLM's default prefix caching, under KV pressure: a resumed request re-hits its own cached blocks.
    "fcfs-kv16-prefix-caching": (
        EngineSetup(num_kv_blocks=16, long_prefill_token_threshold=64, enable_prefix_caching=True),
        40,
        0,
    ),
}
# Request sizes per stream (prompt cap, output cap), scaled from the trace by engine_run.trace_workload.
SIZES = {"fcfs-kv6-crowded": (160, 120)}


def record(name: str, setup: EngineSetup, count: int, priorities: int, directory: Path) -> None:
    max_prompt, max_output = SIZES.get(name, (1000, 128))
    requests = trace_workload(
        read_trace(bundled_trace("azure-conv"), limit=count).requests,
        seconds=3.0,
        priorities=priorities,
        max_prompt_tokens=max_prompt,
        max_output_tokens=max_output,
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
    wanted = sys.argv[1:] or list(STREAMS)
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            setup, count, priorities = STREAMS[name]
            record(name, setup, count, priorities, Path(tmp))
            print("recorded", name)
