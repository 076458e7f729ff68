"""The engine tracker's walk of a step (`_schedule`) against the recompute tax's definition from lists.

The walk sums the step's features (T, K, P, R) and those of the step without its recomputation as it goes, and
the tracker prices the tax from them (`recompute_tax`). Held here, in the compiled tracker and the plain one, to
what the lists give: `batch_features` of the step, `without_recompute` and `step_recompute_tax`.
"""

from __future__ import annotations

from collections import OrderedDict
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_compiled_tracker import trackers
from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.costmodel.linear import LinearCostModel, batch_features
from vllm_shadow.solver.simulator import without_recompute
from vllm_shadow.tracking.recompute import recompute_tax, recomputed_tokens, step_recompute_tax

COST = LinearCostModel(a=1e-3, b=1e-5, c=1e-7, d=1e-9, e=2e-5)

# (prompt, KV held before the step, KV a preemption dropped, new tokens) of each running request
requests = st.lists(
    st.tuples(st.integers(1, 4000), st.integers(0, 4000), st.integers(0, 4000), st.integers(0, 600)),
    min_size=1,
    max_size=40,
)


@pytest.fixture(scope="module")
def modules() -> tuple[ModuleType, ModuleType]:
    return trackers()


@settings(max_examples=300, deadline=None)
@given(batch=requests, preemptions=st.integers(0, 3))
def test_the_walk_s_features_price_the_tax_as_the_lists_do(
    modules: tuple[ModuleType, ModuleType], batch: list[tuple[int, int, int, int]], preemptions: int
) -> None:
    new = [n for *_, n in batch]
    context = [computed for _, computed, _, _ in batch]
    recomputed = [recomputed_tokens(computed, n, dropped) for _, computed, dropped, n in batch]
    expected = step_recompute_tax(COST, new, context, recomputed, preemptions)
    for module in modules:
        walked = []
        for index, (prompt, computed, dropped, _) in enumerate(batch):
            request = module._Request(RequestArrival(f"r{index}", 0.0, prompt), 0, 0.0)
            request.running, request.computed, request.dropped_kv = True, computed, dropped
            walked.append(request)
        total, _, features, without = module._schedule(walked, new, {}, OrderedDict(), {}, 0, False, 0, 1.0)
        assert total == sum(recomputed)
        assert features == batch_features(new, context)
        assert without == batch_features(*without_recompute(new, context, recomputed))
        assert repr(recompute_tax(COST, features, without, total, preemptions)) == repr(expected)
        assert [r.computed for r in walked] == [c + n for c, n in zip(context, new, strict=True)]
