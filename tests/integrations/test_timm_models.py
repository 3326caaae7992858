"""Real timm layers (optional: skipped without timm): BatchNormAct2d (a BatchNorm2d subclass that
fx traces into) is pruned once, and the pruned model trains on with the live optimizer."""

from __future__ import annotations

import pytest
import torch

from torchpruner import Pruner
from torchpruner.schedule import prune_groups

timm = pytest.importorskip("timm")


def test_mobilenetv2_with_batchnorm_act_prunes_and_trains_with_its_optimizer():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=4)
    assert type(model.bn1).__name__ == "BatchNormAct2d"
    x = torch.randn(2, 3, 32, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(x).logsumexp(-1).mean().backward()
    optimizer.step()
    before = sum(p.numel() for p in model.parameters())
    pruner = Pruner(model, example_inputs=x, optimizer=optimizer)
    prune_groups(pruner, fraction=0.3, ignored_layers=[model.classifier])
    assert sum(p.numel() for p in model.parameters()) < 0.7 * before
    assert model.bn1.running_mean.shape == (model.conv_stem.out_channels,) == (model.bn1.num_features,)
    optimizer.zero_grad()
    model(x).logsumexp(-1).mean().backward()
    snapshot = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    # a BatchNorm bias followed by another BatchNorm in train mode gets an exactly zero gradient
    stale = [n for s, (n, p) in zip(snapshot, model.named_parameters()) if torch.equal(s, p) and p.grad.any()]
    assert not stale
    for p in model.parameters():
        assert optimizer.state[p]["exp_avg"].shape == p.shape
