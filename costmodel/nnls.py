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

import functools
import math
from collections.abc import Callable, Iterable, Sequence

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
    return nnls_gram_packed(pack(gram), moment, tolerance=tolerance, passive_hint=passive_hint)


def default_tolerance(n: int) -> float:
    """`nnls_gram`'s default tolerance for n variables (see there)."""
    return 10 * _EPSILON * n * math.sqrt(n)


def nnls_gram_packed(
    gram: Sequence[float],
    moment: Sequence[float],
    *,
    tolerance: float | None = None,
    passive_hint: Sequence[int] = (),
) -> list[float]:
    """`nnls_gram` with the Gram matrix packed (`pack`)."""
    n = len(moment)
    if len(gram) != n * (n + 1) // 2:
        raise ValueError(f"a packed {n}x{n} matrix has {n * (n + 1) // 2} entries, got {len(gram)}")
    if tolerance is None:
        tolerance = default_tolerance(n)
    if passive_hint:
        solution = hinted_nnls(n, tuple(sorted(passive_hint)))(gram, moment, tolerance)
        if solution is not None:
            return solution
    norms, scaled, b = jacobi_scaler(n, guarded=True)(gram, moment)

    def unscaled(x: list[float]) -> list[float]:
        return [value / norm for value, norm in zip(x, norms, strict=True)]

    def gradient_at(x: list[float], rows: Iterable[int]) -> dict[int, float]:
        # A^T (b - A x) = A^T b - A^T A x, on the rows asked for: the variables that could enter the passive set
        used = [j for j in range(n) if x[j]]
        return {i: b[i] - sum([scaled[packed_index(i, j)] * x[j] for j in used]) for i in rows}

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
            z = passive_solver(n, tuple(passive))(scaled, b)
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


# ---- the same solves as straight-line code, for the online calibrator's hot path --------------------------
#
# A symmetric n x n matrix is passed "packed": its lower triangle row by row in one flat list, entry (i, j) with
# j <= i at i (i + 1) / 2 + j. Each function below is generated once per shape and does the arithmetic of the
# loop versions above in the same order, so its results are the same to the last bit (tests/test_costmodel_nnls.py
# holds them to it); what it saves is the interpreter's loop, index and list work, most of a 5x5 solve's cost.


def packed_index(i: int, j: int) -> int:
    """Where entry (i, j) of a symmetric matrix sits in its packed lower triangle."""
    if j > i:
        i, j = j, i
    return i * (i + 1) // 2 + j


def pack(lower: Sequence[Sequence[float]]) -> list[float]:
    """The packed form of a lower triangle given row by row (row i of length i + 1)."""
    return [value for row in lower for value in row]


_PassiveSolver = Callable[[Sequence[float], Sequence[float]], list[float]]


@functools.cache
def passive_solver(n: int, passive: tuple[int, ...]) -> _PassiveSolver:
    """solve(packed, rhs) -> z of length n: z on the sorted indices `passive` solves the system restricted to
    their rows and columns (`cholesky` then `cholesky_solve`, operation for operation), and is 0 elsewhere.
    Raises `numpy.linalg.LinAlgError` where `cholesky` would."""
    if list(passive) != sorted(set(passive)) or not all(0 <= i < n for i in passive):
        raise ValueError(f"passive must be sorted distinct indices below {n}, got {passive}")
    lines = ["def solve(m, r):"]
    lines += _cholesky_solve_lines(
        len(passive), lambda i, j: f"m[{packed_index(passive[i], passive[j])}]", lambda i: f"r[{passive[i]}]"
    )
    position = {index: p for p, index in enumerate(passive)}
    values = ", ".join(f"x{position[i]}" if i in position else "0.0" for i in range(n))
    lines.append(f"    return [{values}]")
    scope: dict[str, object] = {"sqrt": math.sqrt, "LinAlgError": np.linalg.LinAlgError}
    exec("\n".join(lines), scope)
    return scope["solve"]  # type: ignore[return-value]


def _cholesky_solve_lines(k: int, entry: Callable[[int, int], str], rhs: Callable[[int], str]) -> list[str]:
    """Straight-line `cholesky` then `cholesky_solve` of a k x k system whose entry (i, j), j <= i, and
    right-hand side i are the expressions `entry(i, j)` and `rhs(i)`; the solution ends in x0 .. x{k-1}."""
    lines = []
    for i in range(k):
        for j in range(i):
            products = "".join(f" - l{i}_{q} * l{j}_{q}" for q in range(j))
            lines.append(f"    l{i}_{j} = ({entry(i, j)}{products}) / l{j}_{j}")
        squares = "".join(f" - l{i}_{q} * l{i}_{q}" for q in range(i))
        lines.append(f"    pivot = {entry(i, i)}{squares}")
        lines.append("    if not pivot > 0:")
        lines.append('        raise LinAlgError("matrix is not positive definite")')
        lines.append(f"    l{i}_{i} = sqrt(pivot)")
    for i in range(k):
        products = "".join(f" - l{i}_{q} * y{q}" for q in range(i))
        lines.append(f"    y{i} = ({rhs(i)}{products}) / l{i}_{i}")
    for i in reversed(range(k)):
        products = "".join(f" - l{q}_{i} * x{q}" for q in range(i + 1, k))
        lines.append(f"    x{i} = (y{i}{products}) / l{i}_{i}")
    return lines


