"""Fast Shapley (prefix once, suffix per coalition, incremental walk) against the reference.

* the fast and the reference algorithm give the same scores from the same ``seed`` (they draw the
  same orderings), on layers and on coupled groups (residual stream, concatenation), through the
  incremental walk and the suffix evaluation, with every ``reduction``, in float64 and float32;
* each ordering telescopes to ℓ(no unit) − ℓ(all units) and the estimate converges to brute force;
* the standard error matches the spread of the estimate over seeds; antithetic pairs; the
  adaptive mode stops where it says.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_attributions_groups import ConcatNet, ResidualNet, model_groups, randomize_batchnorms
from torchpruner.attributions import ShapleyAttributionMetric
from torchpruner.attributions.methods.shapley import Orderings, draw_permutations

DTYPE = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def batches(x, y, size=5):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def data(shape, n=10, classes=3, seed=0, dtype=DTYPE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + tuple(shape), generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def mlp(dtype=DTYPE):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def cnn(dtype=DTYPE):
    """conv -> ReLU -> conv -> ReLU -> max-pool -> flatten -> linear -> ReLU -> linear (the digits CNN, small)."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 16, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).to(dtype)


def bn_net():
    """The evaluation point feeds a BatchNorm: no incremental walk, the suffix is evaluated."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)
    ).to(DTYPE)
    return randomize_batchnorms(model, 2).eval()


def score(model, target, x, y, algorithm, find_best=True, reduction="mean", **options):
    metric = ShapleyAttributionMetric(
        model, batches(x, y), F.cross_entropy, "cpu", reduction=reduction, algorithm=algorithm, **options
    )
    scores = metric.run(target, find_best) if isinstance(target, nn.Module) else metric.run(target)
    return scores, metric.last_path


LAYER_CASES = [  # (model, layer index, find_best, expected fast path)
    ("mlp", 0, True, "incremental"),  # ReLU output -> Linear
    ("mlp", 0, False, "incremental"),  # Linear output -> ReLU -> Linear
    ("mlp", 2, True, "incremental"),  # Tanh output -> Linear (tanh(0) = 0 is not needed after it)
    ("cnn", 0, True, "incremental"),  # -> conv
    ("cnn", 2, True, "incremental"),  # -> max-pool -> flatten -> linear
    ("cnn", 6, True, "incremental"),  # hidden linear -> linear
    ("bn", 0, False, "suffix"),  # -> BatchNorm
]
MODELS = {"mlp": lambda: (mlp(), (4,)), "cnn": lambda: (cnn(), (1, 8, 8)), "bn": lambda: (bn_net(), (1, 4, 4))}


@pytest.mark.parametrize("name, index, find_best, path", LAYER_CASES)
@pytest.mark.parametrize("incremental", [True, False])
def test_fast_equals_reference_on_layers(name, index, find_best, path, incremental):
    model, shape = MODELS[name]()
    x, y = data(shape)
    layer = model[index]
    reference, used = score(model, layer, x, y, "reference", find_best, "none", sv_samples=3, seed=4)
    assert used == "reference"
    fast, used = score(model, layer, x, y, "fast", find_best, "none", sv_samples=3, seed=4, incremental=incremental)
    assert used == (path if incremental else "suffix")
    np.testing.assert_allclose(fast, reference, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", lambda s: s.mean(0) + 2 * s.std(0)])
@pytest.mark.parametrize("incremental", [True, False])
def test_fast_equals_reference_for_every_reduction(reduction, incremental):
    model = cnn()
    x, y = data((1, 8, 8), n=7)
    reference, _ = score(model, model[2], x, y, "reference", reduction=reduction, sv_samples=2, seed=0)
    fast, _ = score(model, model[2], x, y, "fast", reduction=reduction, sv_samples=2, seed=0, incremental=incremental)
    np.testing.assert_allclose(fast, reference, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("index, incremental", [(0, True), (2, True), (6, True), (2, False)])
def test_fast_equals_reference_in_float32(index, incremental):
    model = cnn(torch.float32)
    x, y = data((1, 8, 8), dtype=torch.float32)
    reference, _ = score(model, model[index], x, y, "reference", reduction="none", sv_samples=2, seed=3)
    fast, used = score(
        model, model[index], x, y, "fast", reduction="none", sv_samples=2, seed=3, incremental=incremental
    )
    assert used == ("incremental" if incremental else "suffix")
    np.testing.assert_allclose(fast, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


@pytest.mark.parametrize("make", [ResidualNet, ConcatNet], ids=["residual", "concat"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fast_equals_reference_on_groups(make, reduction):
    torch.manual_seed(0)
    model = randomize_batchnorms(make().to(DTYPE), 0).eval()
    x, y = data((2, 4, 4), n=6)
    groups = model_groups(model, (2, 4, 4))
    assert groups
    for group in groups:
        reference, _ = score(model, group, x, y, "reference", reduction=reduction, sv_samples=2, seed=1)
        fast, used = score(model, group, x, y, "fast", reduction=reduction, sv_samples=2, seed=1)
        assert used in ("suffix", "incremental")
        np.testing.assert_allclose(fast, reference, rtol=1e-8, atol=1e-12)


def test_the_residual_stream_is_evaluated_as_a_suffix_with_every_read_point_masked():
    torch.manual_seed(0)
    model = randomize_batchnorms(ResidualNet().to(DTYPE), 0).eval()
    x, y = data((2, 4, 4), n=6)
    (stream,) = [g for g in model_groups(model, (2, 4, 4)) if len(g.sources) > 1]
    _, used = score(model, stream, x, y, "fast", sv_samples=1, seed=0)
    assert used == "suffix"  # several read points: no incremental walk


@pytest.mark.parametrize("index", [0, 2, 6])
def test_each_fast_ordering_telescopes(index):
    model = cnn()
    x, y = data((1, 8, 8), n=6)
    scores, _ = score(model, model[index], x, y, "fast", reduction="none", sv_samples=1, seed=9)
    head, tail = model[: index + 2], model[index + 2 :]
    with torch.no_grad():
        z = head(x)
        nothing = F.cross_entropy(tail(torch.zeros_like(z)), y, reduction="none")
        everything = F.cross_entropy(tail(z), y, reduction="none")
    np.testing.assert_allclose(scores.sum(1), (nothing - everything).numpy(), rtol=1e-9, atol=1e-12)


def brute_force(head, tail, x, y):
    with torch.no_grad():
        z = head(x)
    units = z.shape[1]

    def value(coalition):
        mask = torch.zeros(units, dtype=z.dtype)
        mask[list(coalition)] = 1
        shape = [1, units] + [1] * (z.dim() - 2)
        with torch.no_grad():
            return -F.cross_entropy(tail(z * mask.reshape(shape)), y, reduction="none").numpy()

    values = {frozenset(c): value(c) for size in range(units + 1) for c in itertools.combinations(range(units), size)}
    phi = np.zeros((len(x), units))
    for c in range(units):
        for coalition, v in values.items():
            if c not in coalition:
                s = len(coalition)
                phi[:, c] += (
                    math.factorial(s)
                    * math.factorial(units - s - 1)
                    / math.factorial(units)
                    * (values[coalition | {c}] - v)
                )
    return phi.mean(0)


@pytest.mark.parametrize("index", [0, 2])
def test_fast_converges_to_brute_force(index):
    model = cnn()
    x, y = data((1, 8, 8), n=8)
    exact = brute_force(model[: index + 2], model[index + 2 :], x, y)  # 4 / 6 units
    few, _ = score(model, model[index], x, y, "fast", sv_samples=2, seed=0)
    many, _ = score(model, model[index], x, y, "fast", sv_samples=300, seed=0, antithetic=True)
    assert np.abs(many - exact).max() < 0.05 * np.abs(exact).max()
    assert np.abs(many - exact).max() < np.abs(few - exact).max()


def test_both_algorithms_draw_the_same_orderings_and_antithetic_reverses_them():
    assert all(torch.equal(a, b) for a, b in zip(Orderings(5).draw(7, 3), draw_permutations(7, 3, seed=5)))
    pairs = Orderings(5, antithetic=True).draw(7, 4)
    assert len(pairs) == 4 and torch.equal(pairs[1], pairs[0].flip(0)) and torch.equal(pairs[3], pairs[2].flip(0))
    assert torch.equal(pairs[0], draw_permutations(7, 1, seed=5)[0])


@pytest.mark.parametrize("antithetic", [False, True])
def test_stderr_matches_the_spread_over_seeds(antithetic):
    model = mlp()
    x, y = data((4,), n=10)
    runs = []
    stderrs = []
    for seed in range(40):
        metric = ShapleyAttributionMetric(
            model, batches(x, y), F.cross_entropy, "cpu", sv_samples=6, seed=seed, antithetic=antithetic
        )
        scores, stderr = metric.run(model[0], True, return_stderr=True)
        assert stderr.shape == scores.shape
        runs.append(scores)
        stderrs.append(stderr)
    spread = np.std(runs, axis=0, ddof=1)
    typical = np.sqrt(np.mean(np.square(stderrs), axis=0))
    moving = spread > 1e-6  # units that are never active have no spread
    assert moving.any()
    ratio = typical[moving] / spread[moving]
    assert np.all((ratio > 0.6) & (ratio < 1.6)), ratio


def test_stderr_per_example_and_sum_and_refused_for_a_callable():
    model = mlp()
    x, y = data((4,), n=10)
    make = lambda reduction: ShapleyAttributionMetric(
        model, batches(x, y), F.cross_entropy, "cpu", reduction=reduction, sv_samples=4, seed=0
    )
    per_example, stderr = make("none").run(model[0], True, return_stderr=True)
    assert stderr.shape == per_example.shape and np.all(stderr >= 0)
    total, stderr_sum = make("sum").run(model[0], True, return_stderr=True)
    mean, stderr_mean = make("mean").run(model[0], True, return_stderr=True)
    np.testing.assert_allclose(total / 10, mean, rtol=1e-12)
    np.testing.assert_allclose(stderr_sum / 10, stderr_mean, rtol=1e-9)
    with pytest.raises(ValueError, match="callable reduction"):
        make(lambda s: s.mean(0)).run(model[0], True, return_stderr=True)


def test_adaptive_mode_stops_where_it_says():
    model = mlp()
    x, y = data((4,), n=10)
    metric = ShapleyAttributionMetric(
        model, batches(x, y), F.cross_entropy, "cpu", sv_samples=4, seed=0, tolerance=0.01, max_samples=400
    )
    scores, stderr = metric.run(model[0], True, return_stderr=True)
    samples = metric.last_samples
    assert 4 < samples <= 400 and samples % 4 == 0
    assert stderr.max() <= 0.01 * (scores.max() - scores.min())
    # one round fewer was not enough, and the rounds are the orderings of one longer plain run
    plain = ShapleyAttributionMetric(model, batches(x, y), F.cross_entropy, "cpu", sv_samples=samples, seed=0)
    np.testing.assert_allclose(plain.run(model[0], True), scores, rtol=1e-9, atol=1e-12)
    shorter, shorter_stderr = ShapleyAttributionMetric(
        model, batches(x, y), F.cross_entropy, "cpu", sv_samples=samples - 4, seed=0
    ).run(model[0], True, return_stderr=True)
    assert shorter_stderr.max() > 0.01 * (shorter.max() - shorter.min())
    capped = ShapleyAttributionMetric(
        model, batches(x, y), F.cross_entropy, "cpu", sv_samples=3, seed=0, tolerance=1e-9, max_samples=7
    )
    capped.run(model[0], True)
    assert capped.last_samples == 7


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"algorithm": "quick"}, "algorithm"),
        ({"max_batch_elements": 0}, "max_batch"),
        ({"tolerance": -1.0}, "tolerance"),
        ({"max_samples": 0}, "max_samples"),
    ],
)
def test_bad_options_are_refused_by_name(bad, match):
    model = mlp()
    x, y = data((4,), n=4)
    with pytest.raises(ValueError, match=match):
        ShapleyAttributionMetric(model, batches(x, y), F.cross_entropy, "cpu", **bad).run(model[0])


def test_a_small_memory_budget_gives_the_same_scores():
    model = cnn()
    x, y = data((1, 8, 8), n=7)
    for incremental in (True, False):
        wide, _ = score(model, model[2], x, y, "fast", reduction="none", sv_samples=2, seed=0, incremental=incremental)
        narrow, _ = score(
            model,
            model[2],
            x,
            y,
            "fast",
            reduction="none",
            sv_samples=2,
            seed=0,
            incremental=incremental,
            max_batch_elements=50,
        )
        np.testing.assert_allclose(narrow, wide, rtol=1e-10, atol=1e-13)


class BatchSizeBakedIn(nn.Module):
    """Reshapes with the batch size it read from the input: the size is read again from the
    stacked batch."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        n = x.shape[0]
        h = torch.relu(self.fc1(x))
        return self.fc2(h.reshape(n, 6) * 1.0)


