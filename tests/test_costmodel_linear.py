import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_shadow.costmodel.linear import (
    BatchFeatures,
    LinearCostModel,
    OnlineCalibrator,
    batch_features,
    cross_validated_mape,
    fit_linear,
)
from vllm_shadow.costmodel.nnls import nnls

# Roughly Llama-2-7B on an A100: 9 ms a step, 35 us a token, 0.35 us a KV token, 10 ns an attention unit, and
# no per-request cost worth a parameter (the LM head streams its weights once per step, whatever R).
TRUTH = LinearCostModel(a=9e-3, b=3.5e-5, c=3.5e-7, d=1e-8)
# Roughly the tiny Llama on one CPU core (the shipped profile): 3 ms a step, 19 us a token, 0.29 us a KV token,
# 15 ns an attention unit, and 160 us a request, mostly its row of the 32000 x 256 LM head.
CPU_TRUTH = LinearCostModel(a=3e-3, b=1.9e-5, c=2.9e-7, d=1.5e-8, e=1.6e-4)


def _workload(rng: np.random.Generator, steps: int) -> list[tuple[list[int], list[int]]]:
    """Step shapes of a chunked-prefill engine: decode batches, prefill chunks, and mixes of the two."""
    batches = []
    for _ in range(steps):
        decodes = int(rng.integers(0, 128))
        new = [1] * decodes
        ctx = [int(c) for c in rng.integers(16, 4096, size=decodes)]
        if decodes == 0 or rng.random() < 0.3:
            new.append(int(rng.integers(16, 2048)))
            ctx.append(int(rng.choice([0, int(rng.integers(0, 4096))])))
        batches.append((new, ctx))
    return batches


def _samples(
    truth: LinearCostModel, steps: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[list[int], list[int]]]]:
    rng = np.random.default_rng(seed)
    batches = _workload(rng, steps)
    features = np.array([batch_features(new, ctx) for new, ctx in batches], dtype=float)
    times = truth.predict(features) * (1 + noise * rng.standard_normal(steps))
    return features, times, batches


# ---- the model and its features


def test_features_of_a_mixed_batch_worked_by_hand() -> None:
    # two decodes on 100 and 10 cached tokens, a fresh 512-token prompt, and a request with nothing to do:
    # three requests count, the idle one does not
    features = batch_features([1, 1, 512, 0], [100, 10, 0, 77])
    assert features == (514, 101 + 11 + 512, 512 * 512, 3)
    assert features == BatchFeatures(tokens=514, kv_tokens=624, attention_units=262144, requests=3)


def test_features_of_a_prefill_chunk_on_cached_context() -> None:
    assert batch_features([256], [1024]) == (256, 1280, 256 * 1280, 1)


def test_features_of_prompts_batched_together() -> None:
    # four new prompts of 64 tokens: the tokens of one 256-token prompt, but four requests
    assert batch_features([64] * 4, [0] * 4) == (256, 256, 4 * 64 * 64, 4)


def test_decode_tokens_add_no_attention_units_and_one_request_each() -> None:
    assert batch_features([1] * 3, [5, 6, 7]) == (3, 6 + 7 + 8, 0, 3)


def test_an_empty_batch_has_no_features() -> None:
    assert batch_features([], []) == (0, 0, 0, 0)
    assert batch_features([0, 0], [10, 20]) == (0, 0, 0, 0)


def test_batch_time_is_the_linear_formula_and_zero_when_empty() -> None:
    model = LinearCostModel(a=1.0, b=2.0, c=3.0, d=4.0, e=5.0)
    assert model.batch_time([2, 1], [3, 4]) == 1.0 + 2.0 * 3 + 3.0 * (5 + 5) + 4.0 * (2 * 5) + 5.0 * 2
    assert model.batch_time([], []) == 0.0
    assert model.batch_time([0, 0], [10, 20]) == 0.0
    assert model.time_from_features(0, 0, 0, 0) == 0.0


