"""INFERMAX's linear batch-time model, with a per-request term: its form, its offline fit, and its online
calibration.

time = a + b*T + c*K + d*P + e*R for a non-empty batch, where over the requests in the batch with new > 0
  T = sum of new tokens (what the matmuls process),
  K = sum of context_after = ctx_before + new (the KV entries attention reads),
  P = sum over requests with new > 1 of new * (ctx_before + new) (the quadratic query-by-key work of prefill
      chunks; a decode token's attention is already counted by K),
  R = the number of requests (what each costs whatever its tokens: its row of the LM head, its sampling over
      the vocabulary, its metadata and attention call).
INFERMAX's published form is the first four terms. e*R was added because T cannot tell a decode's token, which
brings its own LM-head row and sampling, from a prefill chunk's token, which shares one with the whole chunk.
Calibrated on a real vLLM engine's mirrored steps (`tests/support/calibration_report.py`; CPU, tiny Llama,
32000-token vocabulary), the four-term fit was off by ~12% on later steps and the five-term one by ~7%; on the
profiler's measurements of the same model the hold-out error halved (benchmarks/RESULTS-profile.md). Where the
per-request cost is negligible (a large model on a GPU, whose LM head streams its weights once per step
whatever R), the fit drops e.

Fits minimise RELATIVE squared error: step times span three orders of magnitude (a decode step of a few ms, a
long prefill of hundreds), the steps that matter most in number are the short ones, and the simulator's
fidelity is judged in relative terms. Plain least squares would let a few long prefills set every coefficient.
"""

from __future__ import annotations

import math
import math as libm  # C's libm in the build (_linear_compiled.pxd): isfinite and sqrt on C doubles
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from vllm_shadow.costmodel.nnls import default_tolerance, nnls, nnls_gram_packed, pack
from vllm_shadow.solver import compiled_build

COEFFICIENTS = ("a", "b", "c", "d", "e")
_OPTIONAL_COEFFICIENTS = ("d", "e")  # absent from older profile files: 0
MIN_SAMPLES = len(COEFFICIENTS) + 1  # one more than the most coefficients: a fit always has a residual
# Step shapes the prior speaks for: decode batches small and large on short and long contexts, prefills from
# scratch and on cached context, several new prompts batched together, and a chunked-prefill mix. All five
# features vary independently across them: R = T on decodes, R = 1 on a single prefill, and the batched
# prompts separate R from both.
_REFERENCE_BATCHES = [
    *(([1] * size, [ctx] * size) for size in (1, 16, 128) for ctx in (256, 4096)),
    *(([chunk], [ctx]) for chunk in (128, 2048) for ctx in (0, 4096)),
    ([256] * 8, [0] * 8),
    ([64] * 4, [1024] * 4),
    ([512] + [1] * 32, [0] + [1024] * 32),
]


class BatchFeatures(NamedTuple):
    """(T, K, P, R) of a batch: see the module docstring."""

    tokens: int  # T
    kv_tokens: int  # K
    attention_units: int  # P
    requests: int  # R


@dataclass(frozen=True, slots=True)
class LinearCostModel:
    """time = a + b*T + c*K + d*P + e*R for a non-empty batch, 0 for an empty one (module docstring)."""

    a: float  # seconds per non-empty batch (weights read, launch overheads)
    b: float  # seconds per token processed in the batch (T = sum of new tokens)
    c: float  # seconds per KV token attended (K = sum over requests of context_after = ctx_before + new)
    d: float = 0.0  # seconds per unit of multi-token attention: P = sum over new > 1 of new * (ctx + new)
    e: float = 0.0  # seconds per request in the batch (R = requests with new > 0)

    def __post_init__(self) -> None:
        for name in COEFFICIENTS:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                # A negative coefficient makes some batch take negative time and breaks every schedule cost.
                raise ValueError(f"coefficient {name} must be finite and non-negative, got {value}")

    def batch_time(self, new_tokens: Sequence[int], context_tokens: Sequence[int]) -> float:
        """Seconds for one step; `context_tokens[i]` is what request i already holds in KV before the step."""
        return self.time_from_features(*batch_features(new_tokens, context_tokens))

    def time_from_features(
        self, total_tokens: int, kv_tokens: int, attention_units: int, requests: int
    ) -> float:
        """The same time from features a caller maintains incrementally (a simulator's hot loop). `requests`
        has no default: a caller that forgot it would silently lose the per-request cost."""
        if total_tokens == 0:
            return 0.0
        return (
            self.a + self.b * total_tokens + self.c * kv_tokens + self.d * attention_units + self.e * requests
        )

    def predict(self, features: ArrayLike) -> np.ndarray:
        """Vectorised batch times for an (n, 4) array of (T, K, P, R) rows."""
        x = _feature_matrix(features)
        times = self.a + x @ np.array([self.b, self.c, self.d, self.e])
        return np.where(x[:, 0] > 0, times, 0.0)

    def to_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in COEFFICIENTS}

    @classmethod
    def from_dict(cls, data: Mapping[str, float]) -> LinearCostModel:
        """From `to_dict`'s form; d and e may be absent (files written before the model had them)."""
        required = set(COEFFICIENTS) - set(_OPTIONAL_COEFFICIENTS)
        if set(data) - set(COEFFICIENTS) or not required <= set(data):
            raise ValueError(
                f"a linear cost model needs keys a, b, c (and optionally d, e), got {sorted(data)}"
            )
        return cls(**{name: float(value) for name, value in data.items()})


