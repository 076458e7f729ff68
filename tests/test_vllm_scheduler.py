"""The mirror hooks on vLLM's real Scheduler and AsyncScheduler, driven in-process as EngineCore drives them.

The CPU platform forces async scheduling off, so no CPU engine can run the AsyncScheduler that GPU engines use
by default. Here both scheduler classes run for real inside the test, in the call order of EngineCore's
`step` (sync) and `step_with_batch_queue` (async: step N+1 is scheduled before step N's output is
processed); the test supplies the sampled token ids a model would return. The stream must reproduce exactly
what the scheduler decided, with arrivals placed so that their arrival step can be recovered.
"""

from __future__ import annotations

import itertools
from collections import deque
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the CPU build of vLLM is installed by `make test`")

from vllm import SamplingParams
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request

from vllm_shadow.adapters.events import EngineInfo, EngineStep, RequestArrival, RequestFinish
from vllm_shadow.adapters.recorder import read_events
from vllm_shadow.adapters.vllm import MirrorAsyncScheduler, MirrorScheduler
from vllm_shadow.adapters.vllm.engine_run import EngineSetup
from vllm_shadow.evaluation.recorded_run import MirroredRun

NUM_BLOCKS = 10


def _scheduler(cls: type, setup: EngineSetup):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    config = setup.engine_args().create_engine_config()
    config.cache_config.num_gpu_blocks = NUM_BLOCKS
    config.scheduler_config.async_scheduling = cls is MirrorAsyncScheduler
    block_size = config.cache_config.block_size
    spec = FullAttentionSpec(
        block_size=block_size, num_kv_heads=2, head_size=64, dtype=config.model_config.dtype
    )
    kv = KVCacheConfig(
        num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l"], spec)]
    )
    return cls(
        vllm_config=config,
        kv_cache_config=kv,
        structured_output_manager=StructuredOutputManager(config),
        block_size=block_size,
    )


def _model_output(scheduled, sampling: set[str]) -> ModelRunnerOutput:
    # As a model runner does: one token per request whose prompt is complete, none for a partial prefill.
    ids = list(scheduled.num_scheduled_tokens)
    return ModelRunnerOutput(
        req_ids=ids,
        req_id_to_index={r: i for i, r in enumerate(ids)},
        sampled_token_ids=[[7] if r in sampling else [] for r in ids],
    )


def _drive(scheduler, arrivals: dict[int, list[Request]], batch_queue: int):
    """EngineCore's loop: `step` when batch_queue == 1, `step_with_batch_queue` when 2. Returns what the
    scheduler decided (non-empty steps) and, per request, the non-empty steps scheduled before it arrived."""
    decided: list[dict[str, int]] = []
    expected_arrival: dict[str, int] = {}
    in_flight: deque = deque()
    for iteration in itertools.count():
        for request in arrivals.get(iteration, []):
            expected_arrival[request.request_id] = len(decided)
            scheduler.add_request(request)
        if iteration > max(arrivals) and not scheduler.has_requests() and not in_flight:
            return decided, expected_arrival
        if scheduler.has_requests():
            output = scheduler.schedule()
            if output.total_num_scheduled_tokens:
                decided.append(dict(output.num_scheduled_tokens))
            sampling = {r for r in output.num_scheduled_tokens if not scheduler.requests[r].is_prefill_chunk}
            in_flight.appendleft((output, sampling))
            if len(in_flight) < batch_queue and (
                output.total_num_scheduled_tokens or scheduler.has_requests()
            ):
                continue
        if in_flight:
            done, sampling = in_flight.pop()
            scheduler.update_from_output(done, _model_output(done, sampling))


def _requests(first: int, count: int) -> list[Request]:
    # Prompts end just short of a block boundary, so decoding soon needs a new block each.
    return [
        Request(
            f"q{i}-{i:08x}",
            [3] * (123 + 128 * (i % 2)),
            SamplingParams(max_tokens=20 + 3 * i, ignore_eos=True),
            None,
        )
        for i in range(first, first + count)
    ]


