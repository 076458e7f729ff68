"""INFERMAX's linear batch-time model: its form, its offline fit, and its online calibration.

time = a + b*T + c*K + d*P for a non-empty batch, where over the requests in the batch
  T = sum of new tokens (what the matmuls process),
  K = sum of context_after = ctx_before + new (the KV entries attention reads),
  P = sum over requests with new > 1 of new * (ctx_before + new) (the quadratic query-by-key work of prefill
      chunks; a decode token's attention is already counted by K).

Fits minimise RELATIVE squared error: step times span three orders of magnitude (a decode step of a few ms, a
long prefill of hundreds), the steps that matter most in number are the short ones, and the simulator's
fidelity is judged in relative terms. Plain least squares would let a few long prefills set every coefficient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from costmodel.nnls import nnls

COEFFICIENTS = ("a", "b", "c", "d")
_MIN_SAMPLES = 5  # one more than the most coefficients, so a fit always has a residual to judge it by
# Step shapes the prior speaks for: decode batches small and large on short and long contexts, prefills from
# scratch and on cached context, and a chunked-prefill mix. All four features vary independently across them.
_REFERENCE_BATCHES = [
    *(([1] * size, [ctx] * size) for size in (1, 16, 128) for ctx in (256, 4096)),
    *(([chunk], [ctx]) for chunk in (128, 2048) for ctx in (0, 4096)),
    ([512] + [1] * 32, [0] + [1024] * 32),
]


@dataclass(frozen=True, slots=True)
class LinearCostModel:
    """INFERMAX's batch-time model: time = a + b*T + c*K + d*P for a non-empty batch (0 for an empty one)."""

    a: float  # seconds per non-empty batch (weights read, launch overheads)
    b: float  # seconds per token processed in the batch (T = sum of new tokens)
    c: float  # seconds per KV token attended (K = sum over requests of context_after = ctx_before + new)
    d: float = 0.0  # seconds per unit of multi-token attention: P = sum over new > 1 of new * (ctx + new)

    def __post_init__(self) -> None:
        for name in COEFFICIENTS:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                # A negative coefficient makes some batch take negative time and breaks every schedule cost.
                raise ValueError(f"coefficient {name} must be finite and non-negative, got {value}")

    def batch_time(self, new_tokens: Sequence[int], context_tokens: Sequence[int]) -> float:
        """Seconds for one step; `context_tokens[i]` is what request i already holds in KV before the step."""
        t, k, p = batch_features(new_tokens, context_tokens)
        return self.time_from_features(t, k, p)

    def time_from_features(self, total_tokens: int, kv_tokens: int, attention_units: int) -> float:
        """The same time from features a caller maintains incrementally (a simulator's hot loop)."""
        if total_tokens == 0:
            return 0.0
        return self.a + self.b * total_tokens + self.c * kv_tokens + self.d * attention_units

    def predict(self, features: ArrayLike) -> np.ndarray:
        """Vectorised batch times for an (n, 3) array of (T, K, P) rows."""
        x = _feature_matrix(features)
        times = self.a + x @ np.array([self.b, self.c, self.d])
        return np.where(x[:, 0] > 0, times, 0.0)

    def to_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in COEFFICIENTS}

    @classmethod
    def from_dict(cls, data: Mapping[str, float]) -> LinearCostModel:
        unknown = set(data) - set(COEFFICIENTS)
        if unknown or not {"a", "b", "c"} <= set(data):
            raise ValueError(f"a linear cost model needs keys a, b, c (and optionally d), got {sorted(data)}")
        return cls(**{name: float(value) for name, value in data.items()})


def batch_features(new_tokens: Sequence[int], context_tokens: Sequence[int]) -> tuple[int, int, int]:
    """(T, K, P) of a batch: see the module docstring. Requests with 0 new tokens contribute nothing."""
    if len(new_tokens) != len(context_tokens):
        raise ValueError(f"{len(new_tokens)} new-token counts but {len(context_tokens)} context lengths")
    total = kv = attention = 0
    for new, ctx in zip(new_tokens, context_tokens, strict=True):
        if new == 0:
            continue
        after = ctx + new
        total += new
        kv += after
        if new > 1:
            attention += new * after
    return total, kv, attention


