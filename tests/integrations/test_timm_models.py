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


def _call_sites_of(pruner, module):
    return [s for s in pruner.graph().sites if s.module is module]


@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "mobilenetv2_050"])
def test_same_padded_convs_and_batchnorm_act_are_one_call_each_and_prune_like_the_zeroed_twin(name):
    """timm's Conv2dSame / BatchNormAct2d compute their torch.nn base op: each is one call site (fx
    traces the model, no torch.export needed for the same padding), and pruning a group through
    them equals zeroing its units in the unpruned twin."""
    from oracles import assert_prune_equals_zeroed_twin, masked_at_mask_points

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    pruner = Pruner(model, example_inputs=x)
    assert pruner.graph().capture == "symbolic_trace"
    bn = model.bn1
    assert type(bn).__name__ == "BatchNormAct2d"
    assert [s.kind for s in _call_sites_of(pruner, bn)] == ["module"]
    if name.startswith("tf_"):
        assert type(model.conv_stem).__name__ == "Conv2dSame"
        assert [s.kind for s in _call_sites_of(pruner, model.conv_stem)] == ["module"]
    (group,) = [g for g in pruner.groups() if model.conv_stem in g.source_modules]
    assert bn in group
    removed = [0, 3, 5]
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.plan_groups({group: removed}).apply(model),
        lambda twin: masked_at_mask_points(twin, (x,), {group.index: removed}),
        x,
    )
    assert bn.num_features == bn.running_mean.shape[0] == model.conv_stem.out_channels


@pytest.mark.parametrize("variant", ["dropout", "prelu", "subclass"])
def test_batchnorm_act_that_is_not_its_base_op_is_traced_through(variant):
    """A BatchNormAct2d with a Dropout (whose rate a prune fixes) or an activation with parameters,
    or a subclass of it (which may override its forward), is traced through as before."""
    from timm.layers.norm_act import BatchNormAct2d

    class Sub(BatchNormAct2d):
        pass

    if variant == "dropout":
        bn = BatchNormAct2d(8, drop_layer=lambda: torch.nn.Dropout(0.2))
    elif variant == "prelu":
        bn = BatchNormAct2d(8, act_layer=torch.nn.PReLU)
    else:
        bn = Sub(8)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bn, torch.nn.Conv2d(8, 4, 1))
    pruner = Pruner(model, example_inputs=torch.randn(2, 3, 8, 8))
    assert "module" not in [s.kind for s in _call_sites_of(pruner, bn)]
    (group,) = [g for g in pruner.groups() if model[0] in g.source_modules]
    prune_groups(pruner, fraction=0.25)
    assert bn.num_features == bn.running_var.shape[0] == 6
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4, 6, 6)
