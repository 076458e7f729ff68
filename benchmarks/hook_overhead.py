"""Engine overhead of the mirror hook: stock scheduler, hook with a shadow listening, hook with nobody there.

Three real vLLM engines (CPU build, tiny Llama) run side by side in one process tree, identical but for the
scheduler class and where the hook sends events: vLLM's stock `Scheduler`; `MirrorScheduler` streaming to a
live gRPC ingest in this process; `MirrorScheduler` aimed at a closed port. The same workload (requests from
the bundled Azure trace, all submitted at once) runs on each engine in turn, rotating the order every round
so that machine-load drift spreads evenly; the median over rounds is compared.

A second, quieter figure isolates the hook's own cost: vLLM's real Scheduler driven in-process (no model) with
and without the hook, so the difference per step is the hook's CPU time on the engine's thread.

    python benchmarks/hook_overhead.py [--rounds 7] [--requests 48] [--hook-cost-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from vllm_shadow.adapters.events import EngineStep
from vllm_shadow.adapters.grpc_ingest import IngestServer
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.traces import bundled_trace, read_trace
from vllm_shadow.adapters.vllm.engine_run import EngineSetup, drive, start_engine, stop_engine, trace_workload

SETUP = EngineSetup(num_kv_blocks=64, max_num_seqs=16, max_num_batched_tokens=512)


class CountingShadow:
    """The listening side: decodes every batch (the ingest does) and counts what arrived."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: Counter[str] = Counter()
        self.dropped_by_engine = 0

    def __call__(self, batch: EventBatch) -> None:
        with self.lock:
            self.events.update(type(e).__name__ for e in batch.events)
            self.dropped_by_engine = batch.dropped

    @property
    def steps(self) -> int:
        with self.lock:
            return self.events[EngineStep.__name__]


@dataclass
class Variant:
    name: str
    scheduler_cls: str | None
    env: dict[str, str]
    engine: object = None
    walls: list[float] = field(default_factory=list)


def _closed_port() -> str:
    with IngestServer(lambda batch: None) as server:
        return server.address  # ours a moment ago, closed once the block exits


def run_engines(rounds: int, requests: int) -> list[Variant]:
    shadow = CountingShadow()
    ingest = IngestServer(shadow).start()
    variants = [
        Variant("stock vLLM Scheduler", None, {}),
        Variant("hook, shadow listening", "vllm_shadow.MirrorScheduler", {"SHADOW_ADDRESS": ingest.address}),
        Variant("hook, nobody listening", "vllm_shadow.MirrorScheduler", {"SHADOW_ADDRESS": _closed_port()}),
    ]
    trace = read_trace(bundled_trace("azure-conv"), limit=requests)
    workload = trace_workload(trace.requests, seconds=0.0)  # all at once: the same batches on every engine
    saved = dict(os.environ)
    try:
        for v in variants:
            os.environ.clear()
            os.environ.update(saved | v.env)
            v.engine = start_engine(dataclasses.replace(SETUP, scheduler_cls=v.scheduler_cls))
        os.environ.clear()
        os.environ.update(saved)
        for v in variants:  # warm-up round, not measured
            drive(v.engine, workload, id_prefix="warm-")
        steps_before = shadow.steps
        for r in range(rounds):
            order = variants[r % 3 :] + variants[: r % 3]
            for v in order:
                start = time.perf_counter()
                drive(v.engine, workload, id_prefix=f"r{r}-")
                v.walls.append(time.perf_counter() - start)
        time.sleep(0.5)  # let the last batches reach the shadow
        steps = (shadow.steps - steps_before) / rounds
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for v in variants:
            if v.engine is not None:
                stop_engine(v.engine)
        ingest.stop()
    stock = statistics.median(variants[0].walls)
    print(
        f"\nworkload: {requests} Azure-conv requests scaled to the tiny model, all submitted at once; "
        f"{steps:.0f} engine steps per run; median of {rounds} rounds, order rotated\n"
    )
    print(f"{'variant':26s} {'median run s':>12s} {'per step ms':>12s} {'vs stock':>9s}   runs (s)")
    for v in variants:
        median = statistics.median(v.walls)
        runs = " ".join(f"{w:.3f}" for w in v.walls)
        print(f"{v.name:26s} {median:12.3f} {median / steps * 1e3:12.3f} {median / stock - 1:+9.2%}   {runs}")
    print(
        f"\nshadow received {dict(shadow.events)}; engine-side drops reported: {shadow.dropped_by_engine}; "
        f"ingest refusals: {ingest.stats.refused_malformed} malformed, "
        f"{ingest.stats.refused_oversized} oversized"
    )
    return variants


