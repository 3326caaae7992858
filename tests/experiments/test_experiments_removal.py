"""The criteria study's cheap removal curves compute exactly what the plain ones compute: the suffix
after a layer's activation (run on activations computed once) gives the same losses bit for bit as
the whole model with a mask hook, and a Pruner check planned once on the trained model and applied
to a copy removes what a Pruner on that copy removes."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from experiments import compare_criteria
from experiments.common import reproducible
from experiments.data import load_dataset
from experiments.models import build_model, prunable_layers


@pytest.fixture(scope="module")
def trained():
    """A small CNN and a VGG-style net, briefly trained on digits, and the cached test batches."""
    splits = load_dataset("digits")
    models = {}
    with reproducible(1):
        for arch, options in (
            ("cnn", {"widths": (6, 8), "hidden": 12}),
            ("vgg", {"config": (8, "M", 12, "M", 16), "hidden": 10}),
        ):
            torch.manual_seed(0)
            model = build_model(arch, splits.input_size, splits.num_classes, **options)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            train, _, test = splits.loaders(batch_size=128)
            for inputs, targets in train:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(inputs), targets).backward()
                optimizer.step()
            models[arch] = model.eval()
    return splits, models, compare_criteria.cached_batches(test, "cpu")


@pytest.mark.parametrize("arch", ["cnn", "vgg"])
def test_suffix_curve_is_the_masked_model_bit_for_bit(trained, arch):
    splits, models, batches = trained
    model = models[arch]
    with reproducible(1):
        for layer in prunable_layers(model):
            suffix = compare_criteria.suffix_after(model, layer.activation)
            assert suffix is not None, layer.name
            order = np.random.default_rng(0).permutation(layer.num_units)[: layer.num_units - 1]
            plain = compare_criteria.masked_curve(model, layer, order, batches, "cpu")
            fast = compare_criteria.masked_curve(model, layer, order, batches, "cpu", suffix=suffix)
            assert fast == plain, layer.name  # the same floats, not merely close
            assert len(fast[0]) == layer.num_units and fast[0][-1] > fast[0][0]


class SkipNet(nn.Module):
    """A later op reads a tensor from before the activation: there is no suffix of the activation alone."""

    def __init__(self):
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.relu(h)) + h


def test_no_suffix_where_the_rest_reads_more_than_the_activation():
    model = SkipNet()
    assert compare_criteria.suffix_after(model, model.relu) is None
    assert compare_criteria.suffix_after(model, nn.ReLU()) is None  # not a module of the model
    chain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    suffix = compare_criteria.suffix_after(chain, chain[1])
    z = torch.randn(3, 4)
    assert torch.equal(suffix(z), chain[2](z))


@pytest.mark.parametrize("arch", ["cnn", "vgg"])
def test_check_planned_on_the_model_equals_a_pruner_on_the_copy(trained, arch):
    splits, models, batches = trained
    model = models[arch]
    before = copy.deepcopy(model.state_dict())
    pruner = compare_criteria.make_pruner(model, splits.input_size, "cpu")
    with reproducible(1):
        for layer in prunable_layers(model):
            units = list(range(1, layer.num_units, 2))
            reused = compare_criteria.prune_copy(
                model, layer.name, units, batches, splits.input_size, "cpu", pruner=pruner
            )
            fresh = compare_criteria.prune_copy(model, layer.name, units, batches, splits.input_size, "cpu")
            assert reused == fresh and reused[2] == layer.num_units - len(units)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())  # untouched
