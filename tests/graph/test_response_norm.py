"""Global response normalisation (ConvNeXt-V2's GRN) over the pruned units.

``g = ||x||`` over the spatial axes (one value per channel), divided by its mean over the channels,
scales ``x`` by the layer's weight: the channels prune through it as through an RMSNorm (the mean
is then over the kept channels: not exactly masking, so the oracle is a rebuilt smaller model).
Look-alikes that reduce over the units in another way stay refused.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from oracles import assert_reduction_refused, kept, rebuilt

from torchpruner.pruner import Pruner
from torchpruner.schedule import prune_groups


class ResponseNorm(nn.Module):
    """GRN as the ConvNeXt-V2 paper defines it, channels last ([B, H, W, C]) or first ([B, C, H, W]);
    ``kind`` other than "grn" builds look-alikes that are not one."""

    def __init__(self, dim: int, channels_last: bool = True, kind: str = "grn") -> None:
        super().__init__()
        self.kind = kind
        self.spatial, self.channel = ((1, 2), -1) if channels_last else ((2, 3), 1)
        self.shape = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.bias = nn.Parameter(torch.rand(dim) - 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.norm(p=2, dim=self.spatial, keepdim=True)
        if self.kind == "grn":
            n = g / (g.mean(dim=self.channel, keepdim=True) + 1e-6)
            return x + torch.addcmul(self.bias.view(self.shape), self.weight.view(self.shape), x * n)
        if self.kind == "product":  # written with a product and a sum instead of addcmul
            n = g / (g.mean(dim=self.channel, keepdim=True) + 1e-6)
            return x + self.weight.view(self.shape) * (x * n) + self.bias.view(self.shape)
        if self.kind == "floor":  # a rounding division: not a normalisation
            n = g.div(g.mean(dim=self.channel, keepdim=True) + 1e-6, rounding_mode="floor")
            return x + torch.addcmul(self.bias.view(self.shape), self.weight.view(self.shape), x * n)
        if self.kind == "unweighted":  # the weight scales another tensor than the normalised one
            n = g / (g.mean(dim=self.channel, keepdim=True) + 1e-6)
            return torch.addcmul(x * n, self.weight.view(self.shape), x)
        if self.kind == "other":  # the channel mean divides x, not the norm
            return self.weight.view(self.shape) * (x / (g.mean(dim=self.channel, keepdim=True) + 1e-6))
        # "plain": a mean over the channels of x itself, no norm
        return self.weight.view(self.shape) * (x * (x.abs().mean(dim=self.channel, keepdim=True) + 1e-6))


class LastBlock(nn.Module):
    def __init__(self, dim: int = 8, kind: str = "grn") -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(5, dim), ResponseNorm(dim, True, kind), nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


class FirstBlock(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.conv1, self.norm = nn.Conv2d(3, dim, 3, padding=1), ResponseNorm(dim, channels_last=False)
        self.conv2 = nn.Conv2d(dim, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm(self.conv1(x)))


@pytest.mark.parametrize("kind", ["grn", "product"])
def test_channels_last_grn_prunes_like_the_rebuilt_smaller_model(kind):
    torch.manual_seed(0)
    model = LastBlock(kind=kind).double().eval()
    x = torch.randn(2, 4, 4, 5, dtype=torch.float64)
    pruner = Pruner(model, example_inputs=(x,))
    (group,) = [g for g in pruner.groups() if model.fc1 in g.source_modules]
    assert group.normalizations() == ["norm"] and model.fc2 in group and model.norm in group
    keep = [0, 1, 3, 4, 6]
    rows = kept(keep)
    expected_model = rebuilt(
        LastBlock(dim=5, kind=kind),
        model,
        {"fc1.weight": rows, "fc1.bias": rows, "norm.weight": rows, "norm.bias": rows, "fc2.weight": kept(None, keep)},
    )
    pruner.plan_groups({group: [2, 5, 7]}).apply(model)
    assert model.norm.weight.shape == (5,) and model.norm.bias.shape == (5,)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected_model(x), rtol=1e-12, atol=1e-12)


def test_channels_first_grn_prunes_like_the_rebuilt_smaller_model_and_trains_on():
    torch.manual_seed(0)
    model = FirstBlock().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(x).square().mean().backward()
    optimizer.step()
    pruner = Pruner(model, example_inputs=(x,), optimizer=optimizer)
    (group,) = [g for g in pruner.groups() if model.conv1 in g.source_modules]
    assert group.normalizations() == ["norm"]
    keep = [1, 2, 4, 5, 7]
    rows = kept(keep)
    expected_model = rebuilt(
        FirstBlock(dim=5),
        model,
        {
            "conv1.weight": rows,
            "conv1.bias": rows,
            "norm.weight": rows,
            "norm.bias": rows,
            "conv2.weight": kept(None, keep),
        },
    )
    pruner.plan_groups({group: [0, 3, 6]}).apply(model, optimizer)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected_model(x), rtol=1e-12, atol=1e-12)
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not update"


@pytest.mark.parametrize("kind", ["other", "plain", "floor", "unweighted"])
def test_a_mean_over_the_units_that_is_not_a_grn_statistic_is_refused(kind):
    model = LastBlock(kind=kind).eval()
    assert_reduction_refused(model, torch.randn(2, 4, 4, 5), model.fc1)


def test_a_norm_over_all_axes_is_refused():
    class WholeNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc1(x)
            return self.fc2(h / h.norm())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(WholeNorm(), example_inputs=(torch.randn(2, 5),))
    (refused,) = pruner.refused_groups()
    assert "reduces over all dims" in refused.refusal


def test_timm_convnextv2_prunes_every_group_and_trains_on():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(x).logsumexp(-1).mean().backward()
    optimizer.step()
    pruner = Pruner(model, example_inputs=(x,), optimizer=optimizer)
    ignored = [model.get_classifier()]
    groups = pruner.groups(ignored_layers=ignored)
    assert not pruner.refused_groups(ignored_layers=ignored)
    grn = model.stages[0].blocks[0].mlp.grn
    (hidden,) = [g for g in groups if grn in g]
    assert hidden.normalizations() == ["stages.0.blocks.0.mlp.grn"]
    before = sum(p.numel() for p in model.parameters())
    prune_groups(pruner, fraction=0.3, ignored_layers=ignored)
    assert sum(p.numel() for p in model.parameters()) < 0.6 * before
    assert grn.weight.shape == (model.stages[0].blocks[0].mlp.fc1.out_channels,)  # 1x1 convs: channels first
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.zero_grad()
    model(x).logsumexp(-1).mean().backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), parameters[name]), f"{name} did not update"
