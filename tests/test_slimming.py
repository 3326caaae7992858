"""Network slimming: BN-scale scores, L1 on BatchNorm scales (update_bn), group lasso, and the
one-call prune with BN scale. Every quantity is checked against a direct float64 computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracles import assert_unchanged, snapshot
from torch import nn

import torchpruner
from torchpruner import Pruner, load_pruned, prune_groups, save_pruned
from torchpruner.attributions import (
    BNScaleAttributionMetric,
    WeightNormAttributionMetric,
)
from torchpruner.regularize import (
    GroupLasso,
    group_lasso,
    prunable_batchnorms,
    update_bn,
)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def scramble_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random γ of both signs (one exactly zero) and random β / running statistics."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            n = module.num_features
            module.weight.data = torch.randn(n, generator=generator, dtype=module.weight.dtype)
            module.weight.data[0] = 0.0
            module.bias.data = torch.randn(n, generator=generator, dtype=module.bias.dtype)
            module.running_mean.data = torch.randn(n, generator=generator, dtype=module.running_mean.dtype)
            module.running_var.data = torch.rand(n, generator=generator, dtype=module.running_var.dtype) + 0.5
    return model


class Chain(nn.Module):
    """conv -> BN -> ReLU -> conv -> ReLU -> BN -> pool -> flatten -> fc1 -> fc2 (no BN after fc1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(self.bn2(torch.relu(self.conv2(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class Residual(nn.Module):
    """A residual stream (stem, block conv2, depthwise conv: one group) and a chain group (c1)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(6)
        self.c1 = nn.Conv2d(6, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.c2 = nn.Conv2d(5, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.bn3 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(x + self.bn2(self.c2(y)))
        x = torch.relu(self.bn3(self.dw(x)))
        return self.head(x.mean((2, 3)))


class Concat(nn.Module):
    """Two branches concatenated, then one BatchNorm over the concatenation."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(7)
        self.out = nn.Conv2d(7, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))).mean((2, 3))


def loader(shape, batches=2, size=4, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, *shape, generator=generator, dtype=torch.float64),
            torch.randint(0, classes, (size,), generator=generator),
        )
        for _ in range(batches)
    ]


def group_with(groups, module):
    return next(g for g in groups if any(m is module for m in g.source_modules))


def abs_gamma(bn):
    return bn.weight.detach().abs().numpy()


# --------------------------------------------------------------------------------------------
# BNScaleAttributionMetric
# --------------------------------------------------------------------------------------------
def test_bn_scale_of_a_layer_is_abs_gamma_of_the_batchnorm_after_it():
    model = scramble_batchnorms(Chain().double())
    data = loader((2, 8, 8))
    metric = BNScaleAttributionMetric(model, data, F.cross_entropy)
    np.testing.assert_array_equal(metric.run(model.conv1), abs_gamma(model.bn1))
    np.testing.assert_array_equal(metric.run(model.bn1), abs_gamma(model.bn1))
    # conv2 -> ReLU -> BN: the BatchNorm after the activation scales the same channels
    np.testing.assert_array_equal(metric.run(model.conv2), abs_gamma(model.bn2))
    np.testing.assert_array_equal(metric.run(model.conv1, find_best_evaluation_module=True), abs_gamma(model.bn1))
    assert metric.run(model.conv1).dtype == np.float64


def test_bn_scale_reads_no_data_for_a_batchnorm_or_a_group_and_one_batch_for_a_layer():
    model = scramble_batchnorms(Chain().double())

    class Counting:
        batches = 0

        def __iter__(self):
            for batch in loader((2, 8, 8), batches=3):
                Counting.batches += 1
                yield batch

    metric = BNScaleAttributionMetric(model, Counting(), F.cross_entropy)
    metric.run(model.bn2)
    groups = Pruner(model, input_size=(2, 8, 8)).groups(ignored_layers=[model.fc1])
    for group in groups:
        metric.run(group)
    assert Counting.batches == 0
    metric.run(model.conv1)
    assert Counting.batches <= 1
    # no data generator at all: BatchNorms and groups still score
    bare = BNScaleAttributionMetric(model, None, None)
    np.testing.assert_array_equal(bare.run(model.bn1), abs_gamma(model.bn1))
    with pytest.raises(ValueError, match="data generator"):
        bare.run(model.conv1)


def test_bn_scale_of_a_group_sums_abs_gamma_over_the_groups_batchnorms():
    model = scramble_batchnorms(Residual().double())
    pruner = Pruner(model, input_size=(3, 8, 8))
    groups = pruner.groups()
    metric = BNScaleAttributionMetric(model, None, None)
    stream = group_with(groups, model.stem)
    expected = abs_gamma(model.bn0) + abs_gamma(model.bn2) + abs_gamma(model.bn3)
    np.testing.assert_allclose(metric.run(stream), expected, rtol=0, atol=1e-15)
    chain = group_with(groups, model.c1)
    np.testing.assert_array_equal(metric.run(chain), abs_gamma(model.bn1))
    # run(module) keeps its local meaning: only the BatchNorm right after the layer
    np.testing.assert_array_equal(
        BNScaleAttributionMetric(model, loader((3, 8, 8)), F.cross_entropy).run(model.c2), abs_gamma(model.bn2)
    )


def test_bn_scale_of_a_concatenation_maps_the_batchnorm_channels_to_each_branch():
    model = scramble_batchnorms(Concat().double())
    groups = Pruner(model, input_size=(2, 6, 6)).groups()
    metric = BNScaleAttributionMetric(model, None, None)
    gamma = abs_gamma(model.bn)
    np.testing.assert_array_equal(metric.run(group_with(groups, model.a)), gamma[:3])
    np.testing.assert_array_equal(metric.run(group_with(groups, model.b)), gamma[3:])


def test_bn_scale_refuses_layers_and_groups_without_a_batchnorm():
    model = scramble_batchnorms(Chain().double())
    metric = BNScaleAttributionMetric(model, loader((2, 8, 8)), F.cross_entropy)
    with pytest.raises(ValueError, match=r"no BatchNorm follows 'fc1' \(Linear\).*ignored_layers"):
        metric.run(model.fc1)
    fc_group = group_with(Pruner(model, input_size=(2, 8, 8)).groups(), model.fc1)
    with pytest.raises(ValueError, match="holds no BatchNorm with a scale"):
        metric.run(fc_group)
    plain = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3, affine=False), nn.ReLU(), nn.Conv2d(3, 1, 1))
    with pytest.raises(ValueError, match="affine=False"):
        BNScaleAttributionMetric(plain, None, None).run(plain[1])
    with pytest.raises(ValueError, match="holds no BatchNorm with a scale"):
        BNScaleAttributionMetric(plain, None, None).run(Pruner(plain, input_size=(1, 4, 4)).groups()[0])


