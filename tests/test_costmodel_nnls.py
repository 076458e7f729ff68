import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_shadow.costmodel.nnls import (
    cholesky,
    cholesky_solve,
    hinted_nnls,
    jacobi_scaler,
    nnls,
    nnls_gram,
    nnls_gram_packed,
    pack,
    packed_index,
    passive_solver,
)


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


# ---- the pure-Python solvers the online calibrator uses


def _lower(matrix: np.ndarray) -> list[list[float]]:
    return [matrix[i, : i + 1].tolist() for i in range(len(matrix))]


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 5))
def test_cholesky_solves_a_positive_definite_system(seed: int, size: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(size + 3, size))
    gram, rhs = a.T @ a, rng.normal(size=size)
    factor = np.zeros((size, size))
    for i, row in enumerate(cholesky(_lower(gram))):
        factor[i, : i + 1] = row
    np.testing.assert_allclose(factor @ factor.T, gram, rtol=1e-10, atol=1e-10 * np.abs(gram).max())
    np.testing.assert_allclose(
        cholesky_solve(cholesky(_lower(gram)), rhs.tolist()), np.linalg.solve(gram, rhs)
    )


def test_cholesky_refuses_a_matrix_that_is_not_positive_definite() -> None:
    with pytest.raises(np.linalg.LinAlgError):
        cholesky([[1.0], [2.0, 1.0]])  # eigenvalues 3 and -1


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    cols=st.integers(1, 5),
    hint=st.lists(st.integers(0, 4), unique=True, max_size=5),
)
def test_gram_form_equals_nnls_whatever_the_hint(seed: int, cols: int, hint: list[int]) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(cols + 4, cols)) * 10.0 ** rng.integers(-3, 4, size=cols)
    b = rng.normal(size=cols + 4)
    expected = nnls(a, b)
    # a hint is only a first guess: right, wrong or empty, the answer is the unique optimum
    got = np.array(nnls_gram(_lower(a.T @ a), (a.T @ b).tolist(), passive_hint=[i for i in hint if i < cols]))
    assert np.all(got >= 0)
    assert _kkt_violation(a, b, got) < 1e-6
    np.testing.assert_allclose(
        got * np.linalg.norm(a, axis=0), expected * np.linalg.norm(a, axis=0), atol=1e-6
    )


def test_gram_form_clamps_a_coefficient_like_nnls_from_any_hint() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([2.0, -1.0, 1.0])  # unconstrained solution (5/3, -4/3)
    for hint in ((), (0,), (1,), (0, 1)):
        np.testing.assert_allclose(
            nnls_gram(_lower(a.T @ a), (a.T @ b).tolist(), passive_hint=hint), [1.5, 0.0]
        )


# ---- the straight-line solves: the loop versions' arithmetic, to the last bit


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 5))
def test_passive_solver_is_cholesky_then_cholesky_solve_bit_for_bit(seed: int, size: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(size + 3, size)) * 10.0 ** rng.integers(-3, 4, size=size)
    lower, rhs = _lower(a.T @ a), rng.normal(size=size).tolist()
    for passive in (p for r in range(1, size + 1) for p in itertools.combinations(range(size), r)):
        rows = [[lower[i][j] for j in passive[: position + 1]] for position, i in enumerate(passive)]
        expected = [0.0] * size
        for i, value in zip(passive, cholesky_solve(cholesky(rows), [rhs[i] for i in passive]), strict=True):
            expected[i] = value
        assert passive_solver(size, passive)(pack(lower), rhs) == expected


def test_passive_solver_refuses_what_cholesky_refuses() -> None:
    with pytest.raises(np.linalg.LinAlgError):
        passive_solver(2, (0, 1))(pack([[1.0], [2.0, 1.0]]), [1.0, 1.0])
    assert passive_solver(2, (1,))(pack([[1.0], [2.0, 4.0]]), [1.0, 2.0]) == [
        0.0,
        0.5,
    ]  # its own block is fine
    with pytest.raises(ValueError, match="sorted"):
        passive_solver(3, (2, 0))


def test_packed_layout() -> None:
    lower = [[1.0], [2.0, 3.0], [4.0, 5.0, 6.0]]
    packed = pack(lower)
    assert packed == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert all(packed[packed_index(i, j)] == lower[max(i, j)][min(i, j)] for i in range(3) for j in range(3))
    with pytest.raises(ValueError, match="packed"):
        nnls_gram_packed(packed, [1.0, 2.0])


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 5))
def test_jacobi_scaler_is_the_entrywise_scaling_bit_for_bit(seed: int, size: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(size + 3, size)) * 10.0 ** rng.integers(-3, 4, size=size)
    m, m2 = pack(_lower(a.T @ a)), pack(_lower(np.diag(rng.uniform(0, 1, size))))
    r, r2 = rng.normal(size=size).tolist(), rng.normal(size=size).tolist()
    pairs = [(i, j) for i in range(size) for j in range(i + 1)]
    total = [x + y for x, y in zip(m, m2, strict=True)]
    s = [math.sqrt(total[packed_index(i, i)]) for i in range(size)]
    expected = (
        s,
        [total[k] / (s[i] * s[j]) for k, (i, j) in enumerate(pairs)],
        [(x + y) / si for x, y, si in zip(r, r2, s, strict=True)],
    )
    assert jacobi_scaler(size, summed=True)(m, m2, r, r2) == expected
    m[0] = 0.0  # a zero diagonal: guarded, its scale is 1
    s = [math.sqrt(m[packed_index(i, i)]) if m[packed_index(i, i)] > 0 else 1.0 for i in range(size)]
    expected = (
        s,
        [m[k] / (s[i] * s[j]) for k, (i, j) in enumerate(pairs)],
        [x / si for x, si in zip(r, s, strict=True)],
    )
    assert jacobi_scaler(size, guarded=True)(m, r) == expected


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 5))
def test_a_right_hint_gives_the_iterations_answer_bit_for_bit(seed: int, size: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(size + 4, size)) * 10.0 ** rng.integers(-3, 4, size=size)
    gram, moment = pack(_lower(a.T @ a)), (a.T @ rng.normal(size=size + 4)).tolist()
    found = nnls_gram_packed(gram, moment)  # no hint: the active-set iterations
    positive = tuple(i for i, value in enumerate(found) if value > 0)
    tolerance = 10 * np.finfo(float).eps * size * math.sqrt(size)
    if positive:
        assert hinted_nnls(size, positive)(gram, moment, tolerance) == found
        assert nnls_gram_packed(gram, moment, passive_hint=positive) == found
    for wrong in (p for r in range(1, size + 1) for p in itertools.combinations(range(size), r)):
        if wrong != positive:  # a wrong hint is refused (or meets the optimality test: then it is the answer)
            answer = hinted_nnls(size, wrong)(gram, moment, tolerance)
            assert answer is None or np.allclose(answer, found, rtol=1e-6, atol=1e-12)
