"""Reductions over examples that can be computed in pieces: ``mean + k·std`` from its moments.

``reduction="mean"`` and ``"sum"`` stream a running sum and a count; ``"none"`` and an arbitrary
callable need every per-example row. :class:`MeanPlusStd` is the mean + k·std reduction the
Shapley pruning paper found best, as an object whose result follows from the *moments* of the
scores (count, mean, sum of squared deviations), so it streams like ``"mean"`` and the moments of
several shards (batches, or the ranks of a distributed run) combine exactly without the rows.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

__all__ = ["MeanPlusStd", "Moments"]


@dataclass
class Moments:
    """Count, mean and sum of squared deviations from the mean (per unit) of some rows.

    Two sets of moments merge exactly (Chan, Golub and LeVeque's pairwise update), which is
    stabler than a sum of squares."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray) -> Moments:
        """The moments of an ``[examples, units]`` array (float64)."""
        rows = np.asarray(rows, dtype=np.float64)
        mean = rows.mean(axis=0)
        return cls(count=int(rows.shape[0]), mean=mean, m2=((rows - mean) ** 2).sum(axis=0))

    def merge(self, other: Moments) -> Moments:
        """The moments of the rows of both."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / count)
        return Moments(count=count, mean=mean, m2=m2)


def _is_real(value: object) -> bool:
    """A real number (numpy scalars included) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integral(value: object) -> bool:
    """An integer (numpy scalars included) that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class MeanPlusStd:
    """The reduction ``mean + k · std`` over examples, per unit.

    ``MeanPlusStd(2.0)(s)`` equals ``s.mean(0) + 2 * s.std(0)`` (numpy's population std,
    ``ddof=0``), so it can be passed wherever a reduction callable is accepted; unlike an
    arbitrary callable it keeps only the moments of the scores while streaming, and the moments of
    several shards combine exactly.

    Args:
        k: the weight of the standard deviation (a real number; 2 in the Shapley pruning paper).
        ddof: delta degrees of freedom of the std (0: population, 1: sample std).
    """

    def __init__(self, k: float = 2.0, ddof: int = 0) -> None:
        if not _is_real(k) or not np.isfinite(k):
            raise TypeError(f"k must be a finite real number, got {k!r}")
        if not _is_integral(ddof) or ddof < 0:
            raise ValueError(f"ddof must be a non-negative int, got {ddof!r}")
        self.k = float(k)
        self.ddof = int(ddof)

    def __call__(self, per_example: np.ndarray) -> np.ndarray:
        return self.from_moments(Moments.of(per_example))

    def from_moments(self, moments: Moments) -> np.ndarray:
        """The reduction of the rows that ``moments`` describe."""
        dof = moments.count - self.ddof
        variance = moments.m2 / dof if dof > 0 else np.full_like(moments.m2, np.nan)
        return moments.mean + self.k * np.sqrt(np.maximum(variance, 0.0))

    def __repr__(self) -> str:
        return f"MeanPlusStd(k={self.k:g}" + (f", ddof={self.ddof})" if self.ddof else ")")
