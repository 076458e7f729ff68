"""Record what a real vLLM engine exposes on /metrics while it serves, for the dashboards' and rules' tests.

The engine and its workload are those of the `fcfs-kv12` mirror stream (tests/data/shadow/record_streams.py),
so vLLM's series carry the same `model_name` and `engine` labels as the shadow's, and the dashboards' joins
`on(model_name, engine)` meet real data. vLLM's Prometheus stat logger lives in the engine's front-end process
(this one) and registers in prometheus_client's default registry; a thread samples its text exposition every
SAMPLE_SECONDS while the engine serves. Re-run after a vLLM upgrade:

    python tests/data/deploy/record_vllm_metrics.py
"""

from __future__ import annotations

import gzip
import json
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root, when run as a script

from vllm_shadow.adapters.traces import bundled_trace, read_trace  # noqa: E402
from vllm_shadow.adapters.vllm.engine_run import EngineSetup, drive, start_engine, stop_engine, trace_workload  # noqa: E402

SAMPLE_SECONDS = 0.25
OUTPUT = HERE / "fcfs-kv12-vllm-metrics.jsonl.gz"


def record() -> int:
    from prometheus_client import REGISTRY, generate_latest

    setup = EngineSetup(num_kv_blocks=12, max_num_seqs=8, max_num_batched_tokens=512)
    requests = trace_workload(read_trace(bundled_trace("azure-conv"), limit=48).requests, seconds=3.0)
    engine = start_engine(setup)
    samples: list[dict[str, object]] = []
    done = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while True:
            samples.append({"seconds": time.monotonic() - start, "text": generate_latest(REGISTRY).decode()})
            if done.wait(SAMPLE_SECONDS):
                break

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        sampler.start()
        drive(engine, requests)
        time.sleep(2 * SAMPLE_SECONDS)  # let the stat logger publish the last step
    finally:
        done.set()
        sampler.join()
        stop_engine(engine)
    samples.append({"seconds": samples[-1]["seconds"], "text": generate_latest(REGISTRY).decode()})
    with gzip.open(OUTPUT, "wt") as out:
        for s in samples:
            out.write(json.dumps(s) + "\n")
    return len(samples)


if __name__ == "__main__":
    print("recorded", record(), "expositions to", OUTPUT)
