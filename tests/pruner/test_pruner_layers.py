"""Pruner, one layer type at a time: the pruned model equals its zeroed twin (float64, eval mode).

Zeroed twin: a copy of the unpruned model with the pruned units zeroed by a persistent mask hook at
the last element-wise module after them (after the activation, so f(0) != 0 does not matter).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchpruner.pruner import Pruner, SlicingRule, kept_units, register_slicing_rule, set_attribute, slice_tensor

from oracles import (
    assert_prune_equals_zeroed_twin,
    assert_unchanged,
    counterpart,
    kept,
    masked_units,
    rebuilt,
    snapshot,
)


@pytest.fixture(autouse=True)
def float64_default():
    """float64 everywhere in this module (exact comparisons), restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def zeroed_twin_check(
    model: nn.Module,
    source: nn.Module,
    indices,
    cascade,
    mask_module: nn.Module,
    x: torch.Tensor,
    mask_indices=None,
    axis: int = 1,
    **pruner_kwargs,
) -> Pruner:
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x

    def prune() -> Pruner:
        pruner = Pruner(model, example_inputs=x, **pruner_kwargs)
        pruner.prune_model(source, indices, cascading_modules=cascade)
        return pruner

    def mask(twin: nn.Module):
        return masked_units(counterpart(twin, model, mask_module), mask_indices or indices, axis)

    return assert_prune_equals_zeroed_twin(model, prune, mask, x)


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def randomize_bn(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            if m.running_mean is not None:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
            if m.weight is not None:
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_linear_units_on_dim1(order):
    seeded()
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Sigmoid(), nn.Dropout(0.3), nn.Linear(6, 3))
    randomize_bn(model)
    cascade = [model[1], model[3], model[4]]
    if order == "reversed":
        cascade = cascade[::-1]
    zeroed_twin_check(model, model[0], [1, 4], cascade, model[2], torch.randn(7, 5))
    assert model[0].out_features == 4 and model[1].num_features == 4 and model[4].in_features == 4
    assert math.isclose(model[3].p, 0.3 * (1 - 2 / 6))


def test_linear_units_on_last_dim_tokens():
    seeded()
    model = nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 3))
    zeroed_twin_check(model, model[0], [0, 5], [model[2]], model[1], torch.randn(2, 4, 5), axis=2)
    assert model[2].weight.shape == (3, 4)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_bn_conv(dims):
    seeded()
    conv, bn = getattr(nn, f"Conv{dims}d"), getattr(nn, f"BatchNorm{dims}d")
    model = nn.Sequential(conv(2, 6, 3, padding=1), bn(6), nn.Softplus(), conv(6, 4, 3))
    randomize_bn(model)
    x = torch.randn((2, 2) + (5,) * dims)
    zeroed_twin_check(model, model[0], [0, 2, 3], [model[3], model[1]], model[2], x)
    assert model[0].out_channels == 3 and model[3].in_channels == 3 and model[1].num_features == 3
    assert model[1].num_batches_tracked.shape == ()


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_transpose(dims):
    seeded()
    convt, bn = getattr(nn, f"ConvTranspose{dims}d"), getattr(nn, f"BatchNorm{dims}d")
    model = nn.Sequential(convt(2, 6, 3, stride=2), bn(6, affine=False), nn.Tanh(), convt(6, 4, 2))
    randomize_bn(model)
    x = torch.randn((2, 2) + (3,) * dims)
    zeroed_twin_check(model, model[0], [1, 5], [model[1], model[3]], model[2], x)
    assert model[0].weight.shape[:2] == (2, 4) and model[3].weight.shape[:2] == (4, 4)
    assert model[0].out_channels == 4 and model[3].in_channels == 4


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_passes_channels_through(multiplier):
    seeded()
    c = 6
    model = nn.Sequential(
        nn.Conv2d(3, c, 1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, c * multiplier, 3, padding=1, groups=c),
        nn.BatchNorm2d(c * multiplier),
        nn.Hardswish(),
        nn.Conv2d(c * multiplier, 4, 1),
    )
    randomize_bn(model)
    pruned = [1, 4]
    dw_out = [p * multiplier + j for p in pruned for j in range(multiplier)]
    zeroed_twin_check(
        model,
        model[0],
        pruned,
        [model[6], model[4], model[3], model[1]],
        model[5],
        torch.randn(2, 3, 5, 5),
        mask_indices=dw_out,
    )
    assert model[3].groups == 4 and model[3].in_channels == 4 and model[3].out_channels == 4 * multiplier
    assert kept_units(model[3], "out") == [p for p in range(c * multiplier) if p not in dw_out]


