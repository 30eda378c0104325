"""Non-negative least squares for a handful of coefficients, and how well a fit matches.

Pure Python (`mars.sim` imports only the standard library). With at most a few coefficients the
exact NNLS optimum is found by brute force over active sets: for every subset of the columns solve
the unconstrained least-squares problem on it, keep the solutions with no negative coefficient and
return the one with the smallest residual (the optimum's support is one of those subsets, and on
its support the optimum is the unconstrained solution). 2^5 = 32 small solves for a step-time fit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

MAX_COLUMNS = 8  # 256 subsets: far more than a step-time model needs


@dataclass(frozen=True)
class FitQuality:
    """How well predictions match measurements."""

    r2: float  # 1 - SS_res / SS_tot on the seconds themselves (1.0 = perfect)
    mean_abs_pct_error: float  # mean of |predicted - measured| / measured, in percent
    max_abs_pct_error: float  # the worst shape's error, in percent
    points: int  # measurements compared


def nnls(
    rows: Sequence[Sequence[float]],
    targets: Sequence[float],
    weights: Sequence[float] | None = None,
) -> list[float]:
    """x >= 0 minimising sum_i w_i * (rows[i] . x - targets[i])^2 (w_i = 1 without weights)."""
    if not rows or len(rows) != len(targets):
        raise ValueError(f"need one target per row, got {len(rows)} rows, {len(targets)} targets")
    n = len(rows[0])
    if not 1 <= n <= MAX_COLUMNS or any(len(r) != n for r in rows):
        raise ValueError(f"every row needs the same 1..{MAX_COLUMNS} columns")
    w = list(weights) if weights is not None else [1.0] * len(rows)
    if len(w) != len(rows) or any(not (math.isfinite(x) and x > 0) for x in w):
        raise ValueError("weights must be positive numbers, one per row")
    # Scale every column to unit weighted norm so that seconds-per-pair and seconds-per-step
    # coefficients, 1e6 apart, meet the solver on equal terms.
    norms = [
        math.sqrt(sum(wi * r[j] * r[j] for wi, r in zip(w, rows, strict=True))) for j in range(n)
    ]
    scale = [1.0 / s if s > 0 else 0.0 for s in norms]
    a = [[r[j] * scale[j] for j in range(n)] for r in rows]
    best: list[float] = [0.0] * n
    best_res = _residual(a, targets, w, best)
    for size in range(1, n + 1):
        for cols in itertools.combinations([j for j in range(n) if scale[j] > 0], size):
            sol = _least_squares(a, targets, w, cols)
            if sol is None or min(sol) < 0:
                continue
            x = [0.0] * n
            for j, v in zip(cols, sol, strict=True):
                x[j] = v
            res = _residual(a, targets, w, x)
            if res < best_res * (1 - 1e-12):
                best, best_res = x, res
    return [x * s for x, s in zip(best, scale, strict=True)]


def quality(predicted: Sequence[float], measured: Sequence[float]) -> FitQuality:
    """R² and percentage errors of `predicted` against `measured` (all measured > 0)."""
    if not measured or len(predicted) != len(measured) or min(measured) <= 0:
        raise ValueError("need one prediction per measurement, every measurement > 0")
    mean = sum(measured) / len(measured)
    ss_tot = sum((y - mean) ** 2 for y in measured)
    ss_res = sum((p - y) ** 2 for p, y in zip(predicted, measured, strict=True))
    pct = [abs(p - y) / y * 100 for p, y in zip(predicted, measured, strict=True)]
    return FitQuality(
        r2=1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0),
        mean_abs_pct_error=sum(pct) / len(pct),
        max_abs_pct_error=max(pct),
        points=len(pct),
    )


def _residual(
    a: Sequence[Sequence[float]], b: Sequence[float], w: Sequence[float], x: Sequence[float]
) -> float:
    return sum(
        wi * (sum(r[j] * x[j] for j in range(len(x))) - bi) ** 2
        for r, bi, wi in zip(a, b, w, strict=True)
    )


def _least_squares(
    a: Sequence[Sequence[float]], b: Sequence[float], w: Sequence[float], cols: Sequence[int]
) -> list[float] | None:
    """Weighted least squares on the columns `cols` (normal equations); None if singular."""
    k = len(cols)
    m = [[0.0] * (k + 1) for _ in range(k)]
    for r, bi, wi in zip(a, b, w, strict=True):
        for p in range(k):
            rp = wi * r[cols[p]]
            for q in range(k):
                m[p][q] += rp * r[cols[q]]
            m[p][k] += rp * bi
    return _solve(m)


def _solve(m: list[list[float]]) -> list[float] | None:
    """Gauss-Jordan with partial pivoting on an augmented k x (k+1) matrix, in place."""
    k = len(m)
    for c in range(k):
        pivot = max(range(c, k), key=lambda r: abs(m[r][c]))
        # Columns have unit norm, so a pivot this small means they are (nearly) collinear.
        if abs(m[pivot][c]) < 1e-10:
            return None
        m[c], m[pivot] = m[pivot], m[c]
        for r in range(k):
            if r != c:
                f = m[r][c] / m[c][c]
                for q in range(c, k + 1):
                    m[r][q] -= f * m[c][q]
    return [m[r][k] / m[r][r] for r in range(k)]