_Hinted = Callable[[Sequence[float], Sequence[float], float], "list[float] | None"]


@functools.cache
def hinted_nnls(n: int, passive: tuple[int, ...]) -> _Hinted:
    """hinted(gram, moment, tolerance) -> `nnls_gram_packed`'s answer when the variables positive at the optimum
    are exactly the sorted indices `passive`, else None: its scaling, its solve on the hint, its optimality
    test and its unscaling in one straight-line function, operation for operation (so the same answer, bit for
    bit), computing only the scaled entries the solve and the test read."""
    if not passive or list(passive) != sorted(set(passive)) or not all(0 <= i < n for i in passive):
        raise ValueError(f"passive must be sorted distinct indices below {n}, got {passive}")
    others = [i for i in range(n) if i not in passive]

    def scaled(i: int, j: int) -> str:
        i, j = max(i, j), min(i, j)
        return f"a{i}_{j}"

    lines = ["def hinted(m, r, tolerance):"]
    for i in range(n):
        d = packed_index(i, i)
        lines.append(f"    s{i} = sqrt(m[{d}]) if m[{d}] > 0 else 1.0")
    needed = {scaled(i, j) for i in passive for j in passive} | {
        scaled(i, j) for i in others for j in passive
    }
    for i in range(n):
        for j in range(i + 1):
            if scaled(i, j) in needed:
                lines.append(f"    a{i}_{j} = m[{packed_index(i, j)}] / (s{i} * s{j})")
    for i in range(n):
        lines.append(f"    b{i} = r[{i}] / s{i}")
    lines += _cholesky_solve_lines(
        len(passive), lambda i, j: scaled(passive[i], passive[j]), lambda i: f"b{passive[i]}"
    )
    lines.append(f"    if not ({' and '.join(f'x{p} > tolerance' for p in range(len(passive)))}):")
    lines.append("        return None")
    for i in others:
        # the gradient b_i - (A^T A z)_i over the positive variables in index order, summed as nnls_gram sums it
        terms = ", ".join(f"{scaled(i, j)} * x{p}" for p, j in enumerate(passive))
        lines.append(f"    if b{i} - sum(({terms},)) > tolerance:")
        lines.append("        return None")
    position = {index: p for p, index in enumerate(passive)}
    values = ", ".join(f"x{position[i]} / s{i}" if i in position else f"0.0 / s{i}" for i in range(n))
    lines.append(f"    return [{values}]")
    scope: dict[str, object] = {"sqrt": math.sqrt, "LinAlgError": np.linalg.LinAlgError}
    exec("\n".join(lines), scope)
    return scope["hinted"]  # type: ignore[return-value]


_Scaler = Callable[..., tuple[list[float], list[float], list[float]]]


@functools.cache
def jacobi_scaler(n: int, *, guarded: bool = False, summed: bool = False) -> _Scaler:
    """scale(m, r) -> (s, scaled m, scaled r) of a packed n x n system m x = r: s_i = sqrt(m_ii), the matrix's
    entries divided by s_i s_j, the right-hand side's by s_i. `guarded`: s_i = 1 where m_ii is not positive.
    `summed`: the system is the sum of two, scale(m, m2, r, r2), added entry by entry first. The comprehensions
    `nnls_gram` and the calibrator spelled this as, as straight-line code: the same results, bit for bit."""
    lines = [f"def scale(m, {'m2, r, r2' if summed else 'r'}):"]
    for k in range(n * (n + 1) // 2):
        lines.append(f"    a{k} = m[{k}]{f' + m2[{k}]' if summed else ''}")
    for i in range(n):
        d = packed_index(i, i)
        lines.append(f"    s{i} = sqrt(a{d}){f' if a{d} > 0 else 1.0' if guarded else ''}")
    scales = ", ".join(f"s{i}" for i in range(n))
    entries = ", ".join(f"a{packed_index(i, j)} / (s{i} * s{j})" for i in range(n) for j in range(i + 1))
    rhs = ", ".join(f"(r[{i}]{f' + r2[{i}]' if summed else ''}) / s{i}" for i in range(n))
    lines.append(f"    return [{scales}], [{entries}], [{rhs}]")
    scope: dict[str, object] = {"sqrt": math.sqrt}
    exec("\n".join(lines), scope)
    return scope["scale"]  # type: ignore[return-value]