def test_a_model_that_reads_the_batch_size_is_recomputed_on_the_stacked_batch():
    torch.manual_seed(0)
    model = BatchSizeBakedIn().to(DTYPE)
    x, y = data((4,), n=10)
    reference, _ = score(model, model.fc1, x, y, "reference", False, "none", sv_samples=2, seed=0)
    fast, used = score(model, model.fc1, x, y, "fast", False, "none", sv_samples=2, seed=0)
    assert used == "suffix"  # the reshape reads the batch size: no incremental walk through it
    np.testing.assert_allclose(fast, reference, rtol=1e-8, atol=1e-12)


class LiteralBatchSize(nn.Module):
    """Reshapes with a literal batch size (works only for batches of 5): the stacked suffix fails,
    and the fast algorithm falls back to whole-model evaluation, saying so."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)).reshape(5, 6) + 0.0)


def test_a_suffix_that_cannot_run_stacked_falls_back_with_a_warning():
    torch.manual_seed(0)
    model = LiteralBatchSize().to(DTYPE)
    x, y = data((4,), n=10)
    reference, _ = score(model, model.fc1, x, y, "reference", False, "none", sv_samples=2, seed=0)
    with pytest.warns(RuntimeWarning, match="whole-model evaluation"):
        fast, used = score(model, model.fc1, x, y, "fast", False, "none", sv_samples=2, seed=0)
    assert used == "reference"
    np.testing.assert_array_equal(fast, reference)


# --------------------------------------------------------------------------------------------
# Leave-one-out on the same machinery
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, index, find_best", [("cnn", 0, True), ("cnn", 2, True), ("bn", 0, False), ("mlp", 2, True)]
)
def test_leave_one_out_is_the_loss_increase_of_removing_one_unit(name, index, find_best):
    from torchpruner.attributions import LeaveOneOutAttributionMetric

    model, shape = MODELS[name]()
    x, y = data(shape, n=7)
    head, tail = model[: index + (2 if find_best else 1)], model[index + (2 if find_best else 1) :]
    with torch.no_grad():
        z = head(x)
        full = F.cross_entropy(tail(z), y, reduction="none")
        expected = []
        for c in range(z.shape[1]):
            zeroed = z.clone()
            zeroed[:, c] = 0
            expected.append((F.cross_entropy(tail(zeroed), y, reduction="none") - full).numpy())
    expected = np.stack(expected, 1)
    for algorithm in ("fast", "reference"):
        metric = LeaveOneOutAttributionMetric(
            model, batches(x, y), F.cross_entropy, "cpu", reduction="none", algorithm=algorithm
        )
        np.testing.assert_allclose(metric.run(model[index], find_best), expected, rtol=1e-9, atol=1e-12)
    assert metric.last_path == "reference"


def test_leave_one_out_of_a_group_is_the_loss_after_pruning_the_unit():
    from torchpruner.attributions import LeaveOneOutAttributionMetric

    torch.manual_seed(0)
    model = randomize_batchnorms(ResidualNet().to(DTYPE), 0).eval()
    x, y = data((2, 4, 4), n=6)
    for group in model_groups(model, (2, 4, 4)):
        fast = LeaveOneOutAttributionMetric(model, batches(x, y), F.cross_entropy, "cpu").run(group)
        reference = LeaveOneOutAttributionMetric(
            model, batches(x, y), F.cross_entropy, "cpu", algorithm="reference"
        ).run(group)
        np.testing.assert_allclose(fast, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("incremental", [True, False])
def test_a_suffix_that_disagrees_with_the_whole_model_is_caught_on_the_first_batch(monkeypatch, incremental):
    """The first batch's empty and full coalitions are compared with whole-model evaluation (on
    its first examples): a suffix evaluation that is off falls back to the reference, saying so."""
    from torchpruner.attributions import suffix

    model = cnn()
    x, y = data((1, 8, 8), n=20)
    reference, _ = score(model, model[2], x, y, "reference", reduction="none", sv_samples=2, seed=0)
    original = suffix.Suffix.losses
    monkeypatch.setattr(suffix.Suffix, "losses", lambda *args, **kwargs: original(*args, **kwargs) + 1e-2)
    with pytest.warns(RuntimeWarning, match="other losses than running the whole model"):
        fast, used = score(
            model, model[2], x, y, "fast", reduction="none", sv_samples=2, seed=0, incremental=incremental
        )
    assert used == "reference"
    np.testing.assert_array_equal(fast, reference)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_channels_last_walk_gives_the_same_scores_as_the_contiguous_one(monkeypatch, dtype):
    """Through a 2-d convolution the walk keeps its states channels-last (faster pooling after
    it); the values, and so the scores, are the ones of the contiguous layout, to rounding (the
    linear layer after the flatten reads its channels-last input as laid out, so it sums the
    same products in another order)."""
    from torchpruner.attributions import suffix

    model = cnn(dtype)
    x, y = data((1, 8, 8), n=7, dtype=dtype)
    last, used = score(model, model[0], x, y, "fast", reduction="none", sv_samples=2, seed=0)
    assert used == "incremental"
    monkeypatch.setattr(suffix, "CHANNELS_LAST", False)
    contiguous, _ = score(model, model[0], x, y, "fast", reduction="none", sv_samples=2, seed=0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(last, contiguous, rtol=tol, atol=tol * np.abs(contiguous).max())


class FunctionalCNN(nn.Module):
    """The digits CNN written with functions and methods (optionally a max-pool that also returns
    its indices, which must not be reordered with the ReLU before it)."""

    def __init__(self, indices: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(6 * 16, 8), nn.Linear(8, 3)
        self.indices = indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        if self.indices:
            x, _ = F.max_pool2d(x, 2, return_indices=True)
        else:
            x = F.max_pool2d(x, 2)
        x = torch.flatten(x, 1)
        return self.fc2(self.fc1(x).relu())


@pytest.fixture
def planned(monkeypatch):
    """The rewrites each suffix program plans: ``(max-pools first, ReLUs in place, flat linears)``."""
    from torchpruner.attributions import suffix

    seen: list[tuple[int, int, int]] = []
    plan = suffix._Program._plan_rewrites

    def spy(self, owner):
        plan(self, owner)
        seen.append((len(self.pool_first), len(self.in_place), len(self.flat_linear)))

    monkeypatch.setattr(suffix._Program, "_plan_rewrites", spy)
    return seen


@pytest.mark.parametrize("build", ["modules", "functions", "pool with indices"])
def test_the_per_coalition_rewrites_give_the_reference_scores(planned, build):
    """The suffix runs a ReLU read only by a max-pool after the pool, a ReLU of a fresh layer
    output in place, and a linear layer reads a channels-last flatten as laid out: the same
    losses as the whole model (fast equals reference), the prefix left intact (a second run gives
    the same scores), and no reordering before a max-pool that returns indices."""
    model = {
        "modules": cnn(),
        "functions": FunctionalCNN().double(),
        "pool with indices": FunctionalCNN(True).double(),
    }[build]
    first = model[0] if build == "modules" else model.conv1
    x, y = data((1, 8, 8), n=7)
    reference, _ = score(model, first, x, y, "reference", reduction="none", sv_samples=2, seed=0)
    planned.clear()
    fast, used = score(model, first, x, y, "fast", reduction="none", sv_samples=2, seed=0)
    assert used == "incremental"
    np.testing.assert_allclose(fast, reference, rtol=1e-9, atol=1e-12)
    again, _ = score(model, first, x, y, "fast", reduction="none", sv_samples=2, seed=0)
    np.testing.assert_array_equal(again, fast)
    pools, in_place, flat = (max(p[i] for p in planned) for i in range(3))
    # with indices, the ReLU after conv2 runs in place instead (in the program from the read point)
    assert (pools, in_place) == ((0, 2) if build == "pool with indices" else (1, 1))
    assert flat == 1


def test_modules_with_forward_hooks_are_not_rewritten(planned):
    """A forward hook on a module of the suffix sees what the model computes there: the ReLU
    before the max-pool keeps its place (the hook gets its own input, not the pooled one) and the
    linear after the flatten is called as the module; the scores are the reference's."""
    model = cnn()
    seen: list[tuple[int, ...]] = []
    model[3].register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape[1:])))
    model[6].register_forward_hook(lambda m, args, out: None)
    x, y = data((1, 8, 8), n=7)
    reference, _ = score(model, model[0], x, y, "reference", reduction="none", sv_samples=2, seed=0)
    planned.clear()
    seen.clear()
    fast, used = score(model, model[0], x, y, "fast", reduction="none", sv_samples=2, seed=0)
    assert used == "incremental"
    np.testing.assert_allclose(fast, reference, rtol=1e-9, atol=1e-12)
    assert seen and set(seen) == {(6, 8, 8)}  # the ReLU runs as the module, on its own input (not the pooled one)
    assert max(p[0] for p in planned) == 0 and max(p[2] for p in planned) == 0