@pytest.mark.parametrize("indices", [[0, 6], [1, 5]], ids=["different-positions", "same-positions"])
def test_grouped_conv_consumer_equal_within_groups(indices):
    seeded()
    model = nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2))
    zeroed_twin_check(model, model[0], indices, [model[2]], model[1], torch.randn(2, 2, 5, 5))
    assert model[2].groups == 2 and model[2].in_channels == 6 and model[2].weight.shape == (4, 3, 3, 3)


@pytest.mark.parametrize("cascade", ["explicit", "discovered"])
@pytest.mark.parametrize("groups, removed_group", [(2, 1), (3, 1), (3, 0)])
def test_grouped_conv_consumer_loses_whole_input_groups_on_both_paths(cascade, groups, removed_group):
    """Whole input groups of a grouped consumer take its output channels of those conv groups with
    them (``groups`` shrinks by one); the layer after it loses those inputs too. Zeroed twin: the
    removed inputs and the consumer's removed outputs zeroed where they are read."""
    seeded(groups + removed_group)
    per_in, per_out = 8 // 2, 2
    model = nn.Sequential(
        nn.Conv2d(2, per_in * groups, 1),
        nn.ReLU(),
        nn.Conv2d(per_in * groups, per_out * groups, 3, groups=groups),
        nn.ReLU(),
        nn.Conv2d(per_out * groups, 3, 1),
    )
    inputs = list(range(removed_group * per_in, (removed_group + 1) * per_in))
    outputs = list(range(removed_group * per_out, (removed_group + 1) * per_out))
    listed = [model[2], model[4]] if cascade == "explicit" else None

    @contextlib.contextmanager
    def mask(twin):
        with (
            masked_units(counterpart(twin, model, model[1]), inputs),
            masked_units(counterpart(twin, model, model[3]), outputs),
        ):
            yield None

    def prune():
        return Pruner(model.double().eval(), input_size=(2, 5, 5)).prune_model(model[0], inputs, listed)

    plan = assert_prune_equals_zeroed_twin(model.double().eval(), prune, mask, torch.randn(2, 2, 5, 5).double())
    assert "units of group 1" in plan.description
    assert model[2].groups == groups - 1 and model[2].in_channels == per_in * (groups - 1)
    assert model[2].out_channels == per_out * (groups - 1) and model[4].in_channels == per_out * (groups - 1)
    assert kept_units(model[2], "out") == [c for c in range(per_out * groups) if c not in outputs]


def test_grouped_conv_consumer_whole_groups_need_their_outputs_listed():
    seeded()
    model = nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 3, 1))
    before = snapshot(model)
    with pytest.raises(ValueError, match="'4'.*not in cascading_modules"):
        Pruner(model, input_size=(2, 5, 5)).prune_model(model[0], [4, 5, 6, 7], [model[2]])
    assert_unchanged(before, model)


def test_grouped_conv_consumer_whole_and_partial_groups_refused():
    seeded()
    model = nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 3, 1))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'2'.*\[4, 1\] units per group"):
        Pruner(model, input_size=(2, 5, 5)).prune_model(model[0], [0, 1, 2, 3, 4])
    assert_unchanged(before, model)


def test_grouped_conv_source_equal_within_groups():
    seeded()
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 3, 1))
    zeroed_twin_check(model, model[0], [1, 6], [model[2]], model[1], torch.randn(2, 4, 5, 5))
    assert model[0].groups == 2 and model[0].out_channels == 6


@pytest.mark.parametrize("indices", [[0, 1, 2, 3], [0, 1, 4]], ids=["whole-output-group", "unequal"])
def test_grouped_conv_source_refused(indices):
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 3, 1))
    pruner = Pruner(model, input_size=(4, 5, 5))
    before = snapshot(model)
    with pytest.raises(ValueError, match="'0'.*group"):
        pruner.prune_model(model[0], indices, [model[2]])
    assert_unchanged(before, model)
    assert model[0].out_channels == 8


def test_grouped_conv_transpose():
    seeded()
    model = nn.Sequential(nn.ConvTranspose2d(4, 8, 3, groups=2), nn.ReLU(), nn.ConvTranspose2d(8, 4, 3, groups=2))
    zeroed_twin_check(model, model[0], [0, 6], [model[2]], model[1], torch.randn(2, 4, 4, 4))
    assert model[0].weight.shape == (4, 3, 3, 3) and model[2].weight.shape == (6, 2, 3, 3)


