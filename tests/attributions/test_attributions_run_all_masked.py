"""``run_all`` of the masked-evaluation metrics (Shapley, leave-one-out): one stream of batches.

Oracles:
* ``run_all`` equals ``run(target)`` on each target (float64, 1e-10): layers, call sites and
  coupled groups of the digits-style CNN and of a residual model, through the incremental walk,
  the suffix evaluation, the reference algorithm and the fallback to it (with the same
  warnings), with every reduction, the standard error and the adaptive mode;
* the model's prefix runs once per batch for all the targets (counted at the first layer; one
  run per target ran it once per target and batch), the data loader is iterated once, and no
  batch's prefix outlives the batch.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_attributions_groups import build, model_groups
from test_attributions_groups import data as group_data
from test_attributions_run_all import residual_targets
from test_attributions_shapley_fast import LiteralBatchSize, cnn, data
from torch import nn

from torchpruner.attributions import LeaveOneOutAttributionMetric, MeanPlusStd, ShapleyAttributionMetric
from torchpruner.attributions.groups import group_label
from torchpruner.attributions.methods.shapley import CHECKED_EXAMPLES
from torchpruner.graph import CallSite

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class CountingLoader:
    """A list of batches that counts how often it is iterated and how many batches are drawn;
    ``before_each(k)`` is called before batch ``k`` is handed out."""

    def __init__(self, items, before_each=None) -> None:
        self.items = list(items)
        self.iterations = 0
        self.drawn = 0
        self.before_each = before_each

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        self.iterations += 1
        for k, item in enumerate(self.items):
            if self.before_each is not None:
                self.before_each(k)
            self.drawn += 1
            yield item


def batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def key_of(model: nn.Module, target) -> str:
    if isinstance(target, CallSite):
        return target.label
    if isinstance(target, nn.Module):
        return next(name for name, module in model.named_modules() if module is target)
    return group_label(target)


def assert_equal_to_run(attr, model, targets, got, **options) -> None:
    """Every target's ``run`` gives what ``run_all`` gave, along the same path."""
    paths = dict(attr.last_paths)
    assert list(got) == list(paths) == [key_of(model, t) for t in targets]
    for target in targets:
        key = key_of(model, target)
        want = attr.run(target, **options)
        if isinstance(want, tuple):
            for part, expected in zip(got[key], want):
                np.testing.assert_allclose(part, expected, rtol=1e-10, atol=1e-12, err_msg=key)
        else:
            assert got[key].shape == want.shape, key
            np.testing.assert_allclose(got[key], want, rtol=1e-10, atol=1e-12, err_msg=key)
        assert attr.last_path == paths[key], key


CNN_LAYERS = [0, 2, 6, 8]  # conv (-> conv), conv (-> pool -> linear), hidden linear, the output