def test_batch_time_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="context lengths"):
        TRUTH.batch_time([1, 1], [10])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 32768)), max_size=40))
def test_vectorised_and_incremental_predictions_match_batch_time(requests: list[tuple[int, int]]) -> None:
    new = [n for n, _ in requests]
    ctx = [c for _, c in requests]
    features = batch_features(new, ctx)
    expected = TRUTH.batch_time(new, ctx)
    assert TRUTH.time_from_features(*features) == expected
    assert TRUTH.predict(np.array([features]))[0] == pytest.approx(expected, rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-3, 4096), st.integers(0, 32768)), max_size=40),
    st.sampled_from([list, tuple]),
)
def test_features_are_the_sums_over_requests_that_compute(
    requests: list[tuple[int, int]], kind: type
) -> None:
    # Whichever way batch_features adds them up (in C when no request is idle), they are these sums.
    computing = [(n, c) for n, c in requests if n != 0]
    expected = (
        sum(n for n, _ in computing),
        sum(c + n for n, c in computing),
        sum(n * (c + n) for n, c in computing if n > 1),
        len(computing),
    )
    assert batch_features(kind(n for n, _ in requests), kind(c for _, c in requests)) == expected
    assert batch_features(np.array([n for n, _ in requests]), np.array([c for _, c in requests])) == expected


def test_negative_or_non_finite_coefficients_are_refused() -> None:
    with pytest.raises(ValueError, match="coefficient c"):
        LinearCostModel(a=1.0, b=1.0, c=-1e-9)
    with pytest.raises(ValueError, match="coefficient a"):
        LinearCostModel(a=math.nan, b=1.0, c=1.0)
    with pytest.raises(ValueError, match="coefficient e"):
        LinearCostModel(a=1.0, b=1.0, c=1.0, e=-1e-6)


def test_predict_takes_four_features_per_row() -> None:
    with pytest.raises(ValueError, match=r"\(n, 4\) array of \(T, K, P, R\)"):
        TRUTH.predict(np.array([[10, 100, 0]]))


def test_dict_round_trip_and_dicts_of_older_models() -> None:
    assert CPU_TRUTH.to_dict() == {"a": 3e-3, "b": 1.9e-5, "c": 2.9e-7, "d": 1.5e-8, "e": 1.6e-4}
    assert LinearCostModel.from_dict(CPU_TRUTH.to_dict()) == CPU_TRUTH
    # written before the model had d, then e: the missing coefficients are 0, the model they were fitted with
    assert LinearCostModel.from_dict({"a": 1, "b": 2, "c": 3}) == LinearCostModel(1.0, 2.0, 3.0, 0.0, 0.0)
    assert LinearCostModel.from_dict({"a": 1, "b": 2, "c": 3, "d": 4}) == LinearCostModel(1.0, 2.0, 3.0, 4.0)
    assert LinearCostModel.from_dict({"a": 1, "b": 2, "c": 3, "e": 5}) == LinearCostModel(1, 2, 3, e=5.0)
    with pytest.raises(ValueError, match="needs keys"):
        LinearCostModel.from_dict({"a": 1, "b": 2})
    with pytest.raises(ValueError, match="needs keys"):
        LinearCostModel.from_dict({"a": 1, "b": 2, "c": 3, "f": 4})


# ---- offline fit


@pytest.mark.parametrize("truth", [TRUTH, CPU_TRUTH], ids=["gpu-like", "cpu-like"])
def test_fit_recovers_known_coefficients_from_noisy_measurements(truth: LinearCostModel) -> None:
    features, times, _ = _samples(truth, 400, noise=0.02, seed=3)
    fitted = fit_linear(features, times)
    for name, true in truth.to_dict().items():
        assert getattr(fitted, name) == pytest.approx(true, rel=0.08, abs=1e-12), name


def test_fit_predicts_unseen_batches_within_the_noise() -> None:
    features, times, _ = _samples(TRUTH, 400, noise=0.02, seed=4)
    test_features, test_times, _ = _samples(TRUTH, 200, noise=0.0, seed=5)
    fitted = fit_linear(features, times)
    errors = np.abs(fitted.predict(test_features) - test_times) / test_times
    assert errors.mean() < 0.01


