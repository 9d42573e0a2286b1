"""The per-placement predictor behind steering: three online ridge regressions sharing one decayed design matrix.

Pure Python (no numpy): the systems are 4x4, solved by Gauss-Jordan elimination in microseconds.  Used by
:class:`~helios_ray.control.steering.Steering`, one instance per placement key ``model@depth``.
"""

from __future__ import annotations

import math
from collections import deque
ERROR_WINDOW = 100     # prediction errors per placement behind the reported mean absolute error


def _invert(matrix: list[list[float]]) -> list[list[float]]:
    """Gauss-Jordan inverse with partial pivoting (the matrix is symmetric positive definite: ridge > 0)."""
    n = len(matrix)
    aug = [row[:] + [1.0 if i == j else 0.0 for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(aug[r][col]))
        aug[col], aug[pivot] = aug[pivot], aug[col]
        p = aug[col][col]
        aug[col] = [v / p for v in aug[col]]
        for r in range(n):
            if r != col and aug[r][col] != 0.0:
                f = aug[r][col]
                aug[r] = [a - f * b for a, b in zip(aug[r], aug[col])]
    return [row[n:] for row in aug]


def _matvec(m: list[list[float]], v: list[float]) -> list[float]:
    return [sum(a * b for a, b in zip(row, v)) for row in m]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


class PlacementModel:
    """Three ridge regressions (breach rate, exit fraction, log tokens/s) sharing one decayed design matrix.

    A = ridge*I + S with S = decay*S + x x^T; b_t = decay*b_t + y_t x.  The prior is centred on the placement's
    own decayed mean of each target (on the intercept), not on 0, so shrinkage does not pull tokens/s towards
    exp(0) = 1 for a placement seen only a few times; the prior itself never decays, so A stays invertible.
    """

    def __init__(self, dim: int, ridge: float, decay: float) -> None:
        self.ridge, self.decay = ridge, decay
        self.s = [[0.0] * dim for _ in range(dim)]
        self.b = [[0.0] * dim for _ in range(3)]
        self.weight = 0.0
        self.sums = [0.0, 0.0, 0.0]
        self.n: dict[str, int] = {}
        self.by_kind: dict[str, list[float]] = {}  # kind -> decayed [weight, breach rate, tokens/s, value] sums
        self.errors: deque[tuple[float, float, float]] = deque(maxlen=ERROR_WINDOW)
        self._inv: list[list[float]] | None = None
        self._w: list[list[float]] | None = None

    def update(self, x: list[float], targets: tuple[float, float, float], kind: str) -> None:
        d = self.decay
        for i, xi in enumerate(x):
            row = self.s[i]
            for j, xj in enumerate(x):
                row[j] = d * row[j] + xi * xj
        for t, y in enumerate(targets):
            self.b[t] = [d * bi + y * xi for bi, xi in zip(self.b[t], x)]
            self.sums[t] = d * self.sums[t] + y
        self.weight = d * self.weight + 1.0
        self.n[kind] = self.n.get(kind, 0) + 1
        tps = math.exp(targets[2])
        obs = self.by_kind.setdefault(kind, [0.0, 0.0, 0.0, 0.0])
        for i, y in enumerate((1.0, targets[0], tps, tps * (1.0 - targets[0]))):
            obs[i] = d * obs[i] + y
        self._inv = self._w = None

    def _solve(self) -> tuple[list[list[float]], list[list[float]]]:
        if self._inv is None or self._w is None:
            r = self.ridge
            a = [[v + (r if i == j else 0.0) for j, v in enumerate(row)] for i, row in enumerate(self.s)]
            self._inv = _invert(a)
            self._w = []
            for t in range(3):
                mean = self.sums[t] / self.weight if self.weight > 0 else 0.0
                rhs = self.b[t][:]
                rhs[0] += r * mean
                self._w.append(_matvec(self._inv, rhs))
        return self._inv, self._w

    def predict(self, x: list[float]) -> tuple[float, float, float, float]:
        """(breach rate, exit fraction, tokens/s, uncertainty) for features ``x``."""
        inv, w = self._solve()
        unc = math.sqrt(max(0.0, _dot(x, _matvec(inv, x))))
        breach = min(1.0, max(0.0, _dot(w[0], x)))
        exit_frac = min(1.0, max(0.0, _dot(w[1], x)))
        tps = math.exp(min(50.0, _dot(w[2], x)))
        return breach, exit_frac, tps, unc