@pytest.mark.parametrize("incremental", [True, False], ids=["incremental", "suffix"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", MeanPlusStd(2.0), lambda s: s.max(0) - s.min(0)], ids=str)
def test_shapley_run_all_equals_run_on_the_layers_of_the_digits_cnn(incremental, reduction):
    model = cnn()
    x, y = data((1, 8, 8), n=11)
    attr = ShapleyAttributionMetric(
        model, batches(x, y, 4), F.cross_entropy, reduction=reduction, sv_samples=3, seed=5, incremental=incremental
    )
    targets = [model[i] for i in CNN_LAYERS]
    got = attr.run_all(targets)
    expected = {"0": "incremental", "2": "incremental", "6": "incremental", "8": "suffix"}
    assert attr.last_paths == (expected if incremental else dict.fromkeys(expected, "suffix"))
    assert_equal_to_run(attr, model, targets, got)


@pytest.mark.parametrize("algorithm", ["fast", "reference"])
def test_shapley_run_all_equals_run_on_layers_call_sites_and_groups_of_a_residual_model(algorithm):
    model, input_size = build("residual", seed=3)
    x, y = group_data(input_size, n=10)
    attr = ShapleyAttributionMetric(
        model, batches(x, y, 4), F.cross_entropy, reduction="none", sv_samples=2, seed=1, algorithm=algorithm
    )
    targets = residual_targets(model, x)
    got = attr.run_all(targets)
    if algorithm == "fast":  # the residual stream has several read points: the suffix path
        assert set(attr.last_paths.values()) == {"incremental", "suffix"}
    else:
        assert set(attr.last_paths.values()) == {"reference"}
    assert_equal_to_run(attr, model, targets, got)


def test_shapley_run_all_equals_run_on_the_groups_of_the_digits_cnn():
    model = cnn()
    x, y = data((1, 8, 8), n=9)
    groups = model_groups(model, (1, 8, 8))
    attr = ShapleyAttributionMetric(model, batches(x, y, 5), F.cross_entropy, sv_samples=2, seed=0)
    got = attr.run_all(groups)
    assert_equal_to_run(attr, model, groups, got)
    assert list(attr.run_all()) == [group_label(g) for g in groups]  # the default targets


def test_a_target_that_falls_back_does_so_with_the_warning_run_gives_and_the_others_stay_fast():
    torch.manual_seed(0)
    model = LiteralBatchSize().to(torch.float64)
    x, y = data((4,), n=10)
    attr = ShapleyAttributionMetric(model, batches(x, y, 5), F.cross_entropy, reduction="none", sv_samples=2, seed=0)
    targets = [model.fc1, model.fc2]

    def messages(call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = call()
        return result, sorted(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))

    got, said = messages(lambda: attr.run_all(targets))
    assert attr.last_paths == {"fc1": "reference", "fc2": "suffix"}
    alone = [messages(lambda t=t: attr.run(t)) for t in targets]
    assert said == sorted(m for _, ms in alone for m in ms) and any("whole-model evaluation" in m for m in said)
    for key, (want, _) in zip(["fc1", "fc2"], alone):
        np.testing.assert_allclose(got[key], want, rtol=1e-10, atol=1e-12)


def test_shapley_run_all_gives_the_standard_error_and_runs_the_adaptive_rounds_of_run():
    model = cnn()
    x, y = data((1, 8, 8), n=8)
    targets = [model[0], model[2], model[6]]
    attr = ShapleyAttributionMetric(model, batches(x, y, 4), F.cross_entropy, sv_samples=2, seed=3)
    got = attr.run_all(targets, return_stderr=True)
    assert all(isinstance(value, tuple) and len(value) == 2 for value in got.values())
    assert_equal_to_run(attr, model, targets, got, return_stderr=True)
    # adaptive: each target stops after its own number of rounds, as run() does
    loader = CountingLoader(batches(x, y, 4))
    adaptive = ShapleyAttributionMetric(
        model, loader, F.cross_entropy, sv_samples=2, seed=3, tolerance=0.05, max_samples=8, antithetic=True
    )
    got = adaptive.run_all(targets, return_stderr=True)
    samples = []
    for target in targets:
        want = adaptive.run(target, return_stderr=True)
        samples.append(adaptive.last_samples)
        for part, expected in zip(got[key_of(model, target)], want):
            np.testing.assert_allclose(part, expected, rtol=1e-10, atol=1e-12)
    assert max(samples) == 8 and min(samples) < 8  # one target stopped at max_samples orderings, one earlier
    loader.iterations = 0
    adaptive.run_all(targets)
    assert loader.iterations == max(samples) // 2  # one pass per round, shared by the targets still running


@pytest.mark.parametrize("algorithm", ["fast", "reference"])
def test_leave_one_out_run_all_equals_run(algorithm):
    model, input_size = build("residual", seed=2)
    x, y = group_data(input_size, n=9)
    attr = LeaveOneOutAttributionMetric(model, batches(x, y, 4), F.cross_entropy, reduction="none", algorithm=algorithm)
    targets = residual_targets(model, x)
    got = attr.run_all(targets)
    assert_equal_to_run(attr, model, targets, got)
    model = cnn()
    x, y = data((1, 8, 8), n=9)
    attr = LeaveOneOutAttributionMetric(model, batches(x, y, 4), F.cross_entropy, algorithm=algorithm)
    targets = [model[i] for i in CNN_LAYERS] + model_groups(model, (1, 8, 8))
    got = attr.run_all(targets)
    assert_equal_to_run(attr, model, targets, got)


def prefix_forwards(model: nn.Module, batch_size: int) -> list:
    """Calls of the model's first layer on a whole batch: one per evaluation of the model's prefix
    (the first batch's check against the whole model runs on fewer examples; every target here
    lies after the first layer, so no coalition runs it)."""
    calls: list = []
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    first.register_forward_pre_hook(lambda _m, args: calls.append(1) if args[0].shape[0] == batch_size else None)
    return calls


@pytest.mark.parametrize(
    "metric",
    [
        lambda m, loader: ShapleyAttributionMetric(m, loader, F.cross_entropy, sv_samples=2, seed=0),
        lambda m, loader: ShapleyAttributionMetric(m, loader, F.cross_entropy, sv_samples=2, seed=0, incremental=False),
        lambda m, loader: LeaveOneOutAttributionMetric(m, loader, F.cross_entropy),
    ],
    ids=["shapley", "shapley-suffix", "leave-one-out"],
)
def test_the_prefix_runs_once_per_batch_for_every_target_and_the_loader_once(metric):
    model = cnn()
    size = CHECKED_EXAMPLES + 4
    x, y = data((1, 8, 8), n=3 * size)
    targets = [model[i] for i in CNN_LAYERS] + model_groups(model, (1, 8, 8))
    loader = CountingLoader(batches(x, y, size))
    attr = metric(model, loader)
    attr.run(targets[0])  # traced once (cached), so the counts below are of scoring only
    calls = prefix_forwards(model, size)
    loader.iterations = loader.drawn = 0
    attr.run_all(targets)
    assert set(attr.last_paths.values()) <= {"incremental", "suffix"}
    assert len(calls) == len(loader)  # one prefix per batch, whatever the number of targets
    assert (loader.iterations, loader.drawn) == (1, len(loader))
    calls.clear()
    for target in targets:
        attr.run(target)
    assert len(calls) == len(targets) * len(loader)  # what one run per target costs


def test_no_batch_prefix_outlives_its_batch():
    model = cnn()
    x, y = data((1, 8, 8), n=12)
    attr: ShapleyAttributionMetric

    def before_each(k: int) -> None:  # the shared prefix of the previous batch is released
        assert attr._prefix_env is None and attr._prefix_batch is None

    attr = ShapleyAttributionMetric(model, CountingLoader(batches(x, y, 4), before_each), F.cross_entropy, seed=0)
    attr.run_all([model[0], model[6]], sv_samples=1)
    assert attr._prefix_env is None and not attr._targets


@pytest.mark.parametrize("find_best", [False, True])
def test_no_other_targets_hooks_run_inside_a_targets_coalitions(monkeypatch, find_best):
    """A layer is intercepted with forward hooks on its module; during the evaluation of one
    target's coalitions no other target's hooks are in place (they would run on every stacked
    evaluation and stop the per-coalition rewrites of the hooked layers), as in ``run``."""
    from torchpruner.attributions import suffix

    model = cnn()
    x, y = data((1, 8, 8), n=8)
    targets = [model[i] for i in (0, 2, 6)]
    hooked = []
    original = suffix.Suffix.evaluate

    def evaluate(*args, **kwargs):
        hooked.append(sum(1 for module in model.modules() if module._forward_hooks))
        return original(*args, **kwargs)

    monkeypatch.setattr(suffix.Suffix, "evaluate", evaluate)
    attr = ShapleyAttributionMetric(model, batches(x, y, 4), F.cross_entropy, sv_samples=2, seed=0)
    attr.run_all(targets, find_best)
    assert hooked and max(hooked) <= 1  # at most the target's own layer, as when it is scored alone