def test_attention_term_is_kept_when_the_data_has_it() -> None:
    features, times, _ = _samples(TRUTH, 300, noise=0.03, seed=6)
    assert fit_linear(features, times).d > 0


def test_attention_term_is_dropped_when_the_data_lacks_it() -> None:
    no_attention = LinearCostModel(a=TRUTH.a, b=TRUTH.b, c=TRUTH.c, d=0.0)
    for seed in range(5):
        features, times, _ = _samples(no_attention, 300, noise=0.03, seed=10 + seed)
        assert fit_linear(features, times).d == 0.0, seed


def test_request_term_is_kept_when_the_data_has_it() -> None:
    for seed in range(5):
        features, times, _ = _samples(CPU_TRUTH, 300, noise=0.03, seed=20 + seed)
        assert fit_linear(features, times).e == pytest.approx(CPU_TRUTH.e, rel=0.25), seed


def test_request_term_is_dropped_when_the_data_lacks_it() -> None:
    no_request_cost = dataclasses.replace(CPU_TRUTH, e=0.0)
    for seed in range(5):
        features, times, _ = _samples(no_request_cost, 300, noise=0.03, seed=30 + seed)
        fitted = fit_linear(features, times)
        assert fitted.e == 0.0 and fitted.d > 0, seed


def test_request_term_is_dropped_where_requests_cannot_be_told_from_tokens() -> None:
    """On pure decode R = T: the per-request cost is indistinguishable from the per-token one, and the fit
    keeps the simpler form with their sum as the cost per token, rather than an arbitrary split."""
    rng = np.random.default_rng(17)
    shapes = rng.integers(1, 200, size=(80, 2))
    features = np.array([batch_features([1] * n, [int(c)] * n) for n, c in shapes], dtype=float)
    times = CPU_TRUTH.predict(features) * (1 + 0.02 * rng.standard_normal(len(features)))
    fitted = fit_linear(features, times)
    assert fitted.e == 0.0
    assert fitted.b == pytest.approx(CPU_TRUTH.b + CPU_TRUTH.e, rel=0.1)


def test_flags_force_each_term_in_or_out() -> None:
    features, times, _ = _samples(CPU_TRUTH, 200, noise=0.03, seed=18)
    selected = fit_linear(features, times)
    assert selected.d > 0 and selected.e > 0
    assert fit_linear(features, times, with_attention_term=True, with_request_term=True) == selected
    assert fit_linear(features, times, with_attention_term=False).d == 0.0
    assert fit_linear(features, times, with_request_term=False).e == 0.0
    assert cross_validated_mape(features, times) < cross_validated_mape(
        features, times, with_request_term=False
    )


def test_attention_term_cannot_be_identified_from_pure_decode() -> None:
    rng = np.random.default_rng(7)
    features = np.array(
        [batch_features([1] * n, [int(c)] * n) for n, c in rng.integers(1, 200, size=(50, 2))]
    )
    times = TRUTH.predict(features)
    assert fit_linear(features, times, with_attention_term=True).d == 0.0


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), c=st.floats(-1e-6, 1e-6), noise=st.floats(0.0, 0.3))
def test_fitted_coefficients_are_never_negative(seed: int, c: float, noise: float) -> None:
    """Even when the process behind the data runs faster with more context, no coefficient goes negative."""
    rng = np.random.default_rng(seed)
    batches = _workload(rng, 60)
    features = np.array([batch_features(new, ctx) for new, ctx in batches], dtype=float)
    raw = 5e-3 + 4e-5 * features[:, 0] + c * features[:, 1]
    times = np.maximum(raw, 1e-4) * np.exp(noise * rng.standard_normal(len(raw)))
    fitted = fit_linear(features, times)
    assert all(value >= 0 for value in fitted.to_dict().values())


