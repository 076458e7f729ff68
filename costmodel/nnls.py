"""Non-negative least squares: argmin ||A x - b|| subject to x >= 0.

Lawson and Hanson's active-set method ("Solving Least Squares Problems", 1974, chapter 23), the algorithm
behind `scipy.optimize.nnls`, written here so the cost model needs numpy only. The problems it serves are tiny
(at most 5 columns), so clarity wins over speed.

`nnls_gram` is the same method on the normal equations (A^T A, A^T b) in plain Python floats, with the dense
symmetric positive-definite solve it needs (`cholesky`, `cholesky_solve`): the online calibrator solves a 5x5
system on every measured step, and on arrays that small numpy's per-call overhead is nearly all of the cost.
Symmetric matrices are passed as their lower triangle, row i holding its first i + 1 entries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike

_EPSILON = float(np.finfo(float).eps)


def nnls(matrix: ArrayLike, target: ArrayLike, *, max_iterations: int | None = None) -> np.ndarray:
    """The non-negative least-squares solution of `matrix @ x ~= target`.

    Columns are scaled to unit norm before solving: batch-time features differ by up to ten orders of
    magnitude, and the optimality test below compares gradients across columns. Scaling by positive factors
    does not change which solutions are non-negative, so the answer is rescaled back at the end.
    """
    a = np.asarray(matrix, dtype=float)
    b = np.asarray(target, dtype=float)
    if a.ndim != 2 or b.ndim != 1 or a.shape[0] != b.shape[0]:
        raise ValueError(f"nnls needs an (m, n) matrix and an (m,) target, got {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("nnls inputs must be finite")
    norms = np.linalg.norm(a, axis=0)
    scale = np.where(norms > 0, norms, 1.0)
    a = a / scale
    n = a.shape[1]
    # Each outer iteration frees one variable; degenerate ties can cycle, so the loop is bounded and returns
    # the last feasible point (scipy uses the same 3n default).
    max_iterations = 3 * n if max_iterations is None else max_iterations
    tolerance = 10 * np.finfo(float).eps * max(a.shape) * max(1.0, float(np.abs(a).sum(axis=0).max()))

    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    gradient = a.T @ b
    for _ in range(max_iterations):
        candidates = ~passive & (gradient > tolerance)
        if not candidates.any():
            break
        passive[np.argmax(np.where(candidates, gradient, -np.inf))] = True
        # Inner loop: solve on the passive set; when that solution leaves the feasible region, step back to
        # the boundary along the segment from x and drop the variables that hit zero.
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if np.all(z[passive] > tolerance):
                x = z
                break
            blocking = passive & (z <= tolerance)
            step = x[blocking] - z[blocking]
            # A variable already at zero whose solution is zero blocks with a step of 0, not 0/0.
            alpha = np.min(np.divide(x[blocking], step, out=np.zeros_like(step), where=step > 0))
            x = x + alpha * (z - x)
            passive &= x > tolerance
            x[~passive] = 0.0
            if not passive.any():
                break
        gradient = a.T @ (b - a @ x)
    return x / scale


def cholesky(lower: Sequence[Sequence[float]]) -> list[list[float]]:
    """The Cholesky factor L (lower triangle, row i of length i + 1) of a symmetric positive-definite matrix
    given by its lower triangle: matrix = L L^T."""
    factor: list[list[float]] = []
    for i, row in enumerate(lower):
        out: list[float] = []
        for j in range(i):
            above = factor[j]
            total = row[j]
            for k in range(j):
                total -= out[k] * above[k]
            out.append(total / above[j])
        pivot = row[i]
        for value in out:
            pivot -= value * value
        if not pivot > 0:  # also catches nan
            raise np.linalg.LinAlgError("matrix is not positive definite")
        out.append(math.sqrt(pivot))
        factor.append(out)
    return factor


def cholesky_solve(factor: Sequence[Sequence[float]], rhs: Sequence[float]) -> list[float]:
    """x with L L^T x = rhs, for `cholesky`'s factor L."""
    n = len(factor)
    y = [0.0] * n
    for i in range(n):
        row = factor[i]
        total = rhs[i]
        for k in range(i):
            total -= row[k] * y[k]
        y[i] = total / row[i]
    x = [0.0] * n
    for i in range(n - 1, -1, -1):
        total = y[i]
        for k in range(i + 1, n):
            total -= factor[k][i] * x[k]
        x[i] = total / factor[i][i]
    return x