def batch_features(new_tokens: Sequence[int], context_tokens: Sequence[int]) -> BatchFeatures:
    """(T, K, P, R) of a batch: see the module docstring. Requests with 0 new tokens contribute nothing."""
    if len(new_tokens) != len(context_tokens):
        raise ValueError(f"{len(new_tokens)} new-token counts but {len(context_tokens)} context lengths")
    if (
        isinstance(new_tokens, list | tuple)
        and isinstance(context_tokens, list | tuple)
        and 0 not in new_tokens
    ):
        # Every request computes (as in every step an engine reports): the same integers, summed in C, with the
        # quadratic term walked only when a request computes more than one token (never in pure decode).
        total = sum(new_tokens)
        requests = len(new_tokens)
        attention = (
            0
            if new_tokens.count(1) == requests
            else sum(
                [new * (ctx + new) for new, ctx in zip(new_tokens, context_tokens, strict=True) if new > 1]
            )
        )
        return BatchFeatures(total, sum(context_tokens) + total, attention, requests)
    total = kv = attention = requests = 0
    for new, ctx in zip(new_tokens, context_tokens, strict=True):
        if new == 0:
            continue
        after = ctx + new
        total += new
        kv += after
        requests += 1
        if new > 1:
            attention += new * after
    return BatchFeatures(total, kv, attention, requests)


def fit_linear(
    features: ArrayLike,
    times: ArrayLike,
    *,
    with_attention_term: bool | None = None,
    with_request_term: bool | None = None,
) -> LinearCostModel:
    """Non-negative relative least-squares fit of (a, b, c[, d][, e]) to measured batch times, from an
    (n, 4) array of (T, K, P, R) rows.

    A term whose flag is None is kept only if it lowers the Bayesian information criterion, so with both None
    the fit is the best of the four forms by BIC. P is strongly correlated with T and K on most workloads, and
    R is T on pure decode and 1 on single prefills: an unneeded term soaks up noise and extrapolates badly to
    batches the data did not cover. True or False forces the term in or out.
    """
    x, y = _validated_samples(features, times)
    attention = (False, True) if with_attention_term is None else (with_attention_term,)
    request = (False, True) if with_request_term is None else (with_request_term,)
    fits = [_fit(x, y, with_d, with_e) for with_d in attention for with_e in request]
    return min(fits, key=lambda fit: _bic(fit[1], len(y), fit[2]))[0]


def cross_validated_mape(
    features: ArrayLike,
    times: ArrayLike,
    *,
    with_attention_term: bool | None = None,
    with_request_term: bool | None = None,
    folds: int = 5,
    seed: int = 0,
) -> float:
    """Mean absolute percentage error of `fit_linear` on held-out samples (k-fold): the error to expect on
    batches the fit has not seen, which is what a profile reports. Each fold selects its own form."""
    x, y = _validated_samples(features, times)
    smallest_training_set = len(y) - math.ceil(len(y) / folds)
    if folds < 2 or smallest_training_set < MIN_SAMPLES:
        raise ValueError(
            f"{folds}-fold validation of {len(y)} samples leaves training sets under {MIN_SAMPLES} samples"
        )
    order = np.random.default_rng(seed).permutation(len(y))
    errors = np.empty(len(y))
    for held_out in np.array_split(order, folds):
        train = np.setdiff1d(order, held_out)
        model = fit_linear(
            x[train],
            y[train],
            with_attention_term=with_attention_term,
            with_request_term=with_request_term,
        )
        errors[held_out] = np.abs(model.predict(x[held_out]) - y[held_out]) / y[held_out]
    return float(errors.mean())