class WideCNN(nn.Module):
    """conv 8 → ReLU → ``second`` → ReLU → max-pool → ``view`` → linear: wide enough (≥ 8
    channels) that the max-pools run on a channels-last copy, and a ``view`` after the pool that
    fails unless the pool's output has the layout the model's own pool gives."""

    def __init__(self, second: nn.Module, flat: int) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv1, self.second, self.fc = nn.Conv2d(1, 8, 3, padding=1), second, nn.Linear(flat, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.second(torch.relu(self.conv1(x))))
        x = F.max_pool2d(x, 2)
        return self.fc(x.view(x.size(0), -1))


SECOND_CONVS = {  # name: (the second layer, features after the pool)
    "3x3 padding 1": (lambda: nn.Conv2d(8, 10, 3, padding=1), 10 * 4 * 4),
    "stride 2": (lambda: nn.Conv2d(8, 10, 3, stride=2, padding=1), 10 * 2 * 2),
    "dilation 2": (lambda: nn.Conv2d(8, 10, 3, dilation=2, padding=2), 10 * 4 * 4),
    "no padding": (lambda: nn.Conv2d(8, 10, 3), 10 * 3 * 3),
    "3x5 kernel, padding (2, 1)": (lambda: nn.Conv2d(8, 10, (3, 5), padding=(2, 1)), 10 * 5 * 3),
    "1x1": (lambda: nn.Conv2d(8, 10, 1), 10 * 4 * 4),
    "padding same": (lambda: nn.Conv2d(8, 10, 4, padding="same"), 10 * 4 * 4),
    "no bias": (lambda: nn.Conv2d(8, 10, 3, padding=1, bias=False), 10 * 4 * 4),
}