def test_cross_validated_error_reflects_the_noise() -> None:
    clean_features, clean_times, _ = _samples(TRUTH, 200, noise=0.0, seed=8)
    noisy_features, noisy_times, _ = _samples(TRUTH, 200, noise=0.05, seed=8)
    assert cross_validated_mape(clean_features, clean_times) < 1e-6
    # the mean absolute value of N(0, 0.05) is 0.05 * sqrt(2 / pi) = 0.040
    assert cross_validated_mape(noisy_features, noisy_times) == pytest.approx(0.040, rel=0.25)


def test_fit_rejects_unusable_samples() -> None:
    features, times, _ = _samples(TRUTH, 10, noise=0.0, seed=9)
    with pytest.raises(ValueError, match="at least 6 samples"):
        fit_linear(features[:5], times[:5])
    with pytest.raises(ValueError, match="non-empty"):
        fit_linear(np.vstack([features, [0, 0, 0, 0]]), np.append(times, 1.0))
    with pytest.raises(ValueError, match="positive"):
        fit_linear(features, -times)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        fit_linear(features[:, :3], times)
    for requests in (0, 20):  # no request in a batch of tokens; more requests than tokens
        with pytest.raises(ValueError, match="1 <= R <= T"):
            fit_linear(np.vstack([features, [10, 100, 0, requests]]), np.append(times, 1.0))
    with pytest.raises(ValueError, match="training sets"):
        cross_validated_mape(features[:7], times[:7], folds=5)


# ---- online calibration


def _feed(calibrator: OnlineCalibrator, batches, times) -> None:
    for (new, ctx), seconds in zip(batches, times, strict=True):
        calibrator.update(new, ctx, float(seconds))


@pytest.mark.parametrize("truth", [TRUTH, CPU_TRUTH], ids=["gpu-like", "cpu-like"])
def test_calibrator_converges_to_the_truth_and_its_running_error_falls(truth: LinearCostModel) -> None:
    # a prior without d and e, as one from an older profile file: the calibrator learns them
    prior = LinearCostModel(a=truth.a * 2, b=truth.b * 0.5, c=truth.c * 3, d=0.0, e=0.0)
    _, times, batches = _samples(truth, 3000, noise=0.01, seed=11)
    calibrator = OnlineCalibrator(prior)
    _feed(calibrator, batches[:50], times[:50])
    early_error = calibrator.mape()
    _feed(calibrator, batches[50:], times[50:])
    assert calibrator.mape() < early_error / 3
    assert calibrator.mape() < 0.02
    test_features, test_times, _ = _samples(truth, 300, noise=0.0, seed=12)
    errors = np.abs(calibrator.model().predict(test_features) - test_times) / test_times
    assert errors.mean() < 0.01
    assert calibrator.samples == 3000
    # Learned from a prior without it. On the GPU-like truth a request's cost is a few percent of a decode's
    # and e is only loosely determined (to a fraction of b); on the CPU-like one it is a large part of it.
    assert calibrator.model().e == pytest.approx(truth.e, rel=0.1, abs=0.5 * truth.b)


def test_a_few_samples_move_the_model_without_exploding_it() -> None:
    prior = LinearCostModel(*(1.5 * value for value in CPU_TRUTH.to_dict().values()))
    _, times, batches = _samples(CPU_TRUTH, 3, noise=0.05, seed=13)
    calibrator = OnlineCalibrator(prior)
    _feed(calibrator, batches, times)
    test_features, test_times, _ = _samples(CPU_TRUTH, 200, noise=0.0, seed=14)
    ratio = calibrator.model().predict(test_features) / test_times
    # about between the truth and the prior (1.5x), never wildly outside: three steps cannot pin five
    # coefficients, and the prior's predictions, which settle the rest, overshoot by about 10% at most
    assert np.all((ratio > 0.9) & (ratio < 1.7))