def test_bn_scale_is_exported_and_leaves_the_model_as_found():
    assert torchpruner.BNScaleAttributionMetric is BNScaleAttributionMetric
    assert "BNScaleAttributionMetric" in torchpruner.__all__
    model = scramble_batchnorms(Chain().double()).train()
    before = snapshot(model)
    BNScaleAttributionMetric(model, loader((2, 8, 8)), F.cross_entropy).run(model.conv2)
    assert_unchanged(before, model)


# --------------------------------------------------------------------------------------------
# update_bn: L1 on BatchNorm scales
# --------------------------------------------------------------------------------------------
class WithHead(nn.Module):
    """Chain plus a frozen BatchNorm, a non-affine one and a BatchNorm on the classifier output."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.bn3 = nn.BatchNorm2d(4, affine=False)
        self.fc = nn.Linear(4, 3)
        self.bn_out = nn.BatchNorm1d(3)  # on the model output: in no prunable group

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.bn_out(self.fc(x.mean((2, 3))))


def with_grads(model, seed=0):
    model.train()
    inputs, targets = loader((2, 6, 6), batches=1, size=6, seed=seed)[0]
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(inputs), targets).backward()
    return model


def grads(model):
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def test_update_bn_adds_s_sign_gamma_to_exactly_the_batchnorm_weight_grads():
    model = with_grads(scramble_batchnorms(WithHead().double()))
    before = grads(model)
    s = 1e-3
    assert update_bn(model, s=s) == 3  # bn1, bn2, bn_out; bn3 has no γ
    after = grads(model)
    for name, parameter in model.named_parameters():
        expected = before[name]
        if name in ("bn1.weight", "bn2.weight", "bn_out.weight"):
            expected = expected + s * torch.sign(parameter.detach())
            assert (after[name] != before[name]).any()
        torch.testing.assert_close(after[name], expected, rtol=0, atol=0)
    assert model.bn1.weight.detach()[0] == 0 and after["bn1.weight"][0] == before["bn1.weight"][0]  # sign(0) = 0


def test_update_bn_on_a_pruner_or_groups_only_touches_prunable_batchnorms():
    model = with_grads(scramble_batchnorms(WithHead().double()))
    pruner = Pruner(model, input_size=(2, 6, 6))
    assert {id(m) for m in prunable_batchnorms(pruner)} == {id(model.bn1), id(model.bn2), id(model.bn3)}
    before = grads(model)
    assert update_bn(model, s=0.5, layers=pruner) == 2  # bn3 is prunable but has no γ
    after = grads(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"bn1.weight", "bn2.weight"}
    # a list of BatchNorms, a group, or a mix
    model.zero_grad()
    with_grads(model)
    before = grads(model)
    group = group_with(pruner.groups(), model.conv2)
    assert update_bn(model, 0.5, [model.bn_out, group]) == 2
    after = grads(model)
    assert {name for name in before if not torch.equal(before[name], after[name])} == {"bn2.weight", "bn_out.weight"}


def test_update_bn_skips_batchnorms_without_a_gradient():
    model = scramble_batchnorms(WithHead().double())
    model.bn1.weight.requires_grad_(False)
    with_grads(model)
    assert model.bn1.weight.grad is None
    assert update_bn(model, 1e-2) == 2
    assert model.bn1.weight.grad is None
    fresh = WithHead().double()
    assert update_bn(fresh, 1e-2) == 0  # before any backward: nothing to add to
    assert all(p.grad is None for p in fresh.parameters())


@pytest.mark.parametrize(
    "s, error",
    [
        (-1e-4, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("1e-4", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_update_bn_refuses_a_bad_strength_and_changes_nothing(s, error):
    model = with_grads(scramble_batchnorms(WithHead().double()))
    before = snapshot(model)
    with pytest.raises(error, match="s must be"):
        update_bn(model, s)
    assert_unchanged(before, model)


def test_update_bn_refuses_layers_that_are_not_the_models_batchnorms():
    model = with_grads(scramble_batchnorms(WithHead().double()))
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"'conv1' \(Conv2d\), which is not a BatchNorm"):
        update_bn(model, 1e-4, [model.bn1, model.conv1])
    with pytest.raises(ValueError, match="not part of the model"):
        update_bn(model, 1e-4, [model.bn1, nn.BatchNorm2d(5)])
    with pytest.raises(TypeError, match="wrap it in a list"):
        update_bn(model, 1e-4, model.bn1)
    with pytest.raises(TypeError, match="layers must be"):
        update_bn(model, 1e-4, 3)
    with pytest.raises(TypeError, match="model must be"):
        update_bn([model.bn1], 1e-4)
    assert_unchanged(before, model)


def _sgd_steps(model, batches, s, scaler=None, unscale_first=True):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for inputs, targets in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        if scaler is None:
            loss.backward()
            update_bn(model, s)
            optimizer.step()
            continue
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(optimizer)
            update_bn(model, s)
        else:
            update_bn(model, s)
            scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
    return model


def test_update_bn_after_gradscaler_unscale_matches_training_without_a_scaler():
    torch.manual_seed(0)
    reference = scramble_batchnorms(WithHead().double())
    scaled = scramble_batchnorms(WithHead().double())
    scaled.load_state_dict(reference.state_dict())
    wrong = scramble_batchnorms(WithHead().double())
    wrong.load_state_dict(reference.state_dict())
    batches = loader((2, 6, 6), batches=3, size=6)
    s = 0.05
    _sgd_steps(reference.train(), batches, s)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=True)
    _sgd_steps(scaled.train(), batches, s, scaler=scaler)
    assert scaler.get_scale() == 2.0**12  # no step was skipped
    for (name, p), q in zip(reference.named_parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12, msg=name)
    # before unscale_ the term is divided by the scale: the documented order matters
    _sgd_steps(wrong.train(), batches, s, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12), unscale_first=False)
    assert not torch.allclose(wrong.bn1.weight, reference.bn1.weight, rtol=0, atol=1e-6)


def test_update_bn_with_gradient_accumulation_once_per_step_or_scaled_per_micro_batch():
    inputs, targets = loader((2, 6, 6), batches=1, size=6, seed=3)[0]
    micro = list(zip(inputs.split(2), targets.split(2)))
    s = 0.1
    model = scramble_batchnorms(WithHead().double()).eval()  # eval: BatchNorm statistics do not depend on the split

    def gradient(step):
        model.zero_grad(set_to_none=True)
        step()
        return grads(model)

    def full_batch():
        F.cross_entropy(model(inputs), targets).backward()
        update_bn(model, s)

    def once_per_step():
        for x, y in micro:
            (F.cross_entropy(model(x), y) / len(micro)).backward()
        update_bn(model, s)

    def per_micro_batch():
        for x, y in micro:
            (F.cross_entropy(model(x), y) / len(micro)).backward()
            update_bn(model, s / len(micro))

    reference = gradient(full_batch)
    for step in (once_per_step, per_micro_batch):
        result = gradient(step)
        for name in reference:
            torch.testing.assert_close(result[name], reference[name], rtol=1e-12, atol=1e-12, msg=name)


# --------------------------------------------------------------------------------------------
# group lasso
# --------------------------------------------------------------------------------------------
def direct_residual_lasso(model: Residual) -> torch.Tensor:
    """Σ_units ||θ_unit||_2 written out by hand for the two groups of Residual."""
    total = torch.zeros((), dtype=torch.float64)
    for c in range(6):  # the stream: stem, c2 and dw write it; c1 and head read it
        parts = [
            model.stem.weight[c],
            model.stem.bias[c : c + 1],
            model.bn0.weight[c : c + 1],
            model.bn0.bias[c : c + 1],
            model.c1.weight[:, c],
            model.c2.weight[c],
            model.c2.bias[c : c + 1],
            model.bn2.weight[c : c + 1],
            model.bn2.bias[c : c + 1],
            model.dw.weight[c],
            model.dw.bias[c : c + 1],
            model.bn3.weight[c : c + 1],
            model.bn3.bias[c : c + 1],
            model.head.weight[:, c],
        ]
        total = total + torch.sqrt(sum((p**2).sum() for p in parts))
    for c in range(model.c1.out_channels):  # the block's inner channels
        parts = [
            model.c1.weight[c],
            model.c1.bias[c : c + 1],
            model.bn1.weight[c : c + 1],
            model.bn1.bias[c : c + 1],
            model.c2.weight[:, c],
        ]
        total = total + torch.sqrt(sum((p**2).sum() for p in parts))
    return total


def direct_chain_lasso(model: Chain) -> torch.Tensor:
    """Chain's conv groups by hand; conv2's channel c owns the 16 fc1 columns its map flattens into."""
    total = torch.zeros((), dtype=torch.float64)
    for c in range(5):
        parts = [
            model.conv1.weight[c],
            model.conv1.bias[c : c + 1],
            model.bn1.weight[c : c + 1],
            model.bn1.bias[c : c + 1],
            model.conv2.weight[:, c],
        ]
        total = total + torch.sqrt(sum((p**2).sum() for p in parts))
    for c in range(4):
        parts = [
            model.conv2.weight[c],
            model.conv2.bias[c : c + 1],
            model.bn2.weight[c : c + 1],
            model.bn2.bias[c : c + 1],
            model.fc1.weight[:, 16 * c : 16 * (c + 1)],
        ]
        total = total + torch.sqrt(sum((p**2).sum() for p in parts))
    return total


@pytest.mark.parametrize(
    "build, direct, shape, ignored",
    [
        (Residual, direct_residual_lasso, (3, 8, 8), ()),
        (Chain, direct_chain_lasso, (2, 8, 8), ("fc1",)),
    ],
)
def test_group_lasso_value_and_gradient_match_a_direct_float64_computation(build, direct, shape, ignored):
    model = scramble_batchnorms(build().double())
    pruner = Pruner(model, input_size=shape)
    groups = pruner.groups(ignored_layers=[getattr(model, name) for name in ignored])
    lasso = GroupLasso(groups)
    value = lasso()
    expected = direct(model)
    torch.testing.assert_close(value, expected, rtol=1e-13, atol=0)
    got = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    want = torch.autograd.grad(direct(model), list(model.parameters()), allow_unused=True)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        if w is None:
            assert g is None or not g.any(), name
        else:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14, msg=name)
    torch.testing.assert_close(group_lasso(groups), expected, rtol=1e-13, atol=0)


def test_group_lasso_of_a_pruner_covers_its_prunable_groups():
    model = scramble_batchnorms(Residual().double())
    pruner = Pruner(model, input_size=(3, 8, 8))
    torch.testing.assert_close(GroupLasso(pruner)(), direct_residual_lasso(model), rtol=1e-13, atol=0)
    assert "2 groups, 11 units" in repr(GroupLasso(pruner))


def test_group_lasso_gradient_of_an_all_zero_unit_is_zero_not_nan():
    model = scramble_batchnorms(Residual().double())
    pruner = Pruner(model, input_size=(3, 8, 8))
    lasso = GroupLasso(group_with(pruner.groups(), model.c1))
    with torch.no_grad():
        model.c1.weight[2] = 0
        model.c1.bias[2] = 0
        model.bn1.weight[2] = 0
        model.bn1.bias[2] = 0
        model.c2.weight[:, 2] = 0
    assert lasso.unit_norms()[0][2] == 0
    lasso().backward()
    for parameter in (model.c1.weight, model.c1.bias, model.bn1.weight, model.c2.weight):
        assert torch.isfinite(parameter.grad).all()
    assert not model.c1.weight.grad[2].any() and not model.c2.weight.grad[:, 2].any()


def test_group_lasso_refuses_to_run_on_a_pruned_model_and_bad_input():
    model = scramble_batchnorms(Residual().double())
    pruner = Pruner(model, input_size=(3, 8, 8))
    lasso = GroupLasso(pruner)
    pruner.prune_group(group_with(pruner.groups(), model.c1), [0, 1])
    with pytest.raises(ValueError, match="build a new GroupLasso"):
        lasso()
    torch.testing.assert_close(GroupLasso(pruner)(), direct_residual_lasso(model), rtol=1e-13, atol=0)
    with pytest.raises(TypeError, match="groups must be"):
        GroupLasso(model)
    with pytest.raises(TypeError, match="groups holds"):
        GroupLasso([model.c1])


# --------------------------------------------------------------------------------------------
# the one-call path: prune_groups with BN scale, then save_pruned / load_pruned
# --------------------------------------------------------------------------------------------
class Slim(nn.Module):
    """Three conv-BN-ReLU blocks, global pooling, a Linear classifier (a network-slimming model)."""

    def __init__(self, widths=(8, 8, 12)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1)
        self.bn2 = nn.BatchNorm2d(widths[1])
        self.conv3 = nn.Conv2d(widths[1], widths[2], 3, padding=1)
        self.bn3 = nn.BatchNorm2d(widths[2])
        self.fc = nn.Linear(widths[2], 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def expected_global_selection(batchnorms, fraction, min_units):
    """select_units' global ranking written out: each layer's |γ| over its mean, the lowest overall."""
    entries = []
    for index, bn in enumerate(batchnorms):
        gamma = bn.weight.detach().abs().double().numpy()
        entries += [(v, index, u) for u, v in enumerate(gamma / gamma.mean())]
    entries.sort()
    total = int(np.floor(fraction * len(entries) + 1e-9))
    chosen = {index: [] for index in range(len(batchnorms))}
    for _, index, unit in entries:
        if total == 0:
            break
        if len(chosen[index]) + 1 > batchnorms[index].num_features - max(1, min_units):
            continue
        chosen[index].append(unit)
        total -= 1
    return {index: sorted(set(range(bn.num_features)) - set(chosen[index])) for index, bn in enumerate(batchnorms)}


def test_prune_groups_with_bn_scale_removes_the_smallest_gammas_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = scramble_batchnorms(Slim().double(), seed=1)
    with torch.no_grad():  # after sparsity training: one layer nearly emptied
        model.bn2.weight.mul_(torch.tensor([1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 2.0, -1.5], dtype=torch.float64))
    batchnorms = [model.bn1, model.bn2, model.bn3]
    expected = expected_global_selection(batchnorms, 0.5, min_units=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = Pruner(model, input_size=(1, 8, 8), optimizer=optimizer)
    plan = prune_groups(
        pruner, fraction=0.5, scores=BNScaleAttributionMetric(model, None, None).run, global_ranking=True, min_units=3
    )
    assert plan.description
    for index, bn in enumerate(batchnorms):
        assert pruner.kept_units(bn, "in") == expected[index], bn
    assert model.bn2.num_features == 3  # min_units keeps three channels of the emptied layer
    assert sum(bn.num_features for bn in batchnorms) == 28 - 14
    # the live optimizer keeps training the pruned model
    inputs = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    model.train()
    F.cross_entropy(model(inputs), torch.tensor([0, 1, 2, 3])).backward()
    update_bn(model, 1e-4)
    optimizer.step()
    model.eval()
    path = tmp_path / "slim.pt"
    save_pruned(model, path)
    fresh = load_pruned(Slim().double(), path)
    assert [bn.num_features for bn in (fresh.bn1, fresh.bn2, fresh.bn3)] == [bn.num_features for bn in batchnorms]
    fresh.eval()
    torch.testing.assert_close(fresh(inputs), model(inputs), rtol=0, atol=0)


def test_prune_groups_with_bn_scale_refuses_a_group_without_batchnorm_and_changes_nothing():
    model = scramble_batchnorms(Chain().double())
    optimizer = torch.optim.Adam(model.parameters())
    pruner = Pruner(model, input_size=(2, 8, 8), optimizer=optimizer)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="holds no BatchNorm.*ignored_layers"):
        prune_groups(pruner, fraction=0.5, scores=BNScaleAttributionMetric(model, None, None).run, global_ranking=True)
    assert_unchanged(before, model, optimizer)
    # leaving the Linear layer out is the fix
    prune_groups(
        pruner,
        fraction=0.5,
        scores=BNScaleAttributionMetric(model, None, None).run,
        global_ranking=True,
        ignored_layers=[model.fc1],
    )
    assert model.fc1.out_features == 6 and model.conv1.out_channels + model.conv2.out_channels < 9


def test_bn_scale_and_weight_norm_agree_on_a_lone_batchnorm():
    """WeightNorm of a BatchNorm is its |γ| too: one helper, one definition."""
    model = scramble_batchnorms(Chain().double())
    np.testing.assert_array_equal(
        BNScaleAttributionMetric(model, None, None).run(model.bn1),
        WeightNormAttributionMetric(model, None, None).run(model.bn1),
    )