@pytest.mark.parametrize(("cls", "batch_queue"), [(MirrorScheduler, 1), (MirrorAsyncScheduler, 2)])
def test_stream_reproduces_the_scheduler_s_decisions(
    cls: type, batch_queue: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.jsonl"
    monkeypatch.setenv("SHADOW_RECORD", str(path))
    scheduler = _scheduler(
        cls, EngineSetup(num_kv_blocks=NUM_BLOCKS, max_num_seqs=4, max_num_batched_tokens=128)
    )
    # Arrivals in bursts, some while steps are in flight, enough to run the KV cache out (preemptions).
    arrivals = {0: _requests(0, 3), 2: _requests(3, 2), 5: _requests(5, 3), 9: _requests(8, 2)}
    decided, expected_arrival = _drive(scheduler, arrivals, batch_queue)
    scheduler.shutdown()

    events = list(read_events(path))
    run = MirroredRun.from_events(events)
    info = next(e for e in events if isinstance(e, EngineInfo))
    assert info.num_kv_blocks == NUM_BLOCKS and info.scheduler.async_scheduling == (batch_queue == 2)
    assert [s.scheduled_tokens for s in run.steps] == decided
    assert run.arrival_steps == expected_arrival
    assert {r.request_id: r.output_tokens for r in run.finished_requests} == {
        r.request_id: r.max_tokens for reqs in arrivals.values() for r in reqs
    }
    assert any(s.preempted for s in run.steps), "the KV cache was meant to run out"

    steps = [e for e in events if isinstance(e, EngineStep)]
    finishes = [e for e in events if isinstance(e, RequestFinish)]
    assert sorted(r for s in steps for r in s.finished) == sorted(f.request_id for f in finishes)
    # Step intervals never overlap: with a batch queue, measuring from schedule() would count a step twice.
    overlaps = [(a.start_time + a.duration - b.start_time) for a, b in itertools.pairwise(steps)]
    assert max(overlaps) < 1e-6, max(overlaps)  # 1e-6: the float resolution of wall-clock seconds


def test_without_destinations_the_hook_is_inert(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SHADOW_ADDRESS", "SHADOW_RECORD", "SHADOW_RAY_ACTOR"):
        monkeypatch.delenv(name, raising=False)
    scheduler = _scheduler(MirrorScheduler, EngineSetup(num_kv_blocks=NUM_BLOCKS))
    assert scheduler._shadow is None
    decided, _ = _drive(scheduler, {0: _requests(0, 2)}, batch_queue=1)
    assert decided and not scheduler.has_requests()


def test_a_failing_mirror_never_raises_into_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHADOW_RECORD", str(tmp_path / "run.jsonl"))
    scheduler = _scheduler(MirrorScheduler, EngineSetup(num_kv_blocks=NUM_BLOCKS))
    hook = scheduler._shadow

    def broken(*args: object) -> None:
        raise RuntimeError("mirror bug")

    monkeypatch.setattr(hook.mirror, "step_scheduled", broken)
    monkeypatch.setattr(hook.mirror, "finished", broken)
    decided, _ = _drive(scheduler, {0: _requests(0, 3)}, batch_queue=1)
    assert sum(decided[-1].values()) > 0 and not scheduler.has_requests()  # the engine ran to the end
    assert hook.errors >= len(decided)  # every failure was counted, none escaped
    scheduler.shutdown()


def test_the_hook_publishes_vllm_s_block_hashes() -> None:
    # With prefix caching on, each arrival carries vLLM's own hashes of its full prompt blocks (16 tokens):
    # equal prefixes, equal hashes; the simulator's prefix cache keys on them.
    from benchmarks.fidelity_scale import ScaleConfig, build_scheduler

    scheduler, publisher, hasher = build_scheduler(
        ScaleConfig("azure-conv", 64, 8, 256, enable_prefix_caching=True)
    )
    prompts = {"a": [5] * 40, "b": [5] * 40 + [6] * 8, "c": [7] * 40}
    for request_id, prompt in prompts.items():
        scheduler.add_request(
            Request(request_id, prompt, SamplingParams(max_tokens=2), None, block_hasher=hasher)
        )
    arrivals = {e.request_id: e.block_hashes for e in publisher.events if isinstance(e, RequestArrival)}
    assert [len(arrivals[r]) for r in "abc"] == [2, 3, 2]
    assert arrivals["b"][:2] == arrivals["a"] and arrivals["c"][0] != arrivals["a"][0]
    assert all(isinstance(h, int) and -(2**63) <= h < 2**63 for h in arrivals["b"])
    scheduler.shutdown()
