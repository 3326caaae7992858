"""The 2020 TorchPruner's calls keep working: where scores are computed
(``attr.find_evaluation_module`` and ``find_best_module_for_attributions``), now answered by the
traced graph, and the 2020 Pruner calls on the 2020 example models (see docs/migration.md)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchpruner
from oracles import assert_unchanged, snapshot
from torchpruner import Pruner
from torchpruner.attributions import (
    APoZAttributionMetric,
    RandomAttributionMetric,
    SensitivityAttributionMetric,
    ShapleyAttributionMetric,
    TaylorAttributionMetric,
    WeightNormAttributionMetric,
)
from torchpruner.graph import CallSite
from torchpruner.utils import find_best_module_for_attributions

DATA_METRICS = [TaylorAttributionMetric, SensitivityAttributionMetric, ShapleyAttributionMetric, APoZAttributionMetric]
DATA_FREE_METRICS = [WeightNormAttributionMetric, RandomAttributionMetric]


def loader(features: int, n: int = 12, batch_size: int = 4, shuffle: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, features, generator=generator)
    y = torch.randn(n, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def linear_bn_relu() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))


class RegisteredOutOfOrder(nn.Module):
    """Registration order fc1, bn2, fc2, act; data flow fc1 -> act -> fc2 -> bn2. Walking
    ``model.modules()`` from fc1 meets bn2 (fc2's BatchNorm, 6 units) first."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.bn2 = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn2(self.fc2(self.act(self.fc1(x)))))


class FunctionalAndReused(nn.Module):
    """fc1 -> F.relu; fc2 -> shared ReLU (call 0); fc3 -> shared ReLU (call 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 6)
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.head(self.relu(self.fc3(x)))


class Residual(nn.Module):
    """conv -> bn -> (+ skip): the point stops at the add, after the BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.head = nn.Linear(2 * 4 * 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(torch.relu(self.bn(self.conv(x)) + x), 1))


# --------------------------------------------------------------------------------------------
# attr.find_evaluation_module
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", DATA_METRICS, ids=lambda m: m.__name__)
def test_data_metrics_move_past_batchnorm_and_activation(metric):
    model = linear_bn_relu()
    attr = metric(model, loader(3), F.mse_loss, "cpu")
    assert attr.find_evaluation_module(model[0], find_best_evaluation_module=True) is model[2]
    assert attr.find_evaluation_module(model[0]) is model[0]
    assert attr.find_evaluation_module(model[1], True) is model[2]


@pytest.mark.parametrize("metric", DATA_FREE_METRICS, ids=lambda m: m.__name__)
def test_metrics_without_data_score_the_layer_itself(metric):
    model = linear_bn_relu()
    attr = metric(model, loader(3), F.mse_loss, "cpu")
    assert attr.find_evaluation_module(model[0], find_best_evaluation_module=True) is model[0]
    assert attr.find_evaluation_module(model[0], False) is model[0]


def test_follows_the_data_flow_not_the_registration_order():
    model = RegisteredOutOfOrder()
    attr = TaylorAttributionMetric(model, loader(3), F.mse_loss, "cpu")
    assert attr.find_evaluation_module(model.fc1, True) is model.act
    assert attr.find_evaluation_module(model.fc2, True) is model.bn2
    assert find_best_module_for_attributions(model, model.fc1, input_size=(3,)) is model.act


def test_functional_activation_and_reused_module_give_the_call_site():
    model = FunctionalAndReused()
    attr = TaylorAttributionMetric(model, loader(3), F.mse_loss, "cpu")
    after_fc1 = attr.find_evaluation_module(model.fc1, True)
    assert isinstance(after_fc1, CallSite) and after_fc1.kind == "function" and after_fc1.num_units == 5
    assert attr.find_evaluation_module(model.fc2, True) is model.relu  # first call of the ReLU
    after_fc3 = attr.find_evaluation_module(model.fc3, True)  # its second call
    assert isinstance(after_fc3, CallSite) and after_fc3.module is model.relu and after_fc3.call_index == 1


def test_stops_at_a_merge():
    torch.manual_seed(0)
    model = Residual()
    data = [(torch.randn(4, 2, 4, 4), torch.randn(4, 1))]
    attr = SensitivityAttributionMetric(model, data, F.mse_loss, "cpu")
    assert attr.find_evaluation_module(model.conv, True) is model.bn
    assert torchpruner.find_best_module_for_attributions(model, model.conv, (2, 4, 4)) is model.bn


@pytest.mark.parametrize("model_fn", [linear_bn_relu, FunctionalAndReused], ids=["sequential", "functional"])
@pytest.mark.parametrize(
    "metric", [TaylorAttributionMetric, SensitivityAttributionMetric, APoZAttributionMetric], ids=lambda m: m.__name__
)
def test_scoring_the_returned_point_is_scoring_with_find_best(model_fn, metric):
    """What find_evaluation_module returns, passed to run, scores exactly where
    run(layer, find_best_evaluation_module=True) does."""
    model = model_fn()
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    attr = metric(model, loader(3), F.mse_loss, "cpu")
    for layer in layers:
        point = attr.find_evaluation_module(layer, True)
        np.testing.assert_array_equal(attr.run(point), attr.run(layer, find_best_evaluation_module=True))


def test_leaves_the_model_as_found():
    model = linear_bn_relu()
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    rng = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    before = snapshot(model)
    attr = ShapleyAttributionMetric(model, loader(3, shuffle=True), F.mse_loss, "cpu")
    assert attr.find_evaluation_module(model[0], True) is model[2]
    assert find_best_module_for_attributions(model, model[0], (3,)) is model[2]
    assert_unchanged(before, model)
    assert model.training and torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]