def nnls_gram(
    gram: Sequence[Sequence[float]],
    moment: Sequence[float],
    *,
    tolerance: float | None = None,
    passive_hint: Sequence[int] = (),
) -> list[float]:
    """argmin ||A x - b|| subject to x >= 0, from gram = A^T A (lower triangle, positive definite) and
    moment = A^T b: `nnls`'s active-set iterations with the passive set's least-squares problem solved through
    its normal equations. A positive-definite Gram matrix makes the problem strictly convex, so the answer is
    `nnls(A, b)`'s up to rounding. `tolerance` plays the part of `nnls`'s on the unit-norm columns this scales
    to (the scaling, as there, changes no sign); by default the largest `nnls` uses on a square A with such
    columns, 10 eps n sqrt(n) (a unit column's 1-norm is at most sqrt(n)).

    `passive_hint` (indices of the variables expected positive, e.g. the previous solution's in a sequence of
    similar problems) is tried first: if its solution meets the optimality conditions that end the active-set
    iterations, it is the unique optimum and the iterations are skipped.
    """
    n = len(moment)
    if tolerance is None:
        tolerance = 10 * _EPSILON * n * math.sqrt(n)
    norms = [math.sqrt(gram[i][i]) if gram[i][i] > 0 else 1.0 for i in range(n)]
    scaled = [[row[j] / (norms[i] * norms[j]) for j in range(i + 1)] for i, row in enumerate(gram)]
    b = [moment[i] / norms[i] for i in range(n)]

    def gradient_at(x: list[float], rows: Iterable[int]) -> dict[int, float]:
        # A^T (b - A x) = A^T b - A^T A x, on the rows asked for: the variables that could enter the passive set
        used = [j for j in range(n) if x[j]]
        return {
            i: b[i] - sum([(scaled[i][j] if j <= i else scaled[j][i]) * x[j] for j in used]) for i in rows
        }

    def passive_solution(passive: Sequence[int]) -> list[float]:
        # passive is sorted, so each of its rows reads the stored lower triangle
        factor = cholesky(
            [[scaled[i][j] for j in passive[: position + 1]] for position, i in enumerate(passive)]
        )
        solved = cholesky_solve(factor, [b[i] for i in passive])
        z = [0.0] * n
        for i, value in zip(passive, solved, strict=True):
            z[i] = value
        return z

    def unscaled(x: list[float]) -> list[float]:
        return [value / norm for value, norm in zip(x, norms, strict=True)]

    if passive_hint:
        z = passive_solution(sorted(passive_hint))
        if all(z[i] > tolerance for i in passive_hint):
            others = [i for i in range(n) if i not in passive_hint]
            if all(value <= tolerance for value in gradient_at(z, others).values()):
                return unscaled(z)

    x = [0.0] * n
    passive: list[int] = []  # kept sorted
    gradient = dict(enumerate(b))
    # Bounded as in `nnls`: degenerate ties can cycle.
    for _ in range(3 * n):
        candidates = [i for i in range(n) if i not in passive and gradient[i] > tolerance]
        if not candidates:
            break
        passive = sorted([*passive, max(candidates, key=lambda i: gradient[i])])
        while True:
            z = passive_solution(passive)
            if all(z[i] > tolerance for i in passive):
                x = z
                break
            # Step back to the boundary along the segment from x; a variable already at zero whose solution
            # is zero blocks with a step of 0.
            alpha = min(
                x[i] / (x[i] - z[i]) if x[i] - z[i] > 0 else 0.0 for i in passive if z[i] <= tolerance
            )
            x = [xi + alpha * (zi - xi) for xi, zi in zip(x, z, strict=True)]
            passive = [i for i in passive if x[i] > tolerance]
            x = [value if i in passive else 0.0 for i, value in enumerate(x)]
            if not passive:
                break
        gradient = gradient_at(x, [i for i in range(n) if i not in passive])
    return unscaled(x)
