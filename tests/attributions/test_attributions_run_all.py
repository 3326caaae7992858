"""``attr.run_all(targets)``: every layer and group scored, equal to ``run`` on each (float64).

Oracles:
* ``run_all`` equals ``run(target)`` for each target, for Taylor, Sensitivity and APoZ with every
  reduction, on layers, call sites and coupled groups of a residual and a concatenating model;
* the gradient and activation metrics make one forward per batch whatever the number of targets
  (counted with a hook on the model), the others one ``run`` per target (same scores);
* the default targets are the prunable groups ``Pruner.groups()`` lists, keyed by their label;
* the model is left as found, also when scoring fails; bad targets are refused clearly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracles import assert_unchanged, snapshot
from test_attributions_groups import batches, build, data, model_groups
from test_attributions_state import Boom, failing_criterion

from torchpruner.attributions import (
    APoZAttributionMetric,
    LeaveOneOutAttributionMetric,
    MeanPlusStd,
    RandomAttributionMetric,
    SensitivityAttributionMetric,
    ShapleyAttributionMetric,
    TaylorAttributionMetric,
    WeightNormAttributionMetric,
)
from torchpruner.attributions.groups import group_label
from torchpruner.graph import get_graph

pytestmark = [pytest.mark.filterwarnings("ignore:APoZ"), pytest.mark.filterwarnings("ignore::UserWarning")]

SHARED = {"Taylor": TaylorAttributionMetric, "Sensitivity": SensitivityAttributionMetric, "APoZ": APoZAttributionMetric}
REDUCTIONS = {
    "mean": "mean",
    "sum": "sum",
    "none": "none",
    "mean+2std": MeanPlusStd(2.0),
    "callable": lambda s: s.max(0) - s.min(0),
}


def residual_targets(model, x):
    """Layers (before and after a BatchNorm, a reused point, the classifier), a functional call
    site, and every prunable group."""
    relu = next(site for site in get_graph(model, (x[:1],)).sites if site.kind == "function" and site.target is F.relu)
    layers = [model.stem, model.bn, model.blocks[0].conv1, model.blocks[1].conv2, model.blocks[1].bn2, model.fc]
    return layers + [relu] + model_groups(model, (2, 4, 4))


def assert_same_scores(got: dict, expected: list, keys: list) -> None:
    assert list(got) == keys
    for key, want in zip(keys, expected):
        assert got[key].shape == want.shape, key
        np.testing.assert_allclose(got[key], want, rtol=1e-12, atol=1e-14, err_msg=key)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("metric", SHARED)
def test_run_all_equals_run_on_each_layer_and_group(metric, reduction):
    model, input_size = build("residual", seed=3)
    x, y = data(input_size, n=10)
    attr = SHARED[metric](model, batches(x, y, 4), F.cross_entropy, reduction=REDUCTIONS[reduction])
    targets = residual_targets(model, x)
    before = snapshot(model)
    got = attr.run_all(targets)
    assert_unchanged(before, model)
    expected = [attr.run(target) for target in targets]
    keys = ["stem", "bn", "blocks.0.conv1", "blocks.1.conv2", "blocks.1.bn2", "fc", targets[6].label]
    keys += [group_label(group) for group in targets[7:]]
    assert_same_scores(got, expected, keys)


@pytest.mark.parametrize("metric", SHARED)
def test_run_all_of_a_concatenation_equals_run_at_each_branch_offset(metric):
    model, input_size = build("concat", seed=2)
    x, y = data(input_size, n=7)
    attr = SHARED[metric](model, batches(x, y, 3), F.cross_entropy, reduction="none")
    groups = model_groups(model, input_size)
    targets = [model.a, model.b, model.mix] + groups
    got = attr.run_all(targets, find_best_evaluation_module=True)
    expected = [attr.run(target, find_best_evaluation_module=True) for target in targets]
    assert_same_scores(got, expected, ["a", "b", "mix"] + [group_label(g) for g in groups])


def test_the_default_targets_are_the_prunable_groups_in_order():
    model, input_size = build("residual", seed=1)
    x, y = data(input_size, n=6)
    groups = model_groups(model, input_size)
    attr = TaylorAttributionMetric(model, batches(x, y), F.cross_entropy, signed=True)
    got = attr.run_all()
    assert_same_scores(got, [attr.run(group) for group in groups], [group_label(g) for g in groups])
    assert len(groups) == 3 and got[group_label(groups[0])].shape == (4,)


def count_forwards(model: nn.Module) -> list:
    """Calls of the first layer (the intercepted model may be a traced copy that shares the layers)."""
    calls: list = []
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    first.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("metric", SHARED)
def test_gradient_and_activation_metrics_make_one_forward_per_batch(metric):
    model, input_size = build("residual", seed=4)
    x, y = data(input_size, n=9)
    loader = batches(x, y, 4)  # 3 batches
    targets = residual_targets(model, x)
    calls = count_forwards(model)
    SHARED[metric](model, loader, F.cross_entropy).run_all(targets)
    # the graph is traced once per model (cached) and every target's points are intercepted at once
    assert len(calls) <= len(loader) + 1  # + the trace, on the first call only
    calls.clear()
    SHARED[metric](model, loader, F.cross_entropy).run(targets[0])
    per_run = len(calls)
    calls.clear()
    SHARED[metric](model, loader, F.cross_entropy).run_all(targets)
    assert len(calls) == per_run == len(loader)


class SquaredTaylor(TaylorAttributionMetric):
    """A subclass with its own ``score_batch`` (that could read anything): scored run by run."""

    def score_batch(self, runner, batch, options):
        return super().score_batch(runner, batch, options) ** 2


def test_a_subclass_with_its_own_score_batch_is_scored_run_by_run():
    model, input_size = build("residual", seed=5)
    x, y = data(input_size, n=6)
    loader = batches(x, y, 3)
    targets = [model.stem, model.blocks[0].conv1]
    calls = count_forwards(model)
    attr = SquaredTaylor(model, loader, F.cross_entropy)
    attr.run_all(targets)
    assert len(calls) >= len(targets) * len(loader)
    got = attr.run_all(targets)
    plain = TaylorAttributionMetric(model, loader, F.cross_entropy, reduction="none").run_all(targets)
    np.testing.assert_allclose(got["stem"], (plain["stem"] ** 2).mean(0), rtol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda m, loader: ShapleyAttributionMetric(m, loader, F.cross_entropy, sv_samples=2, seed=7),
        lambda m, loader: ShapleyAttributionMetric(
            m, loader, F.cross_entropy, sv_samples=2, seed=7, algorithm="reference", reduction="none"
        ),
        lambda m, loader: LeaveOneOutAttributionMetric(m, loader, F.cross_entropy),
        lambda m, loader: WeightNormAttributionMetric(m, loader, F.cross_entropy),
        lambda m, loader: RandomAttributionMetric(m, loader, F.cross_entropy, seed=3),
    ],
    ids=["shapley", "shapley-reference", "leave-one-out", "weight-norm", "random"],
)
def test_metrics_that_cannot_share_a_pass_equal_run_on_each(make):
    model, input_size = build("residual", seed=6)
    x, y = data(input_size, n=6)
    attr = make(model, batches(x, y, 3))
    groups = model_groups(model, input_size)
    targets = [model.blocks[0].conv1, model.fc] + groups
    before = snapshot(model)
    got = attr.run_all(targets)
    assert_unchanged(before, model)
    assert_same_scores(got, [attr.run(t) for t in targets], ["blocks.0.conv1", "fc"] + [group_label(g) for g in groups])
    default = attr.run_all()
    assert list(default) == [group_label(g) for g in groups]


def test_run_all_leaves_the_model_as_found_when_scoring_fails():
    model, input_size = build("residual", seed=7)
    x, y = data(input_size, n=8)
    before = snapshot(model)
    attr = TaylorAttributionMetric(model, batches(x, y, 2), failing_criterion(after_calls=2))
    with pytest.raises(Boom):
        attr.run_all(residual_targets(model, x))
    assert_unchanged(before, model)


def test_bad_targets_are_refused_naming_the_problem():
    model, input_size = build("residual", seed=8)
    x, y = data(input_size, n=4)
    attr = TaylorAttributionMetric(model, batches(x, y), F.cross_entropy)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"targets lists \['stem'\] more than once"):
        attr.run_all([model.stem, model.bn, model.stem])
    with pytest.raises(TypeError, match="targets must be a list"):
        attr.run_all(model.stem)
    with pytest.raises(TypeError, match="targets must hold modules, call sites or groups, got a str"):
        attr.run_all(["stem"])
    with pytest.raises(ValueError, match="not part of the model"):
        attr.run_all([model.stem, nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="unknown option"):
        attr.run_all([model.stem], sv_samples=3)
    assert attr.run_all([]) == {}
    assert_unchanged(before, model)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so it has no coupled groups."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:
            h = h * 1.0
        return self.fc2(h)


def test_without_targets_a_model_without_groups_is_refused_naming_targets():
    torch.manual_seed(0)
    model = Untraceable().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    attr = TaylorAttributionMetric(model, [(x, y)], F.cross_entropy)
    with pytest.raises(ValueError, match="pass targets="):
        attr.run_all()
    got = attr.run_all([model.fc1])  # explicit layers still work (hooks)
    np.testing.assert_allclose(got["fc1"], attr.run(model.fc1), rtol=1e-12)


def test_prune_groups_with_a_metrics_run_scores_every_group_in_one_pass():
    """``prune_groups(pruner, scores=metric.run)`` calls ``run_all`` once: one forward per batch for
    all the groups (not one pass per group), and the same units removed as scoring group by group."""
    from torchpruner import Pruner
    from torchpruner.schedule import prune_groups

    built = {}
    for how in ("run", "group by group"):
        model, input_size = build("residual", seed=6)
        x, y = data(input_size, n=9)
        loader = batches(x, y, 4)  # 3 batches
        attr = TaylorAttributionMetric(model, loader, F.cross_entropy)
        pruner = Pruner(model, input_size=input_size)
        groups = pruner.groups()
        assert len(groups) > 1
        attr.run(groups[0])  # traced once (cached), so the count below is of scoring passes only
        calls = count_forwards(model)
        scores = attr.run if how == "run" else (lambda group, attr=attr: attr.run(group))
        prune_groups(pruner, fraction=0.5, scores=scores)
        built[how] = (len(calls), [pruner.kept_units(m) for m in (model.stem, model.blocks[0].conv1)])
    assert built["run"][0] == len(loader)
    assert built["group by group"][0] == len(groups) * len(loader)
    assert built["run"][1] == built["group by group"][1]