def test_prelu_per_channel():
    seeded()
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.PReLU(5), nn.Conv2d(5, 2, 1))
    with torch.no_grad():
        model[1].weight.uniform_(0.1, 0.5)
    zeroed_twin_check(model, model[0], [3], [model[1], model[2]], model[1], torch.randn(2, 2, 5, 5))
    assert model[1].num_parameters == 4


class FunctionalNet(nn.Module):
    """Conv -> pool -> functional flatten -> Linear, with functional activations."""

    def __init__(self, flatten: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 3)
        self.flatten = flatten

    def forward(self, x):
        h = self.pool(F.relu(self.conv(x)))
        h = h.flatten(1) if self.flatten == "flatten" else h.view(h.size(0), -1)
        return self.fc(torch.sigmoid(h))


@pytest.mark.parametrize("flatten", ["flatten", "view"])
def test_conv_flatten_linear_functional(flatten):
    seeded()
    model = FunctionalNet(flatten).double().eval()
    x = torch.randn(2, 2, 6, 6)
    # sigmoid(0) = 0.5 reaches fc after the flatten: compare with an explicitly rebuilt model.
    # The columns of channel c are c*4 .. c*4+3.
    keep_cols = [c * 4 + j for c in (0, 3) for j in range(4)]
    small = FunctionalNet(flatten)
    small.conv, small.fc = nn.Conv2d(2, 2, 3), nn.Linear(8, 3)
    ref = rebuilt(
        small, model, {"conv.weight": kept([0, 3]), "conv.bias": kept([0, 3]), "fc.weight": kept(None, keep_cols)}
    )
    pruner = Pruner(model, input_size=(2, 6, 6))
    plan = pruner.plan(model.conv, [1, 2], [model.fc])
    assert "fc.weight" in str(plan) and "[3, 16] -> [3, 8]" in str(plan)
    pruner.prune_model(model.conv, [1, 2], [model.fc])
    torch.testing.assert_close(model(x), ref(x), rtol=1e-12, atol=1e-12)
    assert kept_units(model.fc, "in") == keep_cols


def test_conv_pool_flatten_linear_sequential():
    seeded()
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
        nn.ReLU(),
        nn.Linear(5, 2),
    )
    randomize_bn(model)
    zeroed_twin_check(model, model[0], [0, 3], [model[5], model[1]], model[3], torch.randn(2, 2, 6, 6))
    assert model[5].in_features == 8


def test_layernorm_matches_rebuilt_model():
    seeded()
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    keep = [0, 2, 3, 5]
    ref = rebuilt(
        nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 3)),
        model,
        {
            "0.weight": kept(keep),
            "0.bias": kept(keep),
            "1.weight": kept(keep),
            "1.bias": kept(keep),
            "3.weight": kept(None, keep),
        },
    )
    x = torch.randn(3, 5)
    Pruner(model, input_size=(5,)).prune_model(model[0], [1, 4], [model[3], model[1]])
    assert model[1].normalized_shape == (4,)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "policy,expected", [("linear", 0.5 * (1 - 2 / 8)), ("sqrt", 0.5 * math.sqrt(6 / 8)), ("keep", 0.5)]
)
def test_dropout_policies(policy, expected):
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    Pruner(model, input_size=(3,), dropout_policy=policy).prune_model(model[0], [0, 1], [model[2], model[3]])
    assert math.isclose(model[2].p, expected)


def test_embedding_source_with_token_inputs():
    seeded()
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 3))
    tokens = torch.randint(0, 10, (2, 4))
    expected_keep = [0, 1, 3, 5]
    ref_out = F.linear(model[0].weight[tokens][..., expected_keep], model[1].weight[:, expected_keep], model[1].bias)
    Pruner(model, example_inputs=tokens).prune_model(model[0], [2, 4], [model[1]])
    torch.testing.assert_close(model(tokens), ref_out)
    assert model[0].embedding_dim == 4


def test_kept_units_across_two_prunes_and_module_level_calls():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    pruner = Pruner(model, input_size=(3,))
    pruner.prune_model(model[0], [1, 2], [model[2]])
    pruner.prune_model(model[0], [0, 3], [model[2]])
    assert pruner.kept_units(model[0]) == [3, 4, 6, 7]
    assert pruner.kept_units(model[2], "in") == [3, 4, 6, 7]
    assert pruner.kept_units(model[2], "out") == [0, 1]
    assert repr(model[0]) == "Linear(in_features=3, out_features=4, bias=True)"