@pytest.mark.parametrize("truth", [TRUTH, CPU_TRUTH], ids=["gpu-like", "cpu-like"])
def test_a_long_run_of_decode_keeps_prefill_predictions_sane(truth: LinearCostModel) -> None:
    prior = LinearCostModel(a=5e-3, b=2e-5, c=2e-7, d=7e-9, e=5e-5)
    calibrator = OnlineCalibrator(prior)
    rng = np.random.default_rng(15)
    for size, ctx in rng.integers(1, 200, size=(2000, 2)):  # pure decode: P = 0 and R = T on every step
        new, context = [1] * int(size), [int(ctx) * 10] * int(size)
        calibrator.update(new, context, truth.batch_time(new, context))
    model = calibrator.model()
    assert model.batch_time([1] * 64, [1000] * 64) == pytest.approx(
        truth.batch_time([1] * 64, [1000] * 64), rel=0.01
    )
    # Prefills were never measured, and pure decode determines neither d nor how a decode's cost splits
    # between b and e: the prior's predictions decide both. They stay about between what the prior and the
    # truth say; the split costs up to 16% below the prior here, where it shifts per-token cost into e to
    # offset the intercept that the data raised on short prefills (see OnlineCalibrator).
    for new, ctx in (([256], [0]), ([2048], [0]), ([1024], [2048]), ([128] * 8, [0] * 8)):
        bounds = sorted((prior.batch_time(new, ctx), truth.batch_time(new, ctx)))
        assert 0.8 * bounds[0] <= model.batch_time(new, ctx) <= 1.1 * bounds[1]


def test_calibrator_stays_non_negative_on_data_that_pulls_a_coefficient_below_zero() -> None:
    calibrator = OnlineCalibrator(TRUTH)
    rng = np.random.default_rng(16)
    for _ in range(500):
        size, ctx = int(rng.integers(1, 64)), int(rng.integers(1, 4000))
        seconds = max(2e-2 - 2e-9 * size * ctx, 1e-3)  # more KV, less time: c would want to be negative
        calibrator.update([1] * size, [ctx] * size, seconds)
        assert all(value >= 0 for value in calibrator.model().to_dict().values())


def test_calibrator_validates_its_inputs() -> None:
    calibrator = OnlineCalibrator(TRUTH)
    assert math.isnan(calibrator.mape())
    assert calibrator.model() == TRUTH
    with pytest.raises(ValueError, match="empty batch"):
        calibrator.update([0], [10], 0.01)
    with pytest.raises(ValueError, match="positive"):
        calibrator.update([1], [10], 0.0)
    with pytest.raises(ValueError, match="forgetting"):
        OnlineCalibrator(TRUTH, forgetting=1.5)
    with pytest.raises(ValueError, match="prior_weight"):
        OnlineCalibrator(TRUTH, prior_weight=0.0)
    with pytest.raises(ValueError, match="positive times"):
        OnlineCalibrator(LinearCostModel(0.0, 0.0, 0.0))


class _NumpyCalibrator:
    """The calibrator as it was written with numpy arrays (before its state became plain floats): the
    reference the Python version must reproduce. `constrained_solves` counts the refits that needed NNLS."""

    def __init__(self, prior: LinearCostModel, forgetting: float = 0.999, prior_weight: float = 1.0) -> None:
        from vllm_shadow.costmodel.linear import _REFERENCE_BATCHES

        self.prior = np.array([getattr(prior, name) for name in "abcde"])
        reference = np.array([(1.0, *batch_features(n, c)) for n, c in _REFERENCE_BATCHES], dtype=float)
        weighted = reference / (reference @ self.prior)[:, None]
        self.prior_information = prior_weight * weighted.T @ weighted / len(reference)
        self.forgetting = forgetting
        self.information = np.zeros((5, 5))
        self.moment = np.zeros(5)
        self.effective_samples = 0.0
        self.coefficients = self.prior.copy()
        self.error_sum = 0.0
        self.constrained_solves = 0

    def update(self, new_tokens: list[int], context_tokens: list[int], seconds: float) -> None:
        x = np.array([1.0, *batch_features(new_tokens, context_tokens)], dtype=float)
        lam = self.forgetting
        self.error_sum = lam * self.error_sum + abs(self.coefficients @ x - seconds) / seconds
        weight = 1.0 / seconds**2
        self.information = lam * self.information + weight * np.outer(x, x)
        self.moment = lam * self.moment + weight * seconds * x
        self.effective_samples = lam * self.effective_samples + 1.0
        system = self.information + self.prior_information
        rhs = self.moment + self.prior_information @ self.prior
        scale = np.sqrt(np.diag(system))
        scaled_system = system / np.outer(scale, scale)
        scaled_rhs = rhs / scale
        solution = np.linalg.solve(scaled_system, scaled_rhs)
        if np.all(solution >= 0):
            self.coefficients = solution / scale
            return
        self.constrained_solves += 1
        lower = np.linalg.cholesky(scaled_system)
        self.coefficients = nnls(lower.T, np.linalg.solve(lower, scaled_rhs)) / scale