def test_bad_arguments_are_refused_by_name():
    model = linear_bn_relu()
    attr = TaylorAttributionMetric(model, loader(3), F.mse_loss, "cpu")
    with pytest.raises(ValueError, match="not part of the model"):
        attr.find_evaluation_module(nn.Linear(3, 4), True)
    with pytest.raises(TypeError, match="nn.Module or a CallSite"):
        attr.find_evaluation_module("0", True)
    with pytest.raises(ValueError, match="container"):
        attr.find_evaluation_module(model, True)
    group = Pruner(model, input_size=(3,)).groups()[0]
    with pytest.raises(TypeError, match="coupled group"):
        attr.find_evaluation_module(group)
    with pytest.raises(ValueError, match="yielded no batches"):
        TaylorAttributionMetric(model, [], F.mse_loss, "cpu").find_evaluation_module(model[0], True)


# --------------------------------------------------------------------------------------------
# find_best_module_for_attributions (the 2020 helper)
# --------------------------------------------------------------------------------------------
def test_helper_is_importable_where_it_was_in_2020():
    from torchpruner.attributions import find_best_module_for_attributions as from_attributions

    assert from_attributions is find_best_module_for_attributions is torchpruner.find_best_module_for_attributions


def test_helper_agrees_with_the_metric():
    model = FunctionalAndReused()
    attr = TaylorAttributionMetric(model, loader(3), F.mse_loss, "cpu")
    helper = find_best_module_for_attributions
    for layer in (model.fc1, model.fc2, model.fc3):
        expected = attr.find_evaluation_module(layer, True)
        found = helper(model, layer, example_inputs=torch.randn(2, 3))
        assert found is expected if isinstance(expected, nn.Module) else found.name == expected.name


def test_helper_needs_the_input_and_refuses_bad_modules():
    model = linear_bn_relu()
    helper = find_best_module_for_attributions
    with pytest.raises(ValueError, match="input_size"):
        helper(model, model[0])
    with pytest.raises(ValueError, match="not a submodule"):
        helper(model, nn.Linear(3, 4), (3,))
    with pytest.raises(TypeError, match="nn.Module"):
        helper(model, 0, (3,))
    outer = nn.Sequential(nn.Sequential(nn.Linear(3, 2)), nn.ReLU())
    with pytest.raises(ValueError, match="container"):
        helper(outer, outer[0], (3,))
    with pytest.raises(ValueError, match="call_index 1 does not exist"):
        helper(model, model[0], (3,), call_index=1)


# --------------------------------------------------------------------------------------------
# The 2020 Pruner calls, on models like the 2020 examples
# --------------------------------------------------------------------------------------------
def test_the_2020_pruner_calls():
    torch.manual_seed(0)
    x = torch.ones(10, 3)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 1))
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.01)
    model(x).mean().backward()
    sgd.step()
    pruner = Pruner(model, input_size=(3,), device="cpu", optimizer=sgd)
    weight = model[0].weight
    pruner.prune_model(model[0], [0], [model[1], model[2], model[3]])
    assert model[0].weight is weight and weight.shape == (4, 3) and model[3].weight.shape == (1, 4)
    assert model[1].running_mean.shape == (4,) and model[2].p == pytest.approx(0.5 * 4 / 5)
    assert sgd.state[weight]["momentum_buffer"].shape == (4, 3)
    sgd.zero_grad()
    model(x).mean().backward()
    sgd.step()
    assert model(x).shape == (10, 1)

    single = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    low_level = Pruner(single, input_size=(3,), device="cpu")
    low_level.prune_parameter(single[0], "weight", [0], axis=0)
    low_level.prune_parameter(single[0], "bias", [0], axis=0)
    assert single[0].weight.shape == (1, 3) and single[0].bias.shape == (1,)
    low_level.prune_module(single[2], [0], direction="in")
    assert single[2].weight.shape == (1, 1) and single(torch.ones(2, 3)).shape == (2, 1)
