"""Non-negative least squares: argmin ||A x - b|| subject to x >= 0.

Lawson and Hanson's active-set method ("Solving Least Squares Problems", 1974, chapter 23), the algorithm
behind `scipy.optimize.nnls`, written here so the cost model needs numpy only. The problems it serves are tiny
(at most 5 columns), so clarity wins over speed.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


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
