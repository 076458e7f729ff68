import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_shadow.costmodel.nnls import nnls


def _kkt_violation(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> float:
    """Largest breach of NNLS optimality, relative to the problem's scale: x >= 0, gradient <= 0 everywhere
    and = 0 where x > 0 (gradient of -||Ax - b||^2 / 2 is A^T (b - Ax))."""
    gradient = a.T @ (b - a @ x) / (np.linalg.norm(a, axis=0) * max(np.linalg.norm(b), 1e-12))
    return float(
        max(-x.min(initial=0.0), gradient.max(initial=0.0), np.abs(gradient[x > 0]).max(initial=0.0))
    )


def test_positive_solution_is_the_ordinary_least_squares_one() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 4))
    truth = np.array([1.0, 2.0, 0.5, 3.0])
    b = a @ truth + rng.normal(scale=0.01, size=50)
    np.testing.assert_allclose(nnls(a, b), np.linalg.lstsq(a, b, rcond=None)[0], rtol=1e-9)


def test_clamps_a_coefficient_whose_unconstrained_value_is_negative() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([2.0, -1.0, 1.0])  # unconstrained solution (5/3, -4/3)
    x = nnls(a, b)
    np.testing.assert_allclose(x, [1.5, 0.0], atol=1e-12)  # with x2 = 0, x1 = mean of (2, 1)


def test_columns_ten_orders_of_magnitude_apart_are_recovered() -> None:
    rng = np.random.default_rng(2)
    a = np.column_stack([np.ones(40), rng.uniform(1, 4e3, 40), rng.uniform(1e6, 1e10, 40)])
    truth = np.array([1e-2, 3e-5, 2e-11])
    np.testing.assert_allclose(nnls(a, a @ truth), truth, rtol=1e-6)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 30),
    cols=st.integers(1, 5),
)
def test_solution_satisfies_the_optimality_conditions(seed: int, rows: int, cols: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(rows, cols)) * 10.0 ** rng.integers(-3, 4, size=cols)
    b = rng.normal(size=rows)
    x = nnls(a, b)
    assert np.all(x >= 0)
    assert _kkt_violation(a, b, x) < 1e-6


def test_rejects_mismatched_shapes_and_non_finite_input() -> None:
    with pytest.raises(ValueError, match="matrix"):
        nnls(np.ones((3, 2)), np.ones(4))
    with pytest.raises(ValueError, match="finite"):
        nnls(np.array([[1.0], [np.nan]]), np.ones(2))