def test_prune_module_and_prune_parameter():
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.4), nn.Linear(6, 2))
    pruner = Pruner(model)
    pruner.prune_module(model[0], [0, 1])
    pruner.prune_module(model[2], [0, 1], direction="in")
    with pytest.raises(ValueError, match="original_len"):
        pruner.prune_module(model[1], [0, 1])
    pruner.prune_module(model[1], [0, 1], original_len=6)
    assert math.isclose(model[1].p, 0.4 * (1 - 2 / 6))
    assert model(torch.randn(2, 3)).shape == (2, 2)
    pruner.prune_parameter(model[2], "bias", [1])
    assert model[2].bias.shape == (1,) and model[2].out_features == 2  # attributes are the caller's business


def test_plan_is_a_dry_run_and_applies_to_an_averaged_copy():
    seeded()
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2))
    ema = torch.optim.swa_utils.AveragedModel(model)
    copy_ = copy.deepcopy(model)
    pruner = Pruner(model, input_size=(2, 5, 5))
    before = snapshot(model)
    plan = pruner.plan(model[0], [1], [model[1], model[4]])
    text = str(plan)
    for expected in [
        "0.weight",
        "[4, 2, 3, 3] -> [3, 2, 3, 3]",
        "1.running_var",
        "4.in_features",
        "36 -> 27",
        "4.weight",
    ]:
        assert expected in text
    assert_unchanged(before, model)
    plan.apply(model)
    plan.apply(ema)
    plan.apply(copy_)
    for m in (ema.module, copy_):
        assert repr(m) == repr(model)
        for (n, a), (_, b) in zip(model.state_dict().items(), m.state_dict().items()):
            assert a.shape == b.shape, n
    ema.update_parameters(model)
    x = torch.randn(2, 2, 5, 5)
    assert ema(x).shape == (2, 2)
    with pytest.raises(ValueError, match="0.weight.*shape"):
        plan.apply(copy_)  # already applied: shapes no longer match


def test_compiled_model_is_unwrapped():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    compiled = torch.compile(model)
    pruner = Pruner(compiled, input_size=(3,))
    pruner.prune_model(model[0], [1], [model[2]])
    assert compiled._orig_mod[0].out_features == 3


def test_grad_is_sliced_between_backward_and_step():
    seeded()
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    model(torch.randn(4, 3)).sum().backward()
    g0, g2 = model[0].weight.grad.clone(), model[2].weight.grad.clone()
    Pruner(model, input_size=(3,)).prune_model(model[0], [0, 3], [model[2]])
    assert torch.equal(model[0].weight.grad, g0[[1, 2, 4]])
    assert torch.equal(model[2].weight.grad, g2[:, [1, 2, 4]])
    model(torch.randn(4, 3)).sum().backward()  # the AccumulateGrad nodes accept the new shapes
    assert model[0].weight.grad.shape == (3, 3)


def test_prune_while_the_previous_graph_is_alive():
    """The previous step's loss keeps the parameters' gradient accumulators (with the old shapes)
    alive; the next backward must still work."""
    seeded()
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    optimizer = torch.optim.Adam(model.parameters())
    loss = model(torch.randn(4, 3)).sum()
    loss.backward()
    optimizer.step()
    weight = model[0].weight
    Pruner(model, input_size=(3,), optimizer=optimizer).prune_model(model[0], [1], [model[2]])
    assert model[0].weight is weight and weight in optimizer.state
    loss = model(torch.randn(4, 3)).sum()
    loss.backward()
    optimizer.step()
    assert weight.grad.shape == (4, 3)


def test_shape_probing_has_no_side_effects():
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.ReLU(), nn.Linear(5, 2))
    model.train()
    model[4].eval()
    before = snapshot(model)  # modes (mixed), BatchNorm statistics, grads (None)
    rng = torch.get_rng_state()
    pruner = Pruner(model, input_size=(3,))
    pruner.plan(model[0], [1], [model[1], model[2], model[4]])
    assert torch.equal(torch.get_rng_state(), rng)
    assert_unchanged(before, model)
    assert model.training and model[1].training and not model[4].training
    assert all(p.grad is None for p in model.parameters())