class OnlineCalibrator:
    """Live calibration of a linear cost model from an engine's measured step times.

    Exponentially weighted recursive least squares on relative errors, O(1) per step (a 5x5 system). The prior
    enters as pseudo-measurements: `prior_weight` steps' worth of the prior's own predictions, spread over a
    fixed set of typical step shapes. A penalty in prediction space, unlike a ridge on each coefficient, lets
    the data move what it determines and holds what it does not: a few prefills cannot inflate the
    per-KV-token coefficient and so wreck the prediction of a large decode batch, and a long run of pure
    decode (P always 0, R always T) leaves prefill predictions about where the prior put them. It also lets a
    prior without a per-request cost (e = 0) learn one: nothing pins e itself, only the prior's predictions.
    The prior is never forgotten, so the estimate cannot wind up while one kind of step dominates; with the
    default forgetting it weighs about 1/1000 of the recent data once that has built up.

    What pure decode leaves open, d and the split of a decode's cost between b and e, the prior's predictions
    settle, and they compensate the other coefficients' errors: when the data raises the intercept a, keeping
    short prefills near their prior predictions moves per-token cost from b into e, so long prefills are then
    predicted below the prior (14% below a Llama-2-7B roofline prior with a 60% higher intercept). The first
    steps with prefills separate b from e again.
    """

    def __init__(
        self, prior: LinearCostModel, *, forgetting: float = 0.999, prior_weight: float = 1.0
    ) -> None:
        if not 0 < forgetting <= 1:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        if not prior_weight > 0:
            raise ValueError(f"prior_weight must be positive, got {prior_weight}")
        prior_coefficients = np.array([getattr(prior, name) for name in COEFFICIENTS])
        reference = np.array(
            [(1.0, *batch_features(new, ctx)) for new, ctx in _REFERENCE_BATCHES], dtype=float
        )
        predicted = reference @ prior_coefficients
        if not np.all(predicted > 0):
            raise ValueError(f"the prior must predict positive times for non-empty batches, got {prior}")
        weighted = reference / predicted[:, None]
        prior_information = prior_weight * weighted.T @ weighted / len(reference)
        # The per-step state is plain floats (C doubles in the build, _linear_compiled.pxd), symmetric matrices
        # packed as their lower triangle (costmodel/nnls.py): on a 5x5 system numpy's per-call overhead was
        # nearly all of an update's cost.
        self._prior_information = pack([prior_information[i, : i + 1].tolist() for i in range(_SIZE)])
        self._prior_moment = (prior_information @ prior_coefficients).tolist()
        self._forgetting = forgetting
        self._information = _zeros(_PACKED_SIZE)  # sum of lambda^age * w x x^T
        self._moment = _zeros(_SIZE)  # sum of lambda^age * w x y
        self._effective_samples = 0.0  # sum of lambda^age
        self._coefficients = prior_coefficients.tolist()
        # Those of the last refit if a constraint held one at zero, else empty (see _solve).
        self._positive_coefficients: tuple[int, ...] = ()
        self._error_sum = 0.0  # sum of lambda^age * |prediction - y| / y, predictions made before each update
        self._samples = 0
        # A refit's working storage, reused so that it allocates nothing: the Jacobi-scaled system (_solve), the
        # hint's rescaling of it (_solve_on_hint), the indices a solve is restricted to, a Cholesky factor with
        # its forward substitution, and the solution on those indices.
        self._scale = _zeros(_SIZE)
        self._system = _zeros(_PACKED_SIZE)
        self._rhs = _zeros(_SIZE)
        self._hint_scale = _zeros(_SIZE)
        self._hint_system = _zeros(_PACKED_SIZE)
        self._hint_rhs = _zeros(_SIZE)
        self._passive = list(range(_SIZE))
        self._factor = _zeros(_PACKED_SIZE)
        self._forward = _zeros(_SIZE)
        self._solution = _zeros(_SIZE)

    @property
    def samples(self) -> int:
        return self._samples

    def update(
        self, new_tokens: Sequence[int], context_tokens: Sequence[int], measured_seconds: float
    ) -> None:
        """Fold in one measured step: score the current model on it first, then refit."""
        self.update_features(*batch_features(new_tokens, context_tokens), measured_seconds)

    def update_features(
        self, tokens: int, kv_tokens: int, attention_units: int, requests: int, measured_seconds: float
    ) -> None:
        """`update` from the step's features (T, K, P, R), as `batch_features` gives them: for a caller that
        sums them as it walks the step's requests anyway (the engine tracker), instead of building the lists."""
        if tokens == 0:
            raise ValueError("an empty batch has no measured compute time to learn from")
        if not (libm.isfinite(measured_seconds) and measured_seconds > 0):
            raise ValueError(f"measured step time must be finite and positive, got {measured_seconds}")
        y = measured_seconds
        x = [1.0, float(tokens), float(kv_tokens), float(attention_units), float(requests)]
        c = self._coefficients
        # sum() as before: from 3.12 it sums floats with compensation, which `+` would not reproduce.
        predicted = sum((c[0] * x[0], c[1] * x[1], c[2] * x[2], c[3] * x[3], c[4] * x[4]))
        lam = self._forgetting
        self._error_sum = lam * self._error_sum + abs(predicted - y) / y
        # Relative least squares, as in fit_linear. Python's float power even in the build (measured_seconds
        # is an object there): C's pow(y, 2.0), which a compiler turns into y * y, rounds differently in about
        # one case in a thousand.
        weight = 1.0 / measured_seconds**2
        information, moment = self._information, self._moment
        weighted_time = weight * y
        for i in range(_SIZE):
            row = i * (i + 1) // 2
            for j in range(i + 1):
                information[row + j] = lam * information[row + j] + weight * (x[i] * x[j])
            moment[i] = lam * moment[i] + weighted_time * x[i]
        self._effective_samples = lam * self._effective_samples + 1.0
        self._samples += 1
        self._solve()

    def model(self) -> LinearCostModel:
        c = self._coefficients
        return LinearCostModel(c[0], c[1], c[2], c[3], c[4])

    def mape(self) -> float:
        """Exponentially weighted mean absolute percentage error of the predictions made before each update
        (nan before the first): how wrong the model currently in use has been, on data it had not seen."""
        if self._samples == 0:
            return math.nan
        return self._error_sum / self._effective_samples

    def _solve(self) -> None:
        """Refits the coefficients. Each step below is the arithmetic of nnls.py's functions
        (`jacobi_scaler(_SIZE, summed=True)`, `passive_solver`, `hinted_nnls`) operation for operation, as loops
        that the build runs on C doubles."""
        # The system is the data's plus the prior's. Jacobi scaling keeps it well conditioned although P^2 can
        # be 1e14 times 1^2.
        system, rhs, scale = self._system, self._rhs, self._scale
        information, prior_information = self._information, self._prior_information
        for k in range(_PACKED_SIZE):
            system[k] = information[k] + prior_information[k]
        for i in range(_SIZE):
            scale[i] = libm.sqrt(system[i * (i + 1) // 2 + i])
        for i in range(_SIZE):
            row = i * (i + 1) // 2
            for j in range(i + 1):
                system[row + j] = system[row + j] / (scale[i] * scale[j])
            rhs[i] = (self._moment[i] + self._prior_moment[i]) / scale[i]
        coefficients, solution = self._coefficients, self._solution
        if not self._positive_coefficients:  # the last refit needed no constraint: try without
            # The system is positive definite (the prior's reference batches vary all five features
            # independently), so Cholesky solves it.
            for i in range(_SIZE):
                self._passive[i] = i
            self._solve_on(system, rhs, _SIZE)
            smallest = solution[0]  # min(): the first of the smallest
            for i in range(1, _SIZE):
                if solution[i] < smallest:
                    smallest = solution[i]
            if smallest >= 0:
                for i in range(_SIZE):
                    coefficients[i] = solution[i] / scale[i]
                return
        # The non-negative least-squares problem with the same normal equations (with system = L L^T the
        # objective is ||L^T u - L^-1 rhs||^2 up to a constant). Its optimum is unique, and is the
        # unconstrained solution whenever that is non-negative, so after a constrained refit this goes straight
        # here: consecutive refits differ by one step's data, the previous refit's positive coefficients are
        # nearly always this one's, and nnls_gram tries them first.
        # `nnls_gram_packed(scaled_system, scaled_rhs, passive_hint=positive)` without its per-call work: its
        # straight-line solve on the hint, then, only where the hint is not the optimum, its iterations (which
        # do not use the hint: the same answer without it).
        if self._positive_coefficients and self._solve_on_hint():
            return
        answer = nnls_gram_packed(self._system, self._rhs)
        positive = tuple([i for i in range(_SIZE) if answer[i] > 0])
        self._positive_coefficients = positive if len(positive) < _SIZE else ()
        for i in range(_SIZE):
            coefficients[i] = answer[i] / scale[i]

    def _solve_on_hint(self) -> bool:
        """`hinted_nnls(_SIZE, self._positive_coefficients)` on the scaled system: where the hint is the
        optimum, the coefficients from it and True, else False. Its positive coefficients are then the hint's
        (fewer than all): each is its solve's value, above the tolerance, over a finite positive scale (an
        infinite one makes the solve raise), which cannot underflow to 0; every other one is 0."""
        m, r = self._system, self._rhs
        s, a, b = self._hint_scale, self._hint_system, self._hint_rhs
        passive, positive = self._passive, self._positive_coefficients
        count = len(positive)
        for p in range(count):
            passive[p] = positive[p]
        for i in range(_SIZE):
            diagonal = m[i * (i + 1) // 2 + i]
            s[i] = libm.sqrt(diagonal) if diagonal > 0 else 1.0
        for i in range(_SIZE):
            row = i * (i + 1) // 2
            for j in range(i + 1):
                a[row + j] = m[row + j] / (s[i] * s[j])
            b[i] = r[i] / s[i]
        self._solve_on(a, b, count)
        z = self._solution
        for p in range(count):
            if not z[p] > _TOLERANCE:
                return False
        p = 0
        for i in range(_SIZE):
            if p < count and passive[p] == i:
                p += 1
                continue
            # the gradient b_i - (A^T A z)_i over the positive variables in index order, summed (sum(), as
            # above) as nnls_gram sums it
            terms = [a[_packed(i, passive[q])] * z[q] for q in range(count)]
            if b[i] - sum(terms) > _TOLERANCE:
                return False
        coefficients, scale = self._coefficients, self._scale
        p = 0
        for i in range(_SIZE):
            if p < count and passive[p] == i:
                coefficients[i] = z[p] / s[i] / scale[i]
                p += 1
            else:
                coefficients[i] = 0.0 / s[i] / scale[i]
        return True

    def _solve_on(self, m: list[float], r: list[float], count: int) -> None:
        """`passive_solver(_SIZE, passive)(m, r)` for the first `count` of `self._passive` (sorted indices):
        Cholesky factorisation then substitution on those rows and columns of the packed system `m`, into
        `self._solution[:count]`. Raises `numpy.linalg.LinAlgError` where `cholesky` would."""
        passive, factor, forward, z = self._passive, self._factor, self._forward, self._solution
        for i in range(count):
            row = i * (i + 1) // 2
            system_row = passive[i] * (passive[i] + 1) // 2  # where row passive[i] of `m` starts
            for j in range(i):
                column = j * (j + 1) // 2
                total = m[system_row + passive[j]]
                for q in range(j):
                    total = total - factor[row + q] * factor[column + q]
                factor[row + j] = total / factor[column + j]
            pivot = m[system_row + passive[i]]
            for q in range(i):
                pivot = pivot - factor[row + q] * factor[row + q]
            if not pivot > 0:  # also catches nan
                raise np.linalg.LinAlgError("matrix is not positive definite")
            factor[row + i] = libm.sqrt(pivot)
        for i in range(count):
            row = i * (i + 1) // 2
            total = r[passive[i]]
            for q in range(i):
                total = total - factor[row + q] * forward[q]
            forward[i] = total / factor[row + i]
        for i in range(count - 1, -1, -1):
            total = forward[i]
            for q in range(i + 1, count):
                total = total - factor[q * (q + 1) // 2 + i] * z[q]
            z[i] = total / factor[i * (i + 1) // 2 + i]


def _zeros(n: int) -> list[float]:
    """n zeros: a calibrator's array (a C array of n doubles in the build, which a list of another length could
    not fill)."""
    return [0.0] * n


def _packed(i: int, j: int) -> int:
    """nnls.packed_index(i, j)."""
    return i * (i + 1) // 2 + j if j <= i else j * (j + 1) // 2 + i


_SIZE = len(COEFFICIENTS)
_PACKED_SIZE = _SIZE * (_SIZE + 1) // 2
_TOLERANCE = default_tolerance(_SIZE)


def _feature_matrix(features: ArrayLike) -> np.ndarray:
    x = np.asarray(features, dtype=float)
    if x.ndim != 2 or x.shape[1] != len(BatchFeatures._fields):
        raise ValueError(f"features must be an (n, 4) array of (T, K, P, R) rows, got shape {x.shape}")
    return x


def _validated_samples(features: ArrayLike, times: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x = _feature_matrix(features)
    y = np.asarray(times, dtype=float)
    if y.shape != (x.shape[0],):
        raise ValueError(f"{x.shape[0]} feature rows but times of shape {y.shape}")
    if len(y) < MIN_SAMPLES:
        raise ValueError(
            f"a fit of up to {len(COEFFICIENTS)} coefficients needs at least {MIN_SAMPLES} samples, "
            f"got {len(y)}"
        )
    if not (np.all(np.isfinite(x)) and np.all(x >= 0)):
        raise ValueError("features must be finite and non-negative")
    tokens, requests = x[:, 0], x[:, 3]
    if np.any(tokens <= 0):
        raise ValueError(
            "every sample must be a non-empty batch (T > 0): empty batches take no time by definition"
        )
    # Every request in a batch computes at least one token. A row that breaks this is not a batch's features
    # (columns in another order, or R missing from rows built for the four-coefficient model).
    if np.any((requests < 1) | (requests > tokens)):
        raise ValueError("every sample needs 1 <= R <= T: each request in a batch computes a token")
    if not (np.all(np.isfinite(y)) and np.all(y > 0)):
        raise ValueError("times must be finite and positive")
    return x, y


def _fit(
    x: np.ndarray, y: np.ndarray, with_attention_term: bool, with_request_term: bool
) -> tuple[LinearCostModel, float, int]:
    """NNLS on rows divided by their measured time; returns the model, its relative residual sum and its
    number of coefficients."""
    columns = [0, 1]  # of x's (T, K, P, R)
    if with_attention_term:
        columns.append(2)
    if with_request_term:
        columns.append(3)
    design = np.column_stack([np.ones(len(y)), x[:, columns]])
    relative = design / y[:, None]
    solution = nnls(relative, np.ones(len(y)))
    rss = float(np.sum((relative @ solution - 1.0) ** 2))
    coefficients = np.zeros(len(COEFFICIENTS))
    coefficients[[0, *(column + 1 for column in columns)]] = solution
    return LinearCostModel(*(float(v) for v in coefficients)), rss, len(solution)


def _bic(rss: float, samples: int, parameters: int) -> float:
    # Floor the residual so a noiseless fit does not give log(0).
    return samples * math.log(max(rss, 1e-300) / samples) + parameters * math.log(samples)


# ---- the calibrator in use --------------------------------------------------------------------------------------

COMPILED_MODULE = "vllm_shadow.costmodel._linear_compiled"
_PURE_MODULE = "vllm_shadow.costmodel._linear_pure"
_SOURCE = Path(__file__)
_DECLARATIONS = _SOURCE.with_name("_linear_compiled.pxd")


def compiled_calibrator() -> ModuleType | None:
    """This file as compiled by setup.py, or None where it was not built (see solver.compiled_build)."""
    return compiled_build.compiled_module(COMPILED_MODULE)


def pure_calibrator() -> ModuleType:
    """This file as plain Python, whichever calibrator is in use: the oracle the compiled calibrator is tested
    against. Under the compiled calibrator it is loaded from the source file under a name of its own (with
    classes of its own)."""
    if not COMPILED:
        return sys.modules[__name__]
    return compiled_build.load_as_python(_PURE_MODULE, _SOURCE)


COMPILED = False  # whether `OnlineCalibrator` above is the compiled calibrator
if __name__ == "vllm_shadow.costmodel.linear":
    _build = compiled_build.build_in_use(
        COMPILED_MODULE, _SOURCE, _DECLARATIONS, "online calibrator", "calibrator"
    )
    if _build is not None:
        # The build's models are this module's LinearCostModel: a model of its own copy of the class would never
        # equal one of this one.
        _build.LinearCostModel = LinearCostModel
        # Not a plain assignment: in the build Cython compiles from this file, `OnlineCalibrator` is an extension
        # type, whose name cannot be rebound.
        globals().update(OnlineCalibrator=_build.OnlineCalibrator)
        COMPILED = True
