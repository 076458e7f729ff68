"""Synthetic workloads: reproducible, with the rates, burstiness and lengths they are asked for."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vllm_shadow.adapters.synthetic import (
    Empirical,
    Fixed,
    Gamma,
    LogNormal,
    Poisson,
    Uniform,
    Zipf,
    generate,
    resample,
)
from vllm_shadow.adapters.traces import Trace, bundled_trace, read_trace


def gaps_of(trace: Trace) -> np.ndarray:
    return np.diff([r.time for r in trace.requests])


def prompts_of(trace: Trace) -> np.ndarray:
    return np.array([r.prompt_tokens for r in trace.requests])


def outputs_of(trace: Trace) -> np.ndarray:
    return np.array([r.output_tokens for r in trace.requests])


@pytest.fixture(scope="module")
def azure_conv() -> Trace:
    return read_trace(bundled_trace("azure-conv"))


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    def make(seed: int) -> Trace:
        return generate(
            200, arrival=Gamma(rate=3, cv=2), prompt=LogNormal(500, 800), output=Uniform(1, 300), seed=seed
        )

    assert make(7).requests == make(7).requests
    assert make(7).requests != make(8).requests


def test_trace_shape_matches_the_readers() -> None:
    trace = generate(5, arrival=Poisson(2.0), prompt=Fixed(10), output=Fixed(3))
    assert trace.format == "synthetic" and trace.source is None
    assert [r.request_id for r in trace.requests] == ["1", "2", "3", "4", "5"]
    assert trace.requests[0].time == 0.0
    assert all(type(r.time) is float and type(r.prompt_tokens) is int for r in trace.requests)
    assert all((r.prompt_tokens, r.output_tokens) == (10, 3) for r in trace.requests)
    assert len(generate(0, arrival=Poisson(1.0), prompt=Fixed(1), output=Fixed(1))) == 0


def test_changing_one_knob_leaves_the_other_draws_unchanged() -> None:
    lengths = {"prompt": LogNormal(1000, 1200), "output": Zipf(1.1, 2000)}
    slow = generate(500, arrival=Poisson(1.0), seed=3, **lengths)
    bursty = generate(500, arrival=Gamma(50.0, 4.0), seed=3, **lengths)
    assert np.array_equal(prompts_of(slow), prompts_of(bursty))
    assert np.array_equal(outputs_of(slow), outputs_of(bursty))
    other_output = generate(500, arrival=Poisson(1.0), prompt=lengths["prompt"], output=Fixed(5), seed=3)
    assert [r.time for r in other_output.requests] == [r.time for r in slow.requests]


@pytest.mark.parametrize("rate", [0.5, 5.0, 200.0])
@pytest.mark.parametrize("make", [Poisson, lambda rate: Gamma(rate, 3.0)])
def test_mean_rate_is_the_requested_rate(rate: float, make) -> None:
    n = 40_000
    trace = generate(n, arrival=make(rate), prompt=Fixed(1), output=Fixed(1), seed=11)
    # With cv = 3 the mean gap of 40k gaps has a relative standard error of 3 / sqrt(40k) = 1.5%.
    assert (n - 1) / trace.span == pytest.approx(rate, rel=0.06)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 4.0])
def test_gamma_gaps_have_the_requested_coefficient_of_variation(cv: float) -> None:
    gaps = gaps_of(generate(100_000, arrival=Gamma(4.0, cv), prompt=Fixed(1), output=Fixed(1), seed=5))
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_poisson_gaps_are_exponential() -> None:
    gaps = gaps_of(generate(100_000, arrival=Poisson(10.0), prompt=Fixed(1), output=Fixed(1), seed=9))
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)
    # P(gap > mean) = 1/e for an exponential
    assert np.mean(gaps > 0.1) == pytest.approx(math.exp(-1), abs=0.01)


def test_bursty_arrivals_pile_up_in_fewer_seconds() -> None:
    def empty_second_share(cv: float) -> float:
        trace = generate(20_000, arrival=Gamma(5.0, cv), prompt=Fixed(1), output=Fixed(1), seed=2)
        per_second = np.bincount(np.array([r.time for r in trace.requests]).astype(int))
        return np.mean(per_second == 0)

    assert empty_second_share(4.0) > 3 * empty_second_share(1.0)


def test_uniform_lengths_cover_both_ends() -> None:
    prompts = prompts_of(generate(20_000, arrival=Poisson(1.0), prompt=Uniform(5, 9), output=Fixed(1)))
    assert set(prompts.tolist()) == {5, 6, 7, 8, 9}
    assert prompts.mean() == pytest.approx(7.0, abs=0.05)


def test_lognormal_has_the_requested_median_and_mean() -> None:
    dist = LogNormal(median=1020, mean=1155)
    prompts = prompts_of(generate(200_000, arrival=Poisson(1.0), prompt=dist, output=Fixed(1), seed=4))
    assert np.median(prompts) == pytest.approx(1020, rel=0.01)
    assert prompts.mean() == pytest.approx(1155, rel=0.01)


def test_lognormal_cap_and_floor() -> None:
    capped = prompts_of(
        generate(10_000, arrival=Poisson(1.0), prompt=LogNormal(3, 300, cap=100), output=Fixed(1), seed=1)
    )
    assert capped.min() == 1 and capped.max() == 100
    assert np.array_equal(LogNormal(50, 50).sample(np.random.default_rng(0), 4), [50, 50, 50, 50])


def test_zipf_is_bounded_and_favours_short_lengths() -> None:
    dist = Zipf(a=1.5, high=1000)
    outputs = outputs_of(generate(50_000, arrival=Poisson(1.0), prompt=Fixed(1), output=dist, seed=8))
    assert outputs.min() >= 1 and outputs.max() <= 1000
    weights = np.arange(1, 1001) ** -1.5
    assert np.mean(outputs == 1) == pytest.approx(weights[0] / weights.sum(), abs=0.01)
    assert np.mean(outputs == 2) < np.mean(outputs == 1)


def test_empirical_resamples_observed_lengths(azure_conv: Trace) -> None:
    dist = Empirical.prompts(azure_conv)
    observed = set(prompts_of(azure_conv).tolist())
    drawn = prompts_of(generate(50_000, arrival=Poisson(1.0), prompt=dist, output=Fixed(1), seed=6))
    assert set(drawn.tolist()) <= observed
    assert drawn.mean() == pytest.approx(prompts_of(azure_conv).mean(), rel=0.02)
    assert "19366 values" in repr(dist)


def test_resample_keeps_prompt_and_output_paired(azure_conv: Trace) -> None:
    pairs = {(r.prompt_tokens, r.output_tokens) for r in azure_conv.requests}
    trace = resample(azure_conv, 5_000, arrival=Poisson(20.0), seed=1)
    assert {(r.prompt_tokens, r.output_tokens) for r in trace.requests} <= pairs
    # Independent marginals would almost surely produce pairs the trace never had.
    independent = generate(
        5_000,
        arrival=Poisson(20.0),
        prompt=Empirical.prompts(azure_conv),
        output=Empirical.outputs(azure_conv),
        seed=1,
    )
    assert not {(r.prompt_tokens, r.output_tokens) for r in independent.requests} <= pairs
    assert (len(trace) - 1) / trace.span == pytest.approx(20.0, rel=0.06)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Poisson(0.0),
        lambda: Poisson(math.inf),
        lambda: Gamma(1.0, 0.0),
        lambda: Gamma(-1.0, 1.0),
        lambda: Fixed(0),
        lambda: Uniform(0, 5),
        lambda: Uniform(6, 5),
        lambda: LogNormal(100, 50),
        lambda: LogNormal(0, 50),
        lambda: LogNormal(10, 50, cap=0),
        lambda: Zipf(0.0, 10),
        lambda: Zipf(1.0, 0),
        lambda: Empirical(()),
        lambda: Empirical((3, 0)),
        lambda: generate(-1, arrival=Poisson(1.0), prompt=Fixed(1), output=Fixed(1)),
        lambda: resample(Trace(None, "synthetic", []), 3, arrival=Poisson(1.0)),
    ],
)
def test_bad_parameters_raise_value_error(make) -> None:
    with pytest.raises(ValueError):
        make()
