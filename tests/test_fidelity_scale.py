"""The simulator against vLLM's own Scheduler and AsyncScheduler at GPU settings, in-process: a fast subset of
benchmarks/fidelity_scale.py (16-token blocks, thousands of blocks, hundreds of sequences, real traces squeezed
until KV runs short). Every step must be identical: membership, tokens per request, victims, cache hits."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the CPU build of vLLM is installed by `make test`")

from benchmarks.fidelity_scale import ScaleConfig, compare

pytestmark = pytest.mark.integration

CONFIGS = [
    ScaleConfig("azure-conv", 2000, 128, 2048, long_prefill_token_threshold=512, requests_per_step=0.3, limit=250),
    ScaleConfig(
        "azure-code", 2500, 256, 4096, policy="priority", enable_prefix_caching=True, requests_per_step=0.8, limit=300
    ),
    ScaleConfig("shared-prompt", 1500, 128, 4096, enable_prefix_caching=True, requests_per_step=0.5, limit=200),
    ScaleConfig(
        "mooncake-conv", 4000, 128, 8192, enable_chunked_prefill=False, enable_prefix_caching=True,
        requests_per_step=0.3, limit=150,
    ),
    # Turns sending back the engine's replies hit the blocks those filled, cached at the finish; under async
    # scheduling a victim's last block has no hash yet, a finished request's has.
    ScaleConfig(
        "chat", 1500, 128, 4096, enable_prefix_caching=True, async_scheduling=True, requests_per_step=0.3, limit=240
    ),
]  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_every_step_is_identical_to_vllm_s_scheduler(config: ScaleConfig) -> None:
    result = compare(config)
    assert result.steps_compared > 500
    assert result.preemptions > 0, "the arrivals were meant to run the KV cache short"
    if config.enable_prefix_caching:
        assert result.hit_tokens > 0, "the workload was meant to share prefixes"
    assert result.first_divergence is None
    assert result.steps_identical == result.steps_compared
