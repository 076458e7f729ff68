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

from tests.fidelity.fidelity_report import CACHING, FidelityResult, evaluate_prompts, workload
from vllm_shadow.adapters.events import EngineStep, RequestArrival, RequestFinish
from vllm_shadow.adapters.vllm.prefix_workloads import conversations, shared_system_prompts
from vllm_shadow.evaluation.recorded_run import MirroredRun, request_latencies


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


@pytest.mark.integration
def test_requests_sharing_system_prompts_replay_identically(tmp_path: Path) -> None:
    setup = dataclasses.replace(CACHING, num_kv_blocks=10)
    requests = shared_system_prompts(workload(setup, requests=16), max_question_tokens=100)
    check(evaluate_prompts("system-prompts", setup, requests, tmp_path))


@pytest.mark.integration
def test_multi_turn_conversations_replay_identically(tmp_path: Path) -> None:
    # Eight chats on 7 usable blocks: short of KV, yet a turn often finds its previous turn's blocks cached.
    setup = dataclasses.replace(CACHING, num_kv_blocks=8, policy="priority")
    requests = conversations(8, 3, first_message_tokens=(100, 250), output_tokens=(16, 64), priorities=2)
    check(evaluate_prompts("multi-turn", setup, requests, tmp_path))
