"""Truncated Shapley sampling (``truncation_tolerance=``) against a hand-computed game.

The oracle model makes the game explicit: unit c of the evaluation point carries ``x · w_c``
(a bias-free ``Linear(1, U)``), the output is the sum of the active units clamped to
``[-cap, cap]``, and the loss is ``|output − target|``. So ``ℓ(S) = |clamp(x · Σ_{c∈S} w_c) −
target|`` is known in closed form, and the truncated estimate is computed here by a plain loop
over the same orderings (``draw_permutations`` with the run's seed).

* with a loss that saturates after k units, truncating at tolerance 0 changes nothing (the units
  after saturation have zero marginals anyway), and a larger tolerance stops every ordering where
  the hand count says;
* where the loss reaches the full model's loss and later moves away and back, truncation drops
  those marginals (the documented bias);
* fast (incremental walk and suffix) and reference give the same truncated scores, also on a CNN;
* truncation skips evaluations (fewer forward passes, fewer stacked rows); bad values are refused.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_attributions_shapley_fast import cnn
from torchpruner.attributions import ShapleyAttributionMetric
from torchpruner.attributions.methods.shapley import draw_permutations

DTYPE = torch.float64


class ExplicitGame(nn.Module):
    def __init__(self, weights: list[float], cap: float) -> None:
        super().__init__()
        self.units = nn.Linear(1, len(weights), bias=False)
        self.total = nn.Linear(len(weights), 1, bias=False)
        self.clamp = nn.Hardtanh(-cap, cap)
        with torch.no_grad():
            self.units.weight.copy_(torch.tensor(weights)[:, None])
            self.total.weight.fill_(1.0)

    def forward(self, x):
        return self.clamp(self.total(self.units(x)))


def game_data(scales, target_of):
    x = torch.tensor(scales, dtype=DTYPE)[:, None]
    y = torch.tensor([target_of(s) for s in scales], dtype=DTYPE)[:, None]
    return [(x[:2], y[:2]), (x[2:], y[2:])]


def hand_truncated(weights, cap, scales, target_of, orders, tolerance):
    """The truncated per-example estimate ``[N, U]`` by a plain loop over the game."""
    loss = lambda coalition, s: abs(max(-cap, min(cap, s * sum(weights[c] for c in coalition))) - target_of(s))
    phi = np.zeros((len(scales), len(weights)))
    for n, s in enumerate(scales):
        full = loss(range(len(weights)), s)
        for order in orders:
            coalition: list[int] = []
            for unit in order:
                if tolerance is not None and abs(loss(coalition, s) - full) <= tolerance:
                    break  # this unit and the rest of the ordering: zero marginal
                before = loss(coalition, s)
                coalition.append(unit)
                phi[n, unit] += before - loss(coalition, s)  # v = −ℓ
    return phi / len(orders)


def truncated_scores(model, data, algorithm, tolerance, incremental=True, samples=6, seed=3, **options):
    metric = ShapleyAttributionMetric(
        model,
        data,
        F.l1_loss,
        "cpu",
        reduction="none",
        sv_samples=samples,
        seed=seed,
        algorithm=algorithm,
        incremental=incremental,
        truncation_tolerance=tolerance,
        **options,
    )
    scores = metric.run(model.units)
    return scores, metric.last_path


ALGORITHMS = [("reference", True, "reference"), ("fast", True, "incremental"), ("fast", False, "suffix")]


@pytest.mark.parametrize("algorithm, incremental, path", ALGORITHMS)
def test_a_saturating_loss_truncates_where_the_hand_count_says(algorithm, incremental, path):
    weights, cap = [1.0] * 6, 3.0  # the output saturates once 3 units are on: ℓ(S) = 3 − min(|S|, 3)
    target = lambda s: 3.0
    scales = [1.0, 1.0, 1.0, 1.0]
    data = game_data(scales, target)
    model = ExplicitGame(weights, cap).to(DTYPE)
    orders = [p.tolist() for p in draw_permutations(6, 6, seed=3)]
    plain, used = truncated_scores(model, data, algorithm, None, incremental)
    assert used == path
    exact, _ = truncated_scores(model, data, algorithm, 0.0, incremental)
    np.testing.assert_array_equal(exact, plain)  # saturation: truncating at 0 is exact
    # tolerance 1.5: an ordering stops once the loss is ≤ 1.5, i.e. after its first 2 units
    stopped, _ = truncated_scores(model, data, algorithm, 1.5, incremental)
    by_hand = np.zeros(6)
    for order in orders:
        by_hand[order[:2]] += 1.0 / len(orders)
    np.testing.assert_allclose(stopped, np.tile(by_hand, (4, 1)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stopped, hand_truncated(weights, cap, scales, target, orders, 1.5), atol=1e-12)
    np.testing.assert_allclose(stopped.sum(1), 2.0, atol=1e-12)  # ℓ(∅) − ℓ(first 2 units), not ℓ(∅) − ℓ(all)


@pytest.mark.parametrize("algorithm, incremental, path", ALGORITHMS)
def test_truncation_drops_the_marginals_after_the_loss_first_reaches_the_full_loss(algorithm, incremental, path):
    # ℓ(S) = |x·Σ_S w − x·Σ w|: unit 0 alone already gives the full loss (0); units 1 and 2 cancel
    weights, cap = [2.0, 1.0, -1.0, 0.5], 100.0
    target = lambda s: s * 2.5
    scales = [1.0, 2.0, 1.0, 3.0]
    data = game_data(scales, target)
    model = ExplicitGame(weights, cap).to(DTYPE)
    orders = [p.tolist() for p in draw_permutations(4, 8, seed=1)]
    assert any(order.index(0) < order.index(1) for order in orders)  # some ordering truncates before unit 1
    plain, _ = truncated_scores(model, data, algorithm, None, incremental, samples=8, seed=1)
    np.testing.assert_allclose(plain, hand_truncated(weights, cap, scales, target, orders, None), atol=1e-12)
    for tolerance in (0.0, 0.75, 1.2):
        scores, used = truncated_scores(model, data, algorithm, tolerance, incremental, samples=8, seed=1)
        assert used == path
        expected = hand_truncated(weights, cap, scales, target, orders, tolerance)
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)
    assert not np.allclose(scores, plain)  # the bias is real


@pytest.mark.parametrize("index", [0, 2, 6])
@pytest.mark.parametrize("incremental", [True, False])
def test_fast_and_reference_truncate_alike_on_a_cnn(index, incremental):
    model = cnn()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 1, 8, 8, generator=g, dtype=DTYPE), torch.randint(0, 3, (10,), generator=g)
    data = [(x[i : i + 5], y[i : i + 5]) for i in (0, 5)]
    run = lambda algorithm, tolerance, **kw: ShapleyAttributionMetric(
        model,
        data,
        F.cross_entropy,
        "cpu",
        reduction="none",
        sv_samples=4,
        seed=2,
        algorithm=algorithm,
        truncation_tolerance=tolerance,
        **kw,
    ).run(model[index], True)
    plain = run("reference", None)
    reference = run("reference", 0.02)
    fast = run("fast", 0.02, incremental=incremental, max_batch_elements=200)
    np.testing.assert_allclose(fast, reference, rtol=1e-8, atol=1e-12)
    assert not np.allclose(reference, plain)  # some ordering was truncated


class RowCounter:
    """Counts the rows (examples × stacked coalitions) a module is run on."""

    def __init__(self, module: nn.Module) -> None:
        self.rows = 0
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.rows += inputs[0].shape[0]
        self.calls += 1


@pytest.mark.parametrize("algorithm, incremental", [("reference", True), ("fast", True)])
def test_truncation_skips_the_rest_of_an_ordering(algorithm, incremental):
    weights, cap = [1.0] * 8, 2.0  # saturates after 2 of 8 units
    data = game_data([1.0] * 4, lambda s: 2.0)
    counts = {}
    for tolerance in (None, 0.0):
        model = ExplicitGame(weights, cap).to(DTYPE)  # a new model: each run captures its graph
        counter = RowCounter(model.clamp)
        try:
            # a small budget: 2 coalitions per stacked evaluation, so the walk can stop early
            truncated_scores(model, data, algorithm, tolerance, incremental, samples=3, max_batch_elements=4)
        finally:
            counter.handle.remove()
        counts[tolerance] = counter.rows
    # 2 batches of 2 examples, 3 orderings of 8 units: 3 · 9 coalitions without truncation; with it
    # (every ordering saturates at step 2) the reference runs the full coalition once and 3 per
    # ordering (the capture of the graph runs the model once more, on 2 rows, in both runs)
    if algorithm == "reference":
        assert (counts[None], counts[0.0]) == (2 + 2 * 2 * 3 * 9, 2 + 2 * 2 * (1 + 3 * 3))
    else:
        # the budget holds one example's walk at a time (8 units × 1 element > 4), 4 coalitions per
        # stacked evaluation; the first batch checks the empty and full coalition on the whole
        # model (4 rows). Per example: the empty coalition and 3 · 8 steps; truncated: the empty
        # and the full coalition, and 3 · 4 steps (the first stacked evaluation of each ordering
        # reaches the full loss, the second is skipped)
        assert (counts[None], counts[0.0]) == (2 + 4 + 4 * (1 + 3 * 8), 2 + 4 + 4 * (2 + 3 * 4))


@pytest.mark.parametrize("bad", [-0.1, math.nan, True, "0.1"])
def test_a_bad_truncation_tolerance_is_refused_by_name(bad):
    model = ExplicitGame([1.0, 1.0], 1.0).to(DTYPE)
    data = game_data([1.0, 1.0, 1.0], lambda s: 1.0)
    with pytest.raises(ValueError, match="truncation_tolerance"):
        truncated_scores(model, data, "fast", bad)
