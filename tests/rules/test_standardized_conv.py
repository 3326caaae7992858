"""timm's weight-standardised convolutions (NF-ResNet's ScaledStdConv2d, BiT's StdConv2d): a leaf
with a rule registered by class path. Output channels (and ``gain``) go exactly; the input
channels' removal standardises over the smaller fan-in, checked against a rebuilt smaller model
holding the kept slices and the original ``scale``; the live AdamW keeps stepping every tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from oracles import assert_prune_equals_zeroed_twin, kept, masked_units, rebuilt
from torchpruner import Pruner
from torchpruner.rules import get_slicing_rule
from torchpruner.rules.layers import StandardizedConvRule

std_conv = pytest.importorskip("timm.layers.std_conv")


def _net(kind: str, widths=(3, 8, 5)) -> nn.Module:
    conv = getattr(std_conv, kind)
    a, b, c = widths
    return nn.Sequential(
        conv(a, b, 3, padding=1, bias=True), nn.ReLU(), conv(b, c, 3, padding=1, bias=True), nn.AdaptiveAvgPool2d(1)
    )


@pytest.mark.parametrize("kind", ["ScaledStdConv2d", "StdConv2d"])
def test_the_rule_is_found_by_class_path_and_the_group_is_prunable(kind):
    model = _net(kind).double().eval()
    assert isinstance(get_slicing_rule(model[0]), StandardizedConvRule)
    pruner = Pruner(model, input_size=(3, 6, 6))
    assert pruner.refused_groups() == []
    (group,) = pruner.groups()
    assert {m.module_name for m in group.members} == {"0", "2"} and group.num_units == 8


@pytest.mark.parametrize("kind", ["ScaledStdConv2d", "StdConv2d"])
def test_pruning_equals_a_rebuilt_smaller_model_with_the_original_scale(kind):
    torch.manual_seed(0)
    model = _net(kind).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # gain away from 1, bias away from 0
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    remove = [1, 6]
    keep = [i for i in range(8) if i not in remove]
    small = _net(kind, (3, 6, 5))
    slices = {"0.weight": kept(keep), "0.bias": kept(keep), "2.weight": kept(None, keep)}
    if kind == "ScaledStdConv2d":
        slices["0.gain"] = kept(keep)
    reference = rebuilt(small, model, slices)
    for small_conv, conv in ((reference[0], model[0]), (reference[2], model[2])):
        if hasattr(conv, "scale"):
            small_conv.scale = conv.scale  # gamma / sqrt(fan_in) of the full layer: kept by the prune
    with torch.no_grad():
        expected = reference(x)
    pruner = Pruner(model, input_size=(3, 6, 6))
    pruner.prune_model(model[0], remove)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    assert model[0].out_channels == 6 and model[2].in_channels == 6
    if kind == "ScaledStdConv2d":
        assert model[0].gain.shape == (6, 1, 1, 1)


def test_removing_only_output_channels_equals_the_zeroed_twin():
    """Read by a Linear, not by another standardised conv: each channel is standardised over its
    own fan-in, so removing it is exactly zeroing it."""
    torch.manual_seed(0)
    conv = std_conv.ScaledStdConv2d(3, 8, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).double().eval()
    with torch.no_grad():
        conv.gain.add_(torch.randn_like(conv.gain) * 0.1)
    pruner = Pruner(model, input_size=(3, 5, 5))
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_model(conv, [0, 3]),
        lambda twin: masked_units(twin[0], [0, 3]),
        torch.randn(2, 3, 5, 5, dtype=torch.float64),
    )
    assert conv.gain.shape == (6, 1, 1, 1) and model[4].in_features == 6


def test_training_goes_on_with_the_live_optimizer_after_the_prune():
    torch.manual_seed(0)
    model = _net("ScaledStdConv2d")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(4, 3, 6, 6)

    def step() -> None:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    step()
    Pruner(model, input_size=(3, 6, 6), optimizer=optimizer).prune_model(model[0], [2, 5])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step()
    for name, param in model.named_parameters():
        assert optimizer.state[param]["exp_avg"].shape == param.shape, name
        assert not torch.equal(before[name], param.detach()), f"{name} did not move"
