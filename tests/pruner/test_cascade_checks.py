"""Checks on explicit cascades in models torch.fx cannot trace: a cascade through an invisible flatten
is verified on the model, so a channel-last flatten is refused instead of silently mis-sliced."""

import pytest
import torch
import torch.nn as nn

from torchpruner import Pruner

from oracles import assert_prune_equals_zeroed_twin, assert_unchanged, masked_units, snapshot


class Untraceable(nn.Module):
    def __init__(self, channel_last: bool):
        super().__init__()
        self.channel_last = channel_last
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        if h.sum() > -1e9:  # data-dependent: torch.fx cannot trace it
            h = h * 1.0
        if self.channel_last:
            h = h.permute(0, 2, 3, 1)
        return self.fc(h.reshape(h.shape[0], -1))


def _model(channel_last):
    torch.manual_seed(0)
    model = Untraceable(channel_last).double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    return model


def test_channel_major_flatten_is_verified_and_pruned():
    model = _model(channel_last=False)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)

    def prune():
        pruner = Pruner(model, input_size=(2, 5, 5))
        assert pruner.graph().method == "hooks"
        pruner.prune_model(model.conv, [1, 2], cascading_modules=[model.bn, model.fc])

    # the relu is functional: set the units to -1e6 before it (relu(-big) = 0)
    assert_prune_equals_zeroed_twin(
        model, prune, lambda twin: masked_units(twin.bn, [1, 2], value=-1e6), x, rtol=1e-12, atol=1e-12
    )
    assert model.fc.in_features == 18


def test_channel_last_flatten_is_refused_unchanged():
    model = _model(channel_last=True)
    before = snapshot(model)
    pruner = Pruner(model, input_size=(2, 5, 5))
    with pytest.raises(ValueError, match="'fc'.*not a channel-major flatten"):
        pruner.prune_model(model.conv, [1, 2], cascading_modules=[model.bn, model.fc])
    assert_unchanged(before, model)
    assert model.conv.out_channels == 4 and model.fc.in_features == 36
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
