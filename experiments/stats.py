"""Small statistics for the studies' tables, in numpy only: a t-interval for a mean, a percentile
bootstrap interval, and the exact two-sided sign test.

- :func:`mean_ci`: mean and the Student-t confidence interval over independent replicates (trained
  models). The t quantile comes from integrating the t density (Simpson's rule) and bisecting its
  distribution function; it is exact to far more digits than a table prints.
- :func:`bootstrap_ci`: the percentile interval of the mean of paired differences, resampling the
  pairs with replacement from a seeded generator (the same seed always gives the same interval).
- :func:`sign_test`: the exact two-sided binomial test that positive and negative differences are
  equally likely; zero differences carry no sign and are dropped.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

SIMPSON_INTERVALS = 4000  # even; the t density is smooth, so this is exact to ~1e-12 on [0, q]


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if x == 0:
        return 0.5
    grid = np.linspace(0.0, abs(x), SIMPSON_INTERVALS + 1)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
    weights = np.ones_like(grid)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    half = float(weights @ density) * (grid[1] - grid[0]) / 3.0
    return 0.5 + half if x > 0 else 0.5 - half


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection of :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(80):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean of independent ``values``.

    One value has no spread to estimate: its interval is (nan, nan).
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("mean_ci needs at least one value")
    _check_level(level)
    mean = float(values.mean())
    if values.size == 1:
        return mean, float("nan"), float("nan")
    half = t_quantile(0.5 + level / 2, values.size - 1) * float(values.std(ddof=1)) / math.sqrt(values.size)
    return mean, mean - half, mean + half


def bootstrap_ci(values, level: float = 0.95, resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval (low, high) of the mean of ``values``.

    ``resamples`` resamples of the values with replacement, drawn from ``numpy.random.default_rng(seed)``.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    _check_level(level)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    low, high = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class SignTest:
    """The exact two-sided sign test of paired differences."""

    negative: int  # differences below zero
    positive: int  # differences above zero
    p_value: float

    @property
    def pairs(self) -> int:
        """Differences with a sign (zeros are dropped)."""
        return self.negative + self.positive


def binomial_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exactly (integer arithmetic, one division)."""
    if n < 0 or k < 0:
        raise ValueError(f"binomial_tail needs k, n >= 0, got k={k}, n={n}")
    return sum(math.comb(n, i) for i in range(min(k, n) + 1)) / 2**n


def sign_test(differences) -> SignTest:
    """Two-sided exact sign test: p = P(a Binomial(n, 1/2) count is at least as far from n/2 as the
    observed one), n the number of non-zero differences; p = 1 when no difference has a sign."""
    differences = np.asarray(differences, dtype=np.float64).reshape(-1)
    if np.isnan(differences).any():
        raise ValueError("sign_test got a NaN difference")
    negative, positive = int((differences < 0).sum()), int((differences > 0).sum())
    n = negative + positive
    p_value = 1.0 if n == 0 else min(1.0, 2.0 * binomial_tail(min(negative, positive), n))
    return SignTest(negative, positive, p_value)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"a confidence level is between 0 and 1, got {level}")
