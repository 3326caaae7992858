"""The convergence study of ``benchmarks/shapley_convergence.py``, on a model small enough for exact
Shapley values: its measures are right, and the standard error the metric reports matches both
the spread of the scores over seeds and their distance from the exact values."""

from __future__ import annotations

import importlib
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchpruner.attributions import ShapleyAttributionMetric

pytest.importorskip("scipy")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("shapley_convergence")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def tiny():
    """Linear 5 → ReLU (6 units, the players) → linear 3, and 64 examples in two batches."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(64, 5)
    y = torch.randint(0, 3, (64,))
    return model, [(x[:32], y[:32]), (x[32:], y[32:])], x, y


def exact_shapley(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Shapley values of the hidden units in ``v(S) = −mean loss`` with the units outside S
    zeroed, by enumerating every coalition, in float64."""
    first, last = model[0].double(), model[2].double()
    try:
        with torch.no_grad():
            hidden = torch.relu(first(x.double()))
            units = hidden.shape[1]

            def value(coalition: tuple[int, ...]) -> float:
                mask = torch.zeros(units, dtype=torch.float64)
                mask[list(coalition)] = 1
                return -float(F.cross_entropy(last(hidden * mask), y))

            values = {s: value(s) for r in range(units + 1) for s in itertools.combinations(range(units), r)}
    finally:
        model.float()
    phi = np.zeros(units)
    for c in range(units):
        for coalition, v in values.items():
            if c in coalition:
                continue
            weight = math.factorial(len(coalition)) * math.factorial(units - len(coalition) - 1) / math.factorial(units)
            phi[c] += weight * (values[tuple(sorted(coalition + (c,)))] - v)
    return phi


def test_bottom_overlap_and_rank_correlation(study):
    reference = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert study.bottom_overlap(reference, reference) == 1.0
    assert study.bottom_overlap(-reference, reference) == 0.0
    # the bottom quarter is units 0 and 1; the estimate puts unit 2 before unit 1
    assert study.bottom_overlap(np.array([0.0, 2.5, 1.0, 3, 4, 5, 6, 7]), reference) == 0.5
    assert study.rank_correlation(reference**3, reference) == pytest.approx(1.0)
    assert study.rank_correlation(-reference, reference) == pytest.approx(-1.0)
    assert math.isnan(study.rank_correlation(np.zeros(8), reference))


def test_stderr_matches_spread_over_seeds_and_error_from_exact_values(study, tiny):
    model, data, x, y = tiny
    exact = exact_shapley(model, x, y)
    rows = study.convergence(model, data, model[1], "hidden", exact, samples=(1, 2, 4, 32), seeds=30)
    plain = [r for r in rows if not r.antithetic]
    anti = [r for r in rows if r.antithetic]
    assert [r.samples for r in plain] == [1, 2, 4, 32]
    assert [r.samples for r in anti] == [2, 4, 32]  # antithetic n = 1 is n = 2, left out
    for r in plain[1:] + anti[1:]:
        # the reported standard error is the spread over seeds (a factor √2 off would show) ...
        assert 0.8 < r.stderr_over_spread < 1.3, r
    for r in plain[2:] + anti[1:]:
        # ... and, the reference being exact, the distance from the truth
        assert 0.7 < r.error_over_range / r.stderr_over_range < 1.45, r
    assert math.isnan(plain[0].stderr_over_spread) and math.isnan(anti[0].stderr_over_spread)
    # more orderings: closer to the exact values, in rank too
    assert plain[-1].error_over_range < plain[1].error_over_range / 3
    assert plain[-1].spearman > plain[0].spearman and plain[-1].spearman > 0.9
    assert plain[-1].bottom_overlap >= plain[0].bottom_overlap


def test_a_row_is_what_the_metric_reports(study, tiny):
    """A row is built from plain ``run(..., return_stderr=True)`` calls, seeds 0 .. seeds − 1."""
    model, data, x, y = tiny
    reference = exact_shapley(model, x, y)
    (row,) = study.convergence(model, data, model[1], "hidden", reference, samples=(3,), seeds=2, modes=(False,))
    runs = [
        ShapleyAttributionMetric(model, data, F.cross_entropy, "cpu", sv_samples=3, seed=s).run(
            model[1], return_stderr=True
        )
        for s in range(2)
    ]
    estimates = np.stack([scores for scores, _ in runs])
    spread = np.ptp(reference)
    assert row.samples == 3
    assert row.stderr_over_range == pytest.approx(np.mean([stderr for _, stderr in runs]) / spread)
    assert row.error_over_range == pytest.approx(np.sqrt(np.mean((estimates - reference) ** 2)) / spread)
    assert row.stderr_over_spread == pytest.approx(
        np.sqrt(np.mean([stderr**2 for _, stderr in runs]) / estimates.var(axis=0, ddof=1).mean())
    )


def test_refuses_what_it_cannot_measure(study, tiny):
    model, data, _, _ = tiny
    with pytest.raises(ValueError, match="seeds must be at least 2"):
        study.convergence(model, data, model[1], "hidden", np.arange(6.0), seeds=1)
    with pytest.raises(ValueError, match="all equal"):
        study.convergence(model, data, model[1], "hidden", np.zeros(6), seeds=2)
