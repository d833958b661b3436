"""The cost model's fitted forms and their least-squares fits, in pure Python.

``LinearFit`` is DistServe's form, seconds = a + b·x + c·y (prefill: new tokens and
attention work; decode: batch size and context tokens); ``TransferFit`` is latency plus
bytes over bandwidth. Both are fitted by non-negative least squares: a step never gets
cheaper with more work, and a negative coefficient fitted to noise would predict that.

The fit weighs each sample by 1/seconds², so it minimizes relative error: the samples span
three orders of magnitude (a 16-token prompt to a full 2048-token step), and an absolute fit
would leave the short steps, which most requests are, off by their whole size. With three
unknowns the exact non-negative solution is cheap to find by brute force: the unconstrained
least-squares solution on every subset of the coefficients (the others held at zero), the
best one whose coefficients are all non-negative (the NNLS optimum is one of them).
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MAX_BYTES_PER_S = 1e15  # a transfer fit without any per-byte cost: bandwidth this high
_MIN_SECONDS = 1e-9  # floor of a sample's time in its weight (1 / seconds²)


@dataclass(frozen=True)
class LinearFit:
    """seconds = a + b·x + c·y."""

    a: float
    b: float
    c: float

    def __call__(self, x: float, y: float) -> float:
        return self.a + self.b * x + self.c * y


@dataclass(frozen=True)
class TransferFit:
    """seconds = latency_s + bytes / bytes_per_s."""

    latency_s: float
    bytes_per_s: float

    def __post_init__(self) -> None:
        if self.latency_s < 0 or not self.bytes_per_s > 0:
            raise ValueError(f"TransferFit needs latency >= 0 and bandwidth > 0, got "
                             f"{self.latency_s}, {self.bytes_per_s}")

    def __call__(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


def nnls(features: Sequence[Sequence[float]], targets: Sequence[float],
         weights: Sequence[float]) -> list[float]:
    """Non-negative coefficients ``w`` minimizing Σ weights·(features·w - targets)².

    Every subset of the columns is solved unconstrained (normal equations, Gaussian
    elimination); the best all-non-negative solution wins. Columns are scaled to a maximum
    of 1 first (attention work reaches millions where the constant is 1), and a subset whose
    system is singular (a column that never varies, or duplicates another) is skipped.
    """
    if not features or len(features) != len(targets) or len(targets) != len(weights):
        raise ValueError("nnls needs as many targets and weights as feature rows, at least 1")
    k = len(features[0])
    scale = [max(abs(row[j]) for row in features) or 1.0 for j in range(k)]
    rows = [[row[j] / scale[j] for j in range(k)] for row in features]

    def residual(coef: list[float]) -> float:
        return sum(w * (sum(r[j] * coef[j] for j in range(k)) - t) ** 2
                   for r, t, w in zip(rows, targets, weights, strict=True))

    best, best_res = [0.0] * k, residual([0.0] * k)
    for size in range(1, k + 1):
        for cols in itertools.combinations(range(k), size):
            sol = _weighted_lstsq(rows, targets, weights, cols)
            if sol is None or any(v < 0 for v in sol):
                continue
            coef = [0.0] * k
            for j, v in zip(cols, sol, strict=True):
                coef[j] = v
            res = residual(coef)
            if res < best_res:
                best, best_res = coef, res
    return [c / s for c, s in zip(best, scale, strict=True)]


def _weighted_lstsq(rows: Sequence[Sequence[float]], targets: Sequence[float],
                    weights: Sequence[float], cols: Sequence[int]) -> list[float] | None:
    """The weighted least-squares solution on columns ``cols``, or None if singular."""
    n = len(cols)
    m = [[0.0] * (n + 1) for _ in range(n)]  # [X'WX | X'Wt]
    for r, t, w in zip(rows, targets, weights, strict=True):
        x = [r[j] for j in cols]
        for i in range(n):
            wx = w * x[i]
            for j in range(n):
                m[i][j] += wx * x[j]
            m[i][n] += wx * t
    top = max(abs(m[i][i]) for i in range(n))
    if top == 0.0:
        return None
    for i in range(n):  # elimination with partial pivoting
        p = max(range(i, n), key=lambda row: abs(m[row][i]))
        if abs(m[p][i]) <= 1e-12 * top:
            return None
        m[i], m[p] = m[p], m[i]
        for below in range(i + 1, n):
            f = m[below][i] / m[i][i]
            for j in range(i, n + 1):
                m[below][j] -= f * m[i][j]
    sol = [0.0] * n
    for i in reversed(range(n)):
        sol[i] = (m[i][n] - sum(m[i][j] * sol[j] for j in range(i + 1, n))) / m[i][i]
    return sol


def _relative_weights(seconds: Sequence[float]) -> list[float]:
    return [1.0 / max(s, _MIN_SECONDS) ** 2 for s in seconds]


def fit_linear(samples: Sequence[Sequence[float]]) -> LinearFit:
    """Non-negative a, b, c of seconds = a + b·x + c·y from rows (x, y, seconds)."""
    if not samples:
        raise ValueError("fit_linear needs at least one sample")
    secs = [float(r[2]) for r in samples]
    a, b, c = nnls([(1.0, float(r[0]), float(r[1])) for r in samples], secs,
                   _relative_weights(secs))
    return LinearFit(a, b, c)


def fit_transfer(samples: Sequence[Sequence[float]]) -> TransferFit:
    """Latency and bandwidth from rows (bytes, seconds); a fit without any per-byte cost gets
    ``MAX_BYTES_PER_S``."""
    if not samples:
        raise ValueError("fit_transfer needs at least one sample")
    secs = [float(r[1]) for r in samples]
    latency, per_byte = nnls([(1.0, float(r[0])) for r in samples], secs,
                             _relative_weights(secs))
    return TransferFit(latency, 1.0 / per_byte if per_byte > 1.0 / MAX_BYTES_PER_S
                       else MAX_BYTES_PER_S)


def median_relative_error(predict: Callable[..., float],
                          samples: Sequence[Sequence[float]]) -> float:
    """Median |predicted - measured| / measured over rows (inputs..., seconds): a fit's
    quality as ``pdserve profile`` prints it."""
    errors = [abs(predict(*r[:-1]) - r[-1]) / max(r[-1], _MIN_SECONDS) for r in samples]
    return statistics.median(errors) if errors else 0.0
