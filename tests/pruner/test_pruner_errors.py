"""Every bad input raises a ValueError/TypeError naming the module and the problem, and leaves the
model (tensors, gradients, attributes) and the optimizer state bit-for-bit unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations
from torch.nn.utils import prune as torch_prune

from torchpruner.pruner import Pruner

from oracles import assert_unchanged, snapshot


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(6, 6)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(6, 3)
        self.soft = nn.Softmax(dim=1)

    def forward(self, x):
        h = self.drop(self.act(self.bn(self.fc1(x))))
        return self.soft(self.fc3(self.act2(self.fc2(h))))


def trained():
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).log().mean().backward()
        optimizer.step()
    return model, optimizer


def good_cascade(m):
    return [m.bn, m.drop, m.fc2]


BAD_INPUTS = {
    "out-of-range": (lambda m: (m.fc1, [6], good_cascade(m)), ValueError, "'fc1'.*out of range"),
    "negative": (lambda m: (m.fc1, [-1], good_cascade(m)), ValueError, "'fc1'.*negative"),
    "duplicated": (lambda m: (m.fc1, [1, 1], good_cascade(m)), ValueError, "'fc1'.*duplicates"),
    "float": (lambda m: (m.fc1, [1.0], good_cascade(m)), TypeError, "'fc1'.*integers"),
    "bool": (lambda m: (m.fc1, [True], good_cascade(m)), TypeError, "'fc1'.*integers"),
    "bool-tensor": (lambda m: (m.fc1, torch.tensor([True, False]), good_cascade(m)), TypeError, "'fc1'"),
    "float-numpy": (lambda m: (m.fc1, np.array([1.5]), good_cascade(m)), TypeError, "'fc1'"),
    "string": (lambda m: (m.fc1, "12", good_cascade(m)), TypeError, "'fc1'"),
    "nested": (lambda m: (m.fc1, torch.tensor([[1]]), good_cascade(m)), TypeError, "'fc1'.*one-dimensional"),
    "every-unit": (lambda m: (m.fc1, list(range(6)), good_cascade(m)), ValueError, "'fc1'.*every unit"),
    "module-not-in-model": (lambda m: (nn.Linear(4, 6), [1], good_cascade(m)), ValueError, "not part of the model"),
    "cascade-not-in-model": (lambda m: (m.fc1, [1], [m.bn, nn.Linear(6, 6)]), ValueError, "not part of the model"),
    "no-slicing-rule": (lambda m: (m.fc1, [1], good_cascade(m) + [m.soft]), TypeError, "'soft'.*no slicing rule"),
    "pass-through-source": (lambda m: (m.bn, [1], [m.fc2]), ValueError, "'bn'.*passes"),
    "input-does-not-depend": (lambda m: (m.fc1, [1], good_cascade(m) + [m.fc3]), ValueError, "'fc3'.*does not depend"),
    "consumer-missing": (lambda m: (m.fc1, [1], [m.bn, m.drop]), ValueError, "'fc2'.*not in cascading_modules"),
    "bn-missing": (lambda m: (m.fc1, [1], [m.fc2]), ValueError, "'bn'.*not in cascading_modules"),
    "into-softmax-over-units": (lambda m: (m.fc3, [1], []), ValueError, "'soft'.*mixes the units"),
    "source-in-cascade": (lambda m: (m.fc1, [1], good_cascade(m) + [m.fc1]), ValueError, "'fc1'.*pruned layer"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_changes_nothing(case):
    make_args, error, match = BAD_INPUTS[case]
    model, optimizer = trained()
    pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
    before = snapshot(model, optimizer)
    with pytest.raises(error, match=match):
        pruner.prune_model(*make_args(model))
    assert_unchanged(before, model, optimizer)


def test_tied_weights_refused():
    model, optimizer = trained()
    model.fc2b = nn.Linear(6, 6)
    model.fc2b.weight = model.fc2.weight  # registered in two modules
    pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="'fc2.weight' is tied to.*fc2b.weight"):
        pruner.prune_model(model.fc2, [1], [model.act2, model.fc3])
    assert_unchanged(before, model, optimizer)


@pytest.mark.parametrize("kind", ["weight_norm", "prune_mask", "orthogonal"])
def test_parametrized_weights_refused(kind):
    model, _ = trained()
    if kind == "weight_norm":
        parametrizations.weight_norm(model.fc2)
    elif kind == "orthogonal":
        parametrizations.orthogonal(model.fc2)
    else:
        torch_prune.l1_unstructured(model.fc2, "weight", amount=0.3)
    pruner = Pruner(model, input_size=(4,))
    before = snapshot(model)
    with pytest.raises(ValueError, match="'fc2'.*(parametriz|mask)"):
        pruner.prune_model(model.fc1, [1], good_cascade(model))
    assert_unchanged(before, model)


class Reshaping(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(16, 2)
        self.mode = mode

    def forward(self, x):
        h = self.conv(x)
        if self.mode == "hard-coded":
            h = h.view(-1, 16)
        elif self.mode == "merge":
            h = (h + self.conv2(x)).flatten(1)
        else:
            h = h.flatten(1)
        return self.fc(h)


@pytest.mark.parametrize(
    "mode,match",
    [
        ("hard-coded", "'conv'.*hard-coded"),
        ("merge", "'conv2'.*shares the pruned units of 'conv'.*not in cascading_modules"),
    ],
)
def test_data_flow_refusals(mode, match):
    model = Reshaping(mode)
    pruner = Pruner(model, input_size=(1, 4, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        pruner.prune_model(model.conv, [1], [model.fc])
    assert_unchanged(before, model)


def test_empty_indices_is_a_no_op():
    model, optimizer = trained()
    pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
    before = snapshot(model, optimizer)
    plan = pruner.prune_model(model.fc1, [], good_cascade(model))
    assert plan.is_empty and "nothing to do" in str(plan)
    assert_unchanged(before, model, optimizer)


def test_missing_input_description():
    model, _ = trained()
    with pytest.raises(ValueError, match="input_size"):
        Pruner(model).prune_model(model.fc1, [1], good_cascade(model))


def test_data_parallel_refused():
    with pytest.raises(TypeError, match="DataParallel"):
        Pruner(nn.DataParallel(Net()), input_size=(4,))


def test_bad_options():
    model, _ = trained()
    with pytest.raises(ValueError, match="dropout_policy"):
        Pruner(model, input_size=(4,), dropout_policy="half")
    with pytest.raises(ValueError, match="direction"):
        Pruner(model).prune_module(model.fc1, [1], direction="sideways")
    with pytest.raises(ValueError, match="'fc1'.*no parameter or buffer named 'kernel'"):
        Pruner(model).prune_parameter(model.fc1, "kernel", [1])
