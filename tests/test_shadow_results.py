"""Latency quantiles as numpy computes them, without numpy; and a `shadow status` that loads no solver."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from vllm_shadow.evaluation.results import LatencySummary, Slo
from vllm_shadow.solver.records import RequestRecord, quantiles


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6) | st.just(math.nan), max_size=300))
def test_quantiles_are_numpys_linear_percentiles_ignoring_nan(values: list[float]) -> None:
    finite = [v for v in values if not math.isnan(v)]
    got = quantiles(values)
    if not finite:
        assert all(math.isnan(q) for q in got)
        return
    expected = np.percentile(finite, [50, 90, 99])
    assert np.allclose(got, expected, rtol=1e-12, atol=1e-9)


def test_shadow_status_loads_neither_the_solver_nor_ray() -> None:
    # `shadow status` must answer within two seconds even on a loaded machine: it reads a snapshot and prints
    # a table, and importing OR-Tools (with pandas) or Ray for that would cost most of the budget.
    code = (
        "import sys\n"
        "from vllm_shadow.cli.main import build_parser\n"
        "build_parser(only='status')\n"
        "heavy = sorted(m for m in ('ortools', 'ray', 'pandas', 'vllm_shadow.solver.cpsat',"
        " 'vllm_shadow.runtime.core') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


@st.composite
def records(draw: st.DrawFn) -> RequestRecord:
    if draw(st.booleans()):
        arrival = draw(st.floats(0, 10))
        first = draw(st.just(math.nan) | st.floats(arrival, arrival + 5))
        finish = draw(st.just(math.nan) | st.floats(arrival, arrival + 20))
    else:  # times in whole seconds, as a hand-written recorded run may give them
        arrival = draw(st.integers(0, 10))
        first = draw(st.just(math.nan) | st.integers(arrival, arrival + 5))
        finish = draw(st.just(math.nan) | st.integers(arrival, arrival + 20))
    return RequestRecord("r", arrival, 4, draw(st.integers(1, 6)), first_token=first, finish=finish)


@given(
    st.lists(records(), max_size=40),
    st.sampled_from([Slo(), Slo(ttft_seconds=1.0), Slo(tpot_seconds=0.5), Slo(1.0, 0.5)]),
)
def test_a_summary_of_records_in_one_walk_is_the_summary_of_their_latencies(
    recs: list[RequestRecord], slo: Slo
) -> None:
    """Each candidate of a window is summarised in one walk over its records; the same figures as `of` over
    the records' own properties, nan TTFTs and finishes, one-token outputs and no requests included."""
    expected = LatencySummary.of([r.ttft for r in recs], [r.tpot for r in recs], [r.e2e for r in recs], slo)
    assert repr(LatencySummary.of_records(recs, slo)) == repr(expected)
