"""Soft masks that become real prunes (``torchpruner.masking.Masker``), float64.

Oracles:
* the masked model computes what the unmasked twin computes with the units zeroed where the
  groups' consumers read them (the dependency analysis' mask points), and what the model computes
  after ``materialize`` (eval mode);
* masked trajectory: training continued after ``materialize`` with the live optimizer equals
  training the masked model (masks re-applied after every step), parameter and optimizer state
  by parameter, with Adam and SGD momentum;
* ``zero_ratio`` is a direct count, and the zeroed elements are exactly the plan's removed ones;
* refusals change nothing (model bit for bit, masks as they were); masks survive a
  ``torch.save`` / ``torch.load(weights_only=True)`` round trip.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from oracles import (
    assert_state_matches,
    assert_unchanged,
    masked_at_mask_points,
    snapshot,
    train,
    twin_of,
)
from test_attributions_groups import build, model_groups
from test_group_trajectory import CoupledNet, kept_slices
from torch import nn

from torchpruner import FPGMAttributionMetric, Masker, Pruner
from torchpruner.masking import Masker as MaskerFromModule

DTYPE = torch.float64


def probe(input_size, n=5, seed=11):
    return torch.randn((n,) + tuple(input_size), generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def some_units(group, seed=0) -> list[int]:
    """A third of the group's units, drawn with a seed per group (``group.index + 1``: the draws
    these tests were written with, when the model input was numbered group 0)."""
    count = max(1, group.num_units // 3)
    return sorted(np.random.default_rng(seed + group.index + 1).permutation(group.num_units)[:count].tolist())


# --------------------------------------------------------------------------------------------
# Soft equals hard
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["residual", "concat", "separable", "plain"])
def test_masked_model_equals_the_zeroed_twin_and_the_materialized_model(arch):
    model, input_size = build(arch, seed=2)
    x = probe(input_size)
    with torch.no_grad():
        unmasked = model(x)
    twin = copy.deepcopy(model)
    groups = model_groups(model, input_size)
    selection = {group.index: some_units(group) for group in groups}
    masker = Masker(model)
    parameters = dict(model.named_parameters())
    for group in groups:
        masker.mask(group, selection[group.index])
    assert sorted(masker.masked_units.values()) == sorted(selection.values())
    with torch.no_grad():
        soft = model(x)
        with masked_at_mask_points(twin, (x,), selection) as zeroed_twin:
            reference = zeroed_twin(x)
    assert not torch.allclose(soft, unmasked)
    torch.testing.assert_close(soft, reference, rtol=1e-10, atol=1e-12)

    plan = masker.materialize(Pruner(model, input_size=input_size))
    assert plan.removed_parameters > 0 and masker.masked_units == {}
    assert all(param is parameters[name] for name, param in model.named_parameters())
    with torch.no_grad():
        hard = model(x)
    torch.testing.assert_close(hard, soft, rtol=1e-10, atol=1e-12)


def test_masking_a_layer_masks_its_whole_coupled_group():
    model, input_size = build("residual", seed=3)
    masker = Masker(model, input_size=input_size)
    masker.mask(model.stem, [1])
    assert masker.masked_units == {"stem": [1]}
    zero = lambda t: bool((t.detach() == 0).all())
    assert zero(model.stem.weight[1]) and zero(model.stem.bias[1]) and zero(model.bn.weight[1])
    assert zero(model.bn.bias[1]) and zero(model.fc.weight[:, 1])
    for block in model.blocks:  # every source and consumer of the residual stream
        assert zero(block.conv2.weight[1]) and zero(block.bn2.weight[1]) and zero(block.conv1.weight[:, 1])
    assert not zero(model.stem.weight[0]) and not zero(model.blocks[0].conv1.weight[:, 0])
    masker.mask(model.stem, [])  # unmask: the record goes (the zeroed weights stay zero)
    assert masker.masked_units == {}


def test_zero_ratio_is_a_direct_count_of_the_plans_removed_elements():
    model, input_size = build("plain", seed=4)
    twin = copy.deepcopy(model)
    removed = Pruner(twin, input_size=input_size).plan(twin[0], [1, 2])
    masker = Masker(model, input_size=input_size)
    assert set(masker.zero_ratio().values()) == {0.0}
    masker.mask(model[0], [1, 2])
    ratios = masker.zero_ratio()
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if params:
            direct = sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)
            assert ratios[name] == direct, name
    assert ratios["0"] == (2 * 2 * 9 + 2) / (4 * 2 * 9 + 4)  # two filters and their biases
    assert ratios["1"] == 0.5  # BatchNorm: γ and β of 2 of 4 channels
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert zeros == removed.removed_parameters


# --------------------------------------------------------------------------------------------
# Masked trajectory
# --------------------------------------------------------------------------------------------
OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_training_after_materialize_equals_training_the_masked_model(name):
    torch.manual_seed(0)
    model = CoupledNet().double()
    optimizer = OPTIMIZERS[name](model.parameters())
    data = [(torch.randn(6, 3, 6, 6, dtype=DTYPE), torch.randint(0, 3, (6,))) for _ in range(8)]
    train(model, optimizer, data[:2])
    masker = Masker(model, input_size=(3, 6, 6))
    groups = Pruner(model, input_size=(3, 6, 6)).groups()
    masker.mask_by_rate(groups, 0.25, scores=FPGMAttributionMetric(model, None, None))
    assert len(masker.masked_units) == len(groups) >= 3
    with masker.attach(optimizer):
        train(model, optimizer, data[2:4])  # soft pruning: masked weights stay zero
    twin, twin_optimizer = twin_of(model, optimizer, lambda m: OPTIMIZERS[name](m.parameters()))
    twin_masker = Masker(twin)
    twin_masker.load_state_dict(masker.state_dict())
    twin_masker.attach(twin_optimizer)

    plan = masker.materialize(Pruner(model, input_size=(3, 6, 6), optimizer=optimizer))
    assert model.stem.out_channels == 6 and model.gain.shape == (6,)
    assert name == "sgd_momentum" or plan.optimizer_slices
    train(model, optimizer, data[4:])
    train(twin, twin_optimizer, data[4:])
    assert twin_masker.zero_ratio()["stem"] > 0  # the twin's masks held all along

    assert_state_matches(
        model, twin, kept_slices(model), optimizer=optimizer, reference_optimizer=twin_optimizer, rtol=1e-9, atol=1e-12
    )


def test_masked_weights_regrow_without_the_step_hook():
    """Soft filter pruning: without attach() the optimizer's momentum regrows masked weights;
    with it they are zeroed after every step; the hook goes at the end of the block."""
    model, input_size = build("plain", seed=5)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = [(probe(input_size, 6, seed), torch.randint(0, 3, (6,))) for seed in range(6)]
    train(model, optimizer, data[:2])
    masker = Masker(model, input_size=input_size)
    masker.mask(model[0], [0, 3])
    filters = lambda: model[0].weight.detach()[[0, 3]]
    train(model, optimizer, data[2:3])
    assert (filters() != 0).any()
    masker.apply()
    assert (filters() == 0).all()
    with masker.attach(optimizer) as attached:
        assert attached is masker
        for batch in data[3:5]:
            train(model, optimizer, [batch])
            assert (filters() == 0).all()
    assert not optimizer._optimizer_step_post_hooks
    train(model, optimizer, data[5:])
    assert (filters() != 0).any()
    masker.attach(optimizer)
    masker.remove()
    assert not optimizer._optimizer_step_post_hooks


# --------------------------------------------------------------------------------------------
# Choosing by a criterion
# --------------------------------------------------------------------------------------------
def test_mask_by_rate_takes_the_lowest_scores_per_layer():
    model, input_size = build("plain", seed=6)
    groups = model_groups(model, input_size)
    fpgm = FPGMAttributionMetric(model, None, None)
    (first,) = [g for g in groups if g.sources[0].module is model[0]]
    expected = sorted(np.argsort(fpgm.run(first), kind="stable")[:2].tolist())
    masker = Masker(model)
    selection = masker.mask_by_rate(groups, {model[0]: 0.5}, scores=fpgm)
    assert {g.index: u for g, u in selection.items()} == {first.index: expected}
    assert masker.masked_units == {"0": expected}
    masker.mask_by_rate(groups, 0.25)  # every group, by L1 weight norms; replaces
    assert set(masker.masked_units) == {"0", "3"} and len(masker.masked_units["0"]) == 1
    masker.mask_by_rate(groups, 0.0)
    assert masker.masked_units == {}
    with pytest.raises(TypeError, match="rate_dist_per_layer"):
        masker.mask_by_rate(groups, "0.3")
    with pytest.raises(ValueError, match="fraction"):
        masker.mask_by_rate(groups, 1.5)


def test_layer_by_layer_masks_one_group_per_step():
    model, input_size = build("plain", seed=7)
    groups = model_groups(model, input_size)
    masker = Masker(model)
    seen = []
    for group, units in masker.layer_by_layer(groups, 0.5, scores=FPGMAttributionMetric(model, None, None)):
        seen.append(group.index)
        assert len(masker.masked_units) == len(seen) and len(units) == group.num_units // 2
    assert seen == [g.index for g in groups]


# --------------------------------------------------------------------------------------------
# Saving, refusing
# --------------------------------------------------------------------------------------------
def test_a_masked_model_saves_and_loads():
    model, input_size = build("residual", seed=8)
    masker = Masker(model, input_size=input_size)
    masker.mask(model.stem, [0, 2])
    masker.mask(model.blocks[1].conv1, [1])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "masks": masker.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh, _ = build("residual", seed=9)
    fresh.load_state_dict(saved["model"])
    loaded = Masker(fresh)
    loaded.load_state_dict(saved["masks"])
    assert loaded.masked_units == masker.masked_units
    assert loaded.keep_masks().keys() == masker.keep_masks().keys()
    assert all(torch.equal(loaded.keep_masks()[k], v) for k, v in masker.keep_masks().items())
    x = probe(input_size)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    masker.materialize(Pruner(model, input_size=input_size))
    loaded.materialize(Pruner(fresh, input_size=input_size))
    assert repr(fresh) == repr(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-12, atol=1e-12)


def test_refusals_change_nothing():
    model, input_size = build("residual", seed=10)
    other, _ = build("residual", seed=10)
    masker = Masker(model, input_size=input_size)
    masker.mask(model.blocks[0].conv1, [0])
    before, masks = snapshot(model), masker.state_dict()
    (stream,) = [g for g in model_groups(model, input_size) if len(g.sources) > 1]
    refusals = [
        (lambda: masker.mask(model.stem, [7]), ValueError, "out of range|range"),
        (lambda: masker.mask(model.stem, [1, 1]), ValueError, "duplicate"),
        (lambda: masker.mask(stream, list(range(stream.num_units))), ValueError, "every unit"),
        (lambda: masker.mask(other.stem, [0]), ValueError, "not .*model|not part"),
        (lambda: masker.mask(model_groups(other, input_size)[0], [0]), ValueError, "another model"),
        (lambda: masker.mask("stem", [0]), TypeError, "nn.Module"),
        (lambda: Masker(model).mask(model.stem, [0]), ValueError, "input_size"),
        (lambda: masker.materialize(Pruner(other, input_size=input_size)), ValueError, "another model"),
        (
            lambda: masker.load_state_dict(
                {
                    "masks": {
                        "stem": {
                            "units": torch.tensor([0]),
                            "num_units": 4,
                            "keep": {"stem.weight": torch.ones(3, 2, 3, 3)},
                        }
                    }
                }
            ),
            ValueError,
            "shape",
        ),
        (lambda: masker.mask_by_rate(model_groups(model, input_size), {other.stem: 0.5}), ValueError, "ratios"),
    ]
    for call, error, match in refusals:
        with pytest.raises(error, match=match):
            call()
        assert_unchanged(before, model)
        assert masker.masked_units == {key: entry["units"].tolist() for key, entry in masks["masks"].items()}


def test_masker_is_exported():
    assert Masker is MaskerFromModule
    assert isinstance(Masker(nn.Linear(2, 2)).zero_ratio(), dict)


def test_masking_whole_input_groups_of_a_grouped_consumer_is_pruning_them():
    """The grouped consumer's outputs of the removed conv groups are masked with them (weights and
    bias), so the masked model is the materialized one."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 3, 1))
        .to(DTYPE)
        .eval()
    )
    x = probe((2, 5, 5))
    masker = Masker(model)
    masker.mask(Pruner(model, input_size=(2, 5, 5)).groups()[0], [4, 5, 6, 7])
    with torch.no_grad():
        soft = model(x)
    masker.materialize(Pruner(model, input_size=(2, 5, 5)))
    assert model[2].groups == 1 and model[2].out_channels == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), soft, rtol=1e-12, atol=1e-12)