def fit_linear(
    features: ArrayLike, times: ArrayLike, *, with_attention_term: bool | None = None
) -> LinearCostModel:
    """Non-negative relative least-squares fit of (a, b, c[, d]) to measured batch times.

    `with_attention_term=None` keeps d only if it lowers the Bayesian information criterion: the P feature is
    strongly correlated with T and K on most workloads, and an unneeded d soaks up noise and extrapolates
    badly to context lengths the data did not cover.
    """
    x, y = _validated_samples(features, times)
    if with_attention_term is not None:
        return _fit(x, y, with_attention_term)[0]
    without, rss_without = _fit(x, y, False)
    with_d, rss_with = _fit(x, y, True)
    n = len(y)
    if _bic(rss_with, n, 4) < _bic(rss_without, n, 3):
        return with_d
    return without


def cross_validated_mape(
    features: ArrayLike,
    times: ArrayLike,
    *,
    with_attention_term: bool | None = None,
    folds: int = 5,
    seed: int = 0,
) -> float:
    """Mean absolute percentage error of `fit_linear` on held-out samples (k-fold): the error to expect on
    batches the fit has not seen, which is what a profile reports."""
    x, y = _validated_samples(features, times)
    smallest_training_set = len(y) - math.ceil(len(y) / folds)
    if folds < 2 or smallest_training_set < _MIN_SAMPLES:
        raise ValueError(
            f"{folds}-fold validation of {len(y)} samples leaves training sets under {_MIN_SAMPLES} samples"
        )
    order = np.random.default_rng(seed).permutation(len(y))
    errors = np.empty(len(y))
    for held_out in np.array_split(order, folds):
        train = np.setdiff1d(order, held_out)
        model = fit_linear(x[train], y[train], with_attention_term=with_attention_term)
        errors[held_out] = np.abs(model.predict(x[held_out]) - y[held_out]) / y[held_out]
    return float(errors.mean())


