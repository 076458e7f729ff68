"""How good a fitted profile is: mean absolute percentage errors per kind of batch, on the batches it was fitted
to and held out, beside INFERMAX's form without the per-request term and the roofline prior."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vllm_shadow.costmodel.linear import BatchFeatures, LinearCostModel, fit_linear
from vllm_shadow.costmodel.profiling.grid import BATCH_KINDS, BatchShape
from vllm_shadow.costmodel.profiling.timing import Measurement


@dataclass(frozen=True, slots=True)
class KindErrors:
    """Mean absolute percentage errors on one kind of batch (or "all"): the fitted model on the samples it
    was fitted to and on held-out ones; INFERMAX's form (no per-request term) on held-out ones; and the
    roofline prior, fitted to no measurement at all."""

    kind: str
    samples: int
    fit_mape: float
    holdout_mape: float
    without_request_term_holdout_mape: float  # the fit forced to e = 0, hold-out: what e buys here
    prior_mape: float | None
    prior_bias: float | None  # mean signed relative error; positive: the prior predicts too slow


def feature_matrix(batches: Sequence[BatchShape]) -> np.ndarray:
    """(n, 4) rows of the batches' (T, K, P, R), as `LinearCostModel.predict` and `fit_linear` take them."""
    return np.array([b.features for b in batches], dtype=float).reshape(-1, len(BatchFeatures._fields))


def holdout_errors(
    features: np.ndarray,
    times: np.ndarray,
    *,
    with_request_term: bool | None = None,
    folds: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Each batch's relative error |predicted - measured| / measured under a fit that did not see it: k-fold
    over the (T, K, P, R) `features`, with the folds of `cross_validated_mape` (so the mean is the profile's
    hold-out MAPE under the same `with_request_term`)."""
    order = np.random.default_rng(seed).permutation(len(times))
    errors = np.empty(len(times))
    for held_out in np.array_split(order, folds):
        train = np.setdiff1d(order, held_out)
        model = fit_linear(features[train], times[train], with_request_term=with_request_term)
        errors[held_out] = np.abs(model.predict(features[held_out]) - times[held_out]) / times[held_out]
    return errors


def kind_errors(
    measurements: Sequence[Measurement],
    fitted: LinearCostModel,
    prior: LinearCostModel | None,
    *,
    folds: int = 5,
    seed: int = 0,
) -> list[KindErrors]:
    """Errors per batch kind present, then over all batches."""
    features = feature_matrix([m.batch for m in measurements])
    times = np.array([m.seconds for m in measurements])
    kinds = np.array([m.batch.kind for m in measurements])
    fit = np.abs(fitted.predict(features) - times) / times
    held_out = holdout_errors(features, times, folds=folds, seed=seed)
    without_e = holdout_errors(features, times, with_request_term=False, folds=folds, seed=seed)
    signed_prior = None if prior is None else (prior.predict(features) - times) / times
    rows = []
    for kind in [*(k for k in BATCH_KINDS if k in kinds), "all"]:
        chosen = kinds == kind if kind != "all" else np.ones(len(times), dtype=bool)
        rows.append(
            KindErrors(
                kind=kind,
                samples=int(chosen.sum()),
                fit_mape=float(fit[chosen].mean()),
                holdout_mape=float(held_out[chosen].mean()),
                without_request_term_holdout_mape=float(without_e[chosen].mean()),
                prior_mape=None if signed_prior is None else float(np.abs(signed_prior[chosen]).mean()),
                prior_bias=None if signed_prior is None else float(signed_prior[chosen].mean()),
            )
        )
    return rows
