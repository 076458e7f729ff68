"""With vLLM's default prefix caching ON, the simulated vLLM policy reproduces a real engine step for step.

Real CPU engines (tiny Llama, block size 128, KV short enough to preempt) run prompts that really share
prefixes, as token ids: requests after a few shared system prompts, and multi-turn conversations whose every
turn extends the previous one's prompt. The mirror's steps are replayed in step space and compared: batch
membership, tokens per request, preemption victims, and the prefix-cache hit of every admitted or resumed
request. The full table (Mooncake prefixes, priority, chunked prefill off, the OpenAI-compatible server) is
`python -m tests.fidelity.fidelity_report --prefix`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the CPU build of vLLM is installed by `make test`")

from tests.fidelity.fidelity_report import (
    CACHING,
    FidelityResult,
    compare_with_cache_hits,
    evaluate_prompts,
    workload,
)
from vllm_shadow.adapters.events import (
    EngineInfo,
    EngineStep,
    RequestArrival,
    RequestFinish,
    SchedulerSettings,
)
from vllm_shadow.adapters.vllm.prefix_workloads import conversations, shared_system_prompts
from vllm_shadow.evaluation.recorded_run import MirroredRun, replay_in_step_space, request_latencies


def check(result: FidelityResult) -> None:
    run = result.run
    # The engine did the work the replay assumes: every request, its full output, all seen by the mirror.
    assert len(result.produced) == len(run.requests) > 0
    assert {r.request_id.rsplit("-", 1)[0]: r.output_tokens for r in run.finished_requests} == result.produced
    # Not vacuous: vLLM's prefix cache really hit, and KV ran short.
    assert result.cached_tokens > 0, "the engine reported no prefix-cache hit"
    assert result.preemptions > 0, "the configuration is meant to put the KV cache under pressure"
    assert result.comparison.match_ratio == 1.0, result.comparison.describe()
    assert result.simulated_cached_tokens == result.cached_tokens
    print(result.row())


def test_a_request_admitted_with_a_cache_hit_gets_its_first_token_when_the_rest_of_its_prompt_is_done() -> (
    None
):
    # The engine computes only what its prefix cache did not hold: 44 of 300 prompt tokens, then decodes.
    # (request_latencies used to wait for all 300 to be scheduled, and dropped every such request.)
    run = MirroredRun.from_events(
        [
            RequestArrival("a", 0.0, 300, 2),
            EngineStep(0, 1.0, 0.5, {"a": 44}, cached_tokens={"a": 256}),
            EngineStep(1, 2.0, 0.5, {"a": 1}, finished=("a",)),
            RequestFinish("a", 2.5, 2),
        ]
    )
    latency = request_latencies(run)["a"]
    assert (latency.ttft, latency.e2e) == (1.5, 2.5)


def test_a_turn_holding_the_previous_turn_s_output_hits_the_blocks_that_output_filled() -> None:
    # vLLM hashes the blocks a request's generated tokens fill and keeps them cached after it finishes; a chat's
    # next turn sends that output back, so its prompt hits them. The hook publishes their hashes with the
    # finish; without them the replay missed those blocks (found on a real engine: 7,296 hit tokens, replay
    # 6,144, first divergence where a turn computed 99 tokens and the replay 227).
    info = EngineInfo(
        "tiny", 128, 16, SchedulerSettings(enable_prefix_caching=True, max_num_batched_tokens=512)
    )
    a_steps = [EngineStep(0, 0.0, 0.1, {"a": 200})] + [
        EngineStep(i, i * 0.1, 0.1, {"a": 1}) for i in range(1, 100)
    ]
    events = [
        info,
        RequestArrival("a", 0.0, 200, block_hashes=(11,)),  # its prompt fills one block
        *a_steps,  # 200 prompt tokens, then 99 of its 100 output tokens computed: 299 tokens, 2 full blocks
        RequestFinish("a", 10.0, 100, block_hashes=(12,)),  # the block its output completed
        # The next turn: a's prompt and output (300 tokens), then 100 new ones; its 3 full blocks.
        RequestArrival("b", 10.1, 400, block_hashes=(11, 12, 13)),
        EngineStep(100, 10.2, 0.1, {"b": 144}, cached_tokens={"b": 256}),
        *(EngineStep(i, i * 0.1, 0.1, {"b": 1}) for i in range(101, 104)),
        RequestFinish("b", 10.5, 4),
    ]
    run = MirroredRun.from_events(events)
    assert run.requests[0].block_hashes == (11, 12)
    replay = replay_in_step_space(run).steps or []
    assert compare_with_cache_hits(run.steps, replay).match_ratio == 1.0
    assert replay[100].cached_tokens == {"b": 256}
    # The same stream without the finish's hashes: the replay finds a's prompt block only.
    without = [dataclasses.replace(e, block_hashes=()) if isinstance(e, RequestFinish) else e for e in events]
    replay_without = replay_in_step_space(MirroredRun.from_events(without)).steps or []
    assert replay_without[100].cached_tokens == {"b": 128}


@pytest.mark.integration
def test_requests_sharing_system_prompts_replay_identically(tmp_path: Path) -> None:
    setup = dataclasses.replace(CACHING, num_kv_blocks=10)
    requests = shared_system_prompts(workload(setup, requests=12), max_question_tokens=100)
    check(evaluate_prompts("system-prompts", setup, requests, tmp_path))


@pytest.mark.integration
def test_multi_turn_conversations_replay_identically(tmp_path: Path) -> None:
    # Eight chats on 7 usable blocks: short of KV, yet a turn often finds its previous turn's blocks cached.
    # Each turn sends back what the engine generated, as a chat client does.
    setup = dataclasses.replace(CACHING, num_kv_blocks=8, policy="priority")
    requests = conversations(
        8, 3, first_message_tokens=(100, 250), output_tokens=(16, 64), priorities=2, engine_replies=True
    )
    check(evaluate_prompts("multi-turn", setup, requests, tmp_path))