class Scale(nn.Module):
    """A user layer: per-channel scale on dim 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.weight.view(1, -1, *([1] * (x.dim() - 2)))


@register_slicing_rule(Scale)
class ScaleRule(SlicingRule):
    passes_units_through = True
    input_unit_axis = 1

    def out_units(self, module):
        return module.channels

    in_units = out_units

    def prune_in(self, module, selection):
        return slice_tensor(module, "weight", 0, selection.keep) + set_attribute(
            module, "channels", len(selection.keep)
        )

    prune_out = prune_in


def test_user_registered_rule():
    seeded()
    model = nn.Sequential(nn.Conv2d(2, 4, 3), Scale(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    zeroed_twin_check(model, model[0], [2], [model[1], model[3]], model[2], torch.randn(2, 2, 5, 5))
    assert model[1].channels == 3 and model[1].weight.shape == (3,)


def test_instance_norm_with_affine_and_stats():
    seeded()
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3), nn.InstanceNorm2d(6, affine=True, track_running_stats=True), nn.ReLU(), nn.Conv2d(6, 2, 1)
    )
    randomize_bn(model)
    zeroed_twin_check(model, model[0], [0, 5], [model[1], model[3]], model[2], torch.randn(2, 2, 6, 6))
    assert model[1].num_features == 4 and model[1].running_mean.shape == (4,)


def test_group_norm_whole_groups_only():
    seeded()
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.GroupNorm(3, 6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    # whole groups: the statistics of the remaining groups do not change -> equals the zeroed twin
    zeroed_twin_check(model, model[0], [2, 3], [model[1], model[3]], model[2], torch.randn(2, 2, 6, 6))
    assert model[1].num_groups == 2 and model[1].num_channels == 4
    pruner = Pruner(model, input_size=(2, 6, 6))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'0'.*coupled with its units \[1\].*GroupNorm"):
        pruner.prune_model(model[0], [0], [model[1], model[3]])
    assert_unchanged(before, model)
    assert model[1].num_channels == 4


def test_layernorm_on_tokens():
    seeded()
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 2)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 5)
    keep = [0, 1, 3, 4]
    ref = rebuilt(
        nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 2)),
        model,
        {
            "0.weight": kept(keep),
            "0.bias": kept(keep),
            "1.weight": kept(keep),
            "1.bias": kept(keep),
            "2.weight": kept(None, keep),
        },
    )
    expected = ref(x)
    Pruner(model, example_inputs=x).prune_model(model[0], [2, 5], [model[2], model[1]])
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    # the functional reference, written out
    h = F.layer_norm(F.linear(x, ref[0].weight, ref[0].bias), (4,), ref[1].weight, ref[1].bias, model[1].eps)
    torch.testing.assert_close(expected, F.linear(h, ref[2].weight, ref[2].bias), rtol=1e-12, atol=1e-12)


class DataDependent(nn.Module):
    """torch.fx cannot trace this (``if`` on a tensor value): the Pruner follows a hooks trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if h.sum() > -1e9:
            h = h * 1.0
        return self.fc(h.flatten(1))


def test_untraceable_model_uses_hooks_trace():
    seeded()
    model = DataDependent().double().eval()
    x = torch.randn(2, 2, 6, 6)

    def prune():
        pruner = Pruner(model, input_size=(2, 6, 6))
        assert pruner.graph().method == "hooks"
        pruner.prune_model(model.conv, [1], [model.fc])

    # relu(0) = 0: zeroing the conv output is enough here
    assert_prune_equals_zeroed_twin(model, prune, lambda twin: masked_units(twin.conv, [1]), x)
    assert model.fc.in_features == 48


def test_parameter_free_modules_may_be_listed():
    seeded()
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 2))
    zeroed_twin_check(
        model, model[0], [1, 2], [model[3], model[1], model[4], model[2]], model[1], torch.randn(2, 2, 6, 6)
    )
    assert model[4].in_features == 8


def test_depthwise_conv_transpose_in_cascade():
    seeded()
    model = nn.Sequential(
        nn.Conv2d(2, 4, 1), nn.ReLU(), nn.ConvTranspose2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 2, 1)
    )
    zeroed_twin_check(model, model[0], [0, 3], [model[2], model[4]], model[3], torch.randn(2, 2, 4, 4))
    assert model[2].groups == 2 and model[2].weight.shape == (2, 1, 3, 3)


def test_group_selection_with_whole_input_groups_of_a_grouped_consumer_equals_prune_model():
    seeded(4)
    model = nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 3, 1))
    twin = copy.deepcopy(model)
    pruner = Pruner(model, input_size=(2, 5, 5))
    first = pruner.groups()[0]
    assert first.members[0].module is model[0]
    plan = pruner.prune_group(first, first.units_for(model[0], [0, 1, 2, 3]))
    assert "units of group 1" in plan.description  # the grouped conv's outputs of that conv group
    Pruner(twin, input_size=(2, 5, 5)).prune_model(twin[0], [0, 1, 2, 3])
    assert model.state_dict().keys() == twin.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key
    assert model[2].groups == 1