@pytest.mark.parametrize("name", list(SECOND_CONVS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_walk_through_a_convolution_equals_the_reference(name, dtype, monkeypatch):
    """The walk's contributions of a 2-d convolution (a batched product over the unfolded input;
    a grouped convolution for string padding) for every stride, dilation, padding and kernel
    shape, in both state layouts: the reference's scores."""
    from torchpruner.attributions import suffix

    build, flat = SECOND_CONVS[name]
    model = WideCNN(build(), flat).to(dtype)
    x, y = data((1, 8, 8), n=7, dtype=dtype)
    reference, _ = score(model, model.conv1, x, y, "reference", reduction="none", sv_samples=2, seed=0)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for channels_last in (True, False):
        monkeypatch.setattr(suffix, "CHANNELS_LAST", channels_last)
        fast, used = score(model, model.conv1, x, y, "fast", reduction="none", sv_samples=2, seed=0)
        assert used == "incremental"
        np.testing.assert_allclose(fast, reference, rtol=tol, atol=tol * np.abs(reference).max())


@pytest.mark.parametrize(
    "where, incremental",
    [("conv1", False), ("second", True), ("second", False)],  # per coalition; in the chain; in the prefix
)
def test_max_pools_run_channels_last_with_the_models_values_and_layout(monkeypatch, where, incremental):
    """A 2-d max-pool of a contiguous CPU input with ≥ 8 channels runs on a channels-last copy
    (per coalition, in the walk's chain, in the prefix) and hands on a contiguous result: the
    ``view`` after it works and the scores are the reference's."""
    from torchpruner.attributions import suffix

    taken = []
    check = suffix._pools_faster_channels_last
    monkeypatch.setattr(suffix, "_pools_faster_channels_last", lambda x: taken.append(check(x)) or taken[-1])
    model = WideCNN(nn.Conv2d(8, 10, 3, padding=1), 10 * 4 * 4).double()
    x, y = data((1, 8, 8), n=7)
    target = getattr(model, where)
    reference, _ = score(model, target, x, y, "reference", reduction="none", sv_samples=2, seed=0)
    fast, _ = score(model, target, x, y, "fast", reduction="none", sv_samples=2, seed=0, incremental=incremental)
    np.testing.assert_allclose(fast, reference, rtol=1e-9, atol=1e-12)
    assert any(taken)


class HookedPoolCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 10, 3, padding=1)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(10 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc(x.view(x.size(0), -1))


def test_a_hooked_max_pool_module_sees_the_models_layout():
    model = HookedPoolCNN().double()
    layouts: list[bool] = []
    model.pool.register_forward_hook(lambda m, args, out: layouts.append(args[0].is_contiguous()))
    x, y = data((1, 8, 8), n=7)
    reference, _ = score(model, model.conv1, x, y, "reference", reduction="none", sv_samples=2, seed=0)
    layouts.clear()
    fast, _ = score(model, model.conv1, x, y, "fast", reduction="none", sv_samples=2, seed=0, incremental=False)
    np.testing.assert_allclose(fast, reference, rtol=1e-9, atol=1e-12)
    assert layouts and all(layouts)


@pytest.mark.parametrize("index", [2, 6])  # a flattened conv output -> linear; a hidden linear -> linear
@pytest.mark.parametrize("options", [{}, {"truncation_tolerance": 0.05}, {"max_batch_elements": 60}])
def test_walking_orderings_side_by_side_gives_the_scores_of_walking_them_one_by_one(monkeypatch, index, options):
    """Small states are walked several orderings at a time (the contributions gathered in order,
    each step adding the state before it): the same float additions, so the same scores to the
    last bit as the walk one state at a time, in float32 too, also when an ordering is truncated
    or does not fit in one stacked evaluation."""
    from torchpruner.attributions.methods import shapley

    model = cnn(torch.float32)
    x, y = data((1, 8, 8), n=7, dtype=torch.float32)
    walked: list[int] = []
    side_by_side = shapley.walk_side_by_side

    def counted(states, orders, contributions, empty):
        walked.append(len(orders))
        side_by_side(states, orders, contributions, empty)

    monkeypatch.setattr(shapley, "walk_side_by_side", counted)
    together, used = score(model, model[index], x, y, "fast", reduction="none", sv_samples=4, seed=1, **options)
    assert used == "incremental" and walked and (max(walked) > 1 or "max_batch_elements" in options)
    walked.clear()
    monkeypatch.setattr(shapley, "SIDE_BY_SIDE_ELEMENTS", 0)
    one_by_one, _ = score(model, model[index], x, y, "fast", reduction="none", sv_samples=4, seed=1, **options)
    assert walked == []
    np.testing.assert_array_equal(together, one_by_one)


@pytest.mark.parametrize("index", [0, 2, 6])  # channel-major flatten; units of the linear; ReLU output
def test_a_linear_layer_reads_the_units_it_owns_in_blocks_as_views(monkeypatch, index):
    """When unit c owns the inputs c·k .. c·k + k − 1 of the linear layer (and every input has an
    owner), its contributions read the input and the weight as views: the scores are the ones
    of gathering them, to the last bit (float32)."""
    from torchpruner.attributions import suffix

    model = mlp(torch.float32) if index == 0 else cnn(torch.float32)
    x, y = data((4,) if index == 0 else (1, 8, 8), n=7, dtype=torch.float32)
    blocks: list[bool] = []
    layout = suffix.Incremental._unit_layout

    def spy(self, env, batch):
        layout(self, env, batch)
        blocks.append(self.blocks)
        self.blocks = self.blocks and not gather

    monkeypatch.setattr(suffix.Incremental, "_unit_layout", spy)
    gather = False
    viewed, used = score(model, model[index], x, y, "fast", reduction="none", sv_samples=3, seed=2)
    assert used == "incremental" and blocks == [True]
    gather = True
    gathered, _ = score(model, model[index], x, y, "fast", reduction="none", sv_samples=3, seed=2)
    np.testing.assert_array_equal(viewed, gathered)


@pytest.mark.parametrize("options", [{}, {"truncation_tolerance": 0.05}, {"max_batch_elements": 60}])
def test_a_relu_after_the_walked_layer_runs_in_place_on_the_walks_states(monkeypatch, options):
    """The walk's stacked states are scratch once evaluated, so the ReLU after the linear layer
    overwrites them instead of allocating: the same scores to the last bit (float32), also when
    an ordering goes on in the next stacked evaluation (its state must survive the ReLU) and the
    empty coalition's state, which the walk starts from, is never overwritten."""
    from torchpruner.attributions import suffix

    model = cnn(torch.float32)
    x, y = data((1, 8, 8), n=7, dtype=torch.float32)
    plan = suffix._Program._plan_rewrites
    planned: list[int] = []

    def spy(self, owner):
        plan(self, owner)
        planned.append(len(self.in_place_given))
        if not in_place:
            self.in_place_given = set()

    monkeypatch.setattr(suffix._Program, "_plan_rewrites", spy)
    in_place = True
    overwritten, used = score(model, model[2], x, y, "fast", reduction="none", sv_samples=3, seed=5, **options)
    assert used == "incremental" and max(planned) == 1
    in_place = False
    kept, _ = score(model, model[2], x, y, "fast", reduction="none", sv_samples=3, seed=5, **options)
    np.testing.assert_array_equal(overwritten, kept)