def _assert_same_calibration(calibrator: OnlineCalibrator, reference: _NumpyCalibrator) -> None:
    got = np.array(list(calibrator.model().to_dict().values()))
    # A coefficient NNLS holds at zero may come out at a rounding error above it on one side: compare each
    # relative to the largest contribution any coefficient makes to a typical step (a 1000-KV-token batch).
    typical = np.array([1.0, 64.0, 64_000.0, 1e6, 64.0])
    tolerance = 1e-9 * np.max(np.abs(reference.coefficients) * typical) / typical
    assert np.all(np.abs(got - reference.coefficients) <= 1e-9 * np.abs(reference.coefficients) + tolerance)
    assert calibrator.mape() == pytest.approx(reference.error_sum / reference.effective_samples, rel=1e-9)


_STEP = st.tuples(
    st.lists(st.tuples(st.integers(1, 2048), st.integers(0, 8192)), min_size=1, max_size=40),
    st.floats(1e-4, 1.0),
)


@settings(max_examples=60, deadline=None)
@given(
    prior=st.sampled_from([TRUTH, CPU_TRUTH, LinearCostModel(5e-3, 2e-5, 2e-7)]),
    forgetting=st.sampled_from([1.0, 0.999, 0.9]),
    steps=st.lists(_STEP, max_size=60),
)
def test_calibrator_equals_its_numpy_reference_on_random_steps(
    prior: LinearCostModel, forgetting: float, steps: list
) -> None:
    # Times drawn independently of the batches pull coefficients below zero often (the NNLS path).
    calibrator = OnlineCalibrator(prior, forgetting=forgetting)
    reference = _NumpyCalibrator(prior, forgetting=forgetting)
    assert calibrator.model() == prior  # the prior-only start
    for requests, seconds in steps:
        new, ctx = [n for n, _ in requests], [c for _, c in requests]
        calibrator.update(new, ctx, seconds)
        reference.update(new, ctx, seconds)
        _assert_same_calibration(calibrator, reference)


@pytest.mark.parametrize("seed", [21, 22])
def test_calibrator_equals_its_numpy_reference_on_a_long_run_through_negative_coefficients(seed: int) -> None:
    truth = CPU_TRUTH
    _, times, batches = _samples(truth, 1500, noise=0.02, seed=seed)
    rng = np.random.default_rng(seed)
    calibrator = OnlineCalibrator(TRUTH)
    reference = _NumpyCalibrator(TRUTH)
    for step, ((new, ctx), seconds) in enumerate(zip(batches, times, strict=True)):
        if 500 <= step < 800:  # more KV, less time: c wants to be negative, and NNLS holds it at zero
            seconds = max(2e-2 - 2e-9 * sum(ctx), 1e-3) * (1 + 0.02 * rng.standard_normal())
        calibrator.update(new, ctx, float(seconds))
        reference.update(new, ctx, float(seconds))
        _assert_same_calibration(calibrator, reference)
    assert reference.constrained_solves > 10  # the test did exercise the constrained refit