class OnlineCalibrator:
    """Live calibration of a linear cost model from an engine's measured step times.

    Exponentially weighted recursive least squares on relative errors, O(1) per step (a 4x4 system). The prior
    enters as pseudo-measurements: `prior_weight` steps' worth of the prior's own predictions, spread over a
    fixed set of typical step shapes. A penalty in prediction space, unlike a ridge on each coefficient, lets
    the data move what it determines and holds what it does not: a few prefills cannot inflate the
    per-KV-token coefficient and so wreck the prediction of a large decode batch, and a long run of pure
    decode (P always 0) leaves prefill predictions where the prior put them. The prior is never forgotten, so
    the estimate cannot wind up while one kind of step dominates; with the default forgetting it weighs
    about 1/1000 of the recent data once that has built up.
    """

    def __init__(
        self, prior: LinearCostModel, *, forgetting: float = 0.999, prior_weight: float = 1.0
    ) -> None:
        if not 0 < forgetting <= 1:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        if not prior_weight > 0:
            raise ValueError(f"prior_weight must be positive, got {prior_weight}")
        self._prior = np.array([prior.a, prior.b, prior.c, prior.d])
        reference = np.array(
            [(1.0, *batch_features(new, ctx)) for new, ctx in _REFERENCE_BATCHES], dtype=float
        )
        predicted = reference @ self._prior
        if not np.all(predicted > 0):
            raise ValueError(f"the prior must predict positive times for non-empty batches, got {prior}")
        weighted = reference / predicted[:, None]
        self._prior_information = prior_weight * weighted.T @ weighted / len(reference)
        self._forgetting = forgetting
        self._information = np.zeros((4, 4))  # sum of lambda^age * w x x^T
        self._moment = np.zeros(4)  # sum of lambda^age * w x y
        self._effective_samples = 0.0  # sum of lambda^age
        self._coefficients = self._prior.copy()
        self._error_sum = 0.0  # sum of lambda^age * |prediction - y| / y, predictions made before each update
        self._samples = 0

    @property
    def samples(self) -> int:
        return self._samples

    def update(
        self, new_tokens: Sequence[int], context_tokens: Sequence[int], measured_seconds: float
    ) -> None:
        """Fold in one measured step: score the current model on it first, then refit."""
        t, k, p = batch_features(new_tokens, context_tokens)
        if t == 0:
            raise ValueError("an empty batch has no measured compute time to learn from")
        if not (math.isfinite(measured_seconds) and measured_seconds > 0):
            raise ValueError(f"measured step time must be finite and positive, got {measured_seconds}")
        x = np.array([1.0, t, k, p])
        lam = self._forgetting
        self._error_sum = (
            lam * self._error_sum + abs(self._coefficients @ x - measured_seconds) / measured_seconds
        )
        weight = 1.0 / measured_seconds**2  # relative least squares, as in fit_linear
        self._information = lam * self._information + weight * np.outer(x, x)
        self._moment = lam * self._moment + weight * measured_seconds * x
        self._effective_samples = lam * self._effective_samples + 1.0
        self._samples += 1
        self._coefficients = self._solve()

    def model(self) -> LinearCostModel:
        return LinearCostModel(*(float(v) for v in self._coefficients))

    def mape(self) -> float:
        """Exponentially weighted mean absolute percentage error of the predictions made before each update
        (nan before the first): how wrong the model currently in use has been, on data it had not seen."""
        if self._samples == 0:
            return math.nan
        return self._error_sum / self._effective_samples

    def _solve(self) -> np.ndarray:
        system = self._information + self._prior_information
        rhs = self._moment + self._prior_information @ self._prior
        # Jacobi scaling keeps the 4x4 system well conditioned although P^2 can be 1e14 times 1^2.
        scale = np.sqrt(np.diag(system))
        scaled_system = system / np.outer(scale, scale)
        scaled_rhs = rhs / scale
        solution = np.linalg.solve(scaled_system, scaled_rhs)
        if np.all(solution >= 0):
            return solution / scale
        # With system = L L^T the objective is ||L^T u - L^-1 rhs||^2 up to a constant: a small NNLS.
        lower = np.linalg.cholesky(scaled_system)
        return nnls(lower.T, np.linalg.solve(lower, scaled_rhs)) / scale


def _feature_matrix(features: ArrayLike) -> np.ndarray:
    x = np.asarray(features, dtype=float)
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"features must be an (n, 3) array of (T, K, P) rows, got shape {x.shape}")
    return x


def _validated_samples(features: ArrayLike, times: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x = _feature_matrix(features)
    y = np.asarray(times, dtype=float)
    if y.shape != (x.shape[0],):
        raise ValueError(f"{x.shape[0]} feature rows but times of shape {y.shape}")
    if len(y) < _MIN_SAMPLES:
        raise ValueError(f"a fit of up to 4 coefficients needs at least {_MIN_SAMPLES} samples, got {len(y)}")
    if not (np.all(np.isfinite(x)) and np.all(x >= 0)):
        raise ValueError("features must be finite and non-negative")
    if np.any(x[:, 0] <= 0):
        raise ValueError(
            "every sample must be a non-empty batch (T > 0): empty batches take no time by definition"
        )
    if not (np.all(np.isfinite(y)) and np.all(y > 0)):
        raise ValueError("times must be finite and positive")
    return x, y


def _fit(x: np.ndarray, y: np.ndarray, with_attention_term: bool) -> tuple[LinearCostModel, float]:
    """NNLS on rows divided by their measured time; returns the model and its relative residual sum."""
    design = np.column_stack([np.ones(len(y)), x if with_attention_term else x[:, :2]])
    relative = design / y[:, None]
    coefficients = nnls(relative, np.ones(len(y)))
    rss = float(np.sum((relative @ coefficients - 1.0) ** 2))
    return LinearCostModel(*(float(v) for v in coefficients)), rss


def _bic(rss: float, samples: int, parameters: int) -> float:
    # Floor the residual so a noiseless fit does not give log(0).
    return samples * math.log(max(rss, 1e-300) / samples) + parameters * math.log(samples)