def hook_cpu_cost(steps: int = 2000) -> None:
    """Time spent in the hook's own code on the engine's thread, per step, measured directly.

    vLLM's real Scheduler runs in-process (no model; the test supplies one sampled token per request) with the
    hook publishing to a live ingest; every hook entry point is timed. Requests of 16-79 output tokens are
    replaced as they finish, so each step also carries arrivals and finishes. Timing the hook's code rather
    than subtracting two noisy step times keeps the figure meaningful on a busy machine. Measured with prefix
    caching off and on (vLLM's default: 16-token blocks, requests' block hashes computed by vLLM's own hasher,
    prompts sharing a 512-token prefix), where the hook also publishes each request's block hashes and each
    admission's cached tokens.
    """
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_shadow.adapters.vllm import MirrorScheduler

    def measure(batch: int, prefix_caching: bool) -> tuple[float, float]:
        config = SETUP.engine_args().create_engine_config()
        block_size = 16 if prefix_caching else 128
        blocks = 8192 * 128 // block_size
        config.cache_config.num_gpu_blocks = blocks
        config.cache_config.block_size = block_size
        config.cache_config.enable_prefix_caching = prefix_caching
        config.scheduler_config.max_num_seqs = batch
        config.scheduler_config.max_num_batched_tokens = 16384
        spec = FullAttentionSpec(
            block_size=block_size, num_kv_heads=2, head_size=64, dtype=config.model_config.dtype
        )
        kv = KVCacheConfig(
            num_blocks=blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l"], spec)]
        )
        s = MirrorScheduler(
            vllm_config=config,
            kv_cache_config=kv,
            structured_output_manager=StructuredOutputManager(config),
            block_size=block_size,
        )
        hasher = None
        if prefix_caching:  # as EngineCore sets it up
            hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
            init_none_hash(hash_fn)
            hasher = get_request_block_hasher(block_size, hash_fn)
        in_hook = [0.0]

        def timed(fn):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    in_hook[0] += time.perf_counter() - start

            return wrapper

        mirror = s._shadow.mirror
        for name in ("schedule_started", "step_scheduled", "step_completed", "arrival"):
            setattr(mirror, name, timed(getattr(mirror, name)))
        s._report_finished = timed(s._report_finished)
        added = 0

        def top_up() -> None:
            nonlocal added
            while len(s.running) + len(s.waiting) < batch:
                params = SamplingParams(max_tokens=16 + added % 64, ignore_eos=True)
                # A shared 512-token system prompt, then 100 tokens of the request's own.
                prompt = [3] * 512 + [4 + added % 30_000] * 100
                s.add_request(Request(f"q{added}", prompt, params, None, block_hasher=hasher))
                added += 1

        def step() -> None:
            top_up()
            out = s.schedule()
            ids = list(out.num_scheduled_tokens)
            s.update_from_output(
                out, ModelRunnerOutput(ids, {r: i for i, r in enumerate(ids)}, [[7]] * len(ids))
            )

        for _ in range(200):  # reach a steady mix of prefills, decodes and finishes
            step()
        in_hook[0] = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            step()
        total = time.perf_counter() - start
        s.shutdown()
        return in_hook[0] / steps, total / steps

    with IngestServer(CountingShadow()) as ingest:
        os.environ["SHADOW_ADDRESS"] = ingest.address
        try:
            print("\nhook code on the engine thread (vLLM Scheduler in-process, no model, live ingest):")
            for prefix_caching in (False, True):
                for batch in (16, 64, 256):
                    hook, step = measure(batch, prefix_caching)
                    print(
                        f"  prefix caching {'on ' if prefix_caching else 'off'}, batch {batch:4d}: "
                        f"{hook * 1e6:6.1f} us/step in the hook, "
                        f"{step * 1e6:7.1f} us/step scheduler + hook (model excluded)"
                    )
        finally:
            del os.environ["SHADOW_ADDRESS"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--hook-cost-only", action="store_true", help="skip the three-engine comparison")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    if not args.hook_cost_only:
        run_engines(args.rounds, args.requests)
    hook_cpu_cost()
    return 0


if __name__ == "__main__":
    sys.exit(main())
