"""The simulated vLLM policy reproduces a real vLLM engine step for step (prefix caching off).

Each configuration starts a real engine (CPU build, tiny Llama, KV sized for preemption), drives it with
arrivals from the bundled Azure trace, and compares the mirror's non-empty steps with `solver`'s replay fed in
step space: same requests, same token counts, same preemption victims, in every step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the CPU build of vLLM is installed by `make test`")

from tests.fidelity.fidelity_report import CONFIGS, evaluate

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_simulated_vllm_policy_matches_the_real_engine_step_for_step(name: str, tmp_path: Path) -> None:
    result = evaluate(name, CONFIGS[name], tmp_path)
    run = result.run
    # The engine did the work the replay assumes: every request, its full output, all seen by the mirror.
    assert len(result.produced) == len(run.requests) > 0
    assert {r.request_id.rsplit("-", 1)[0]: r.output_tokens for r in run.finished_requests} == result.produced
    assert result.preemptions > 0, "the configuration is meant to put the KV cache under pressure"
    assert result.comparison.match_ratio == 1.0, result.comparison.describe()
    print(result.row())
