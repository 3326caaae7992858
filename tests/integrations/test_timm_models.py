"""Real timm layers (optional: skipped without timm): BatchNormAct2d (a BatchNorm2d subclass that
fx traces into) is pruned once, and the pruned model trains on with the live optimizer."""

from __future__ import annotations

import numpy as np
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


@pytest.mark.parametrize("size, kernel, stride, dilation", [(7, 3, 2, 1), (8, 3, 2, 1), (9, 5, 3, 2), (6, 1, 1, 1)])
def test_base_layer_input_pads_a_same_padded_conv_as_its_forward(size, kernel, stride, dilation):
    from timm.layers.conv2d_same import Conv2dSame

    from torchpruner.graph.trace import base_layer_input

    torch.manual_seed(0)
    conv = Conv2dSame(4, 5, kernel, stride=stride, dilation=dilation).double()
    x = torch.randn(2, 4, size, size + 1, dtype=torch.float64)
    padded = base_layer_input(conv, x)
    expected = conv(x)
    got = torch.nn.functional.conv2d(padded, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    plain = torch.nn.Conv2d(4, 5, 3)
    assert base_layer_input(plain, x) is x


def test_thinet_reads_a_same_padded_consumer_as_it_computes():
    """ThiNet recomputes its consumer from the layer's attributes: a Conv2dSame (padding=0, padded
    in its forward) must be padded first. Its scores equal those of the same model written with
    an explicit zero padding and a plain Conv2d."""
    from timm.layers.conv2d_same import Conv2dSame

    from torchpruner.attributions import ThiNetAttributionMetric
    from torchpruner.graph.trace import base_layer_input

    torch.manual_seed(0)
    same = Conv2dSame(8, 4, 3, stride=2)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), same, torch.nn.Flatten(), torch.nn.Linear(64, 2)
    ).eval()
    x = torch.randn(4, 3, 7, 7)
    pads = [p for p in base_layer_input(same, torch.zeros(1, 8, 7, 7)).shape[-2:]]
    assert pads == [9, 9]  # (ceil(7 / 2) - 1) * 2 + 3 - 7 = 2 rows and columns of padding
    plain = torch.nn.Conv2d(8, 4, 3, stride=2)
    plain.load_state_dict(same.state_dict())
    twin = torch.nn.Sequential(
        model[0],
        torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.ZeroPad2d((1, 1, 1, 1)), plain),
        torch.nn.Flatten(),
        model[4],
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x))
    data = [(x, torch.zeros(4, dtype=torch.long))]
    scores = ThiNetAttributionMetric(model, data, torch.nn.CrossEntropyLoss()).run(model[0], samples_per_batch=None)
    expected = ThiNetAttributionMetric(twin, data, torch.nn.CrossEntropyLoss()).run(twin[0], samples_per_batch=None)
    np.testing.assert_allclose(scores, expected)


def test_the_act_of_a_batchnorm_act_traced_as_one_call_is_still_scored():
    """Scoring ``bn.act`` of a BatchNormAct2d that is one call site scores that call's output (the
    act's), as when fx traced through it: APoZ is the fraction of positive outputs of the act,
    without the "not a ReLU-like activation" warning."""
    import warnings

    from torchpruner.attributions import APoZAttributionMetric

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=4).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    seen = []
    handle = model.bn1.act.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    expected = (seen[0] > 0).double().mean(dim=(0, 2, 3)).numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = APoZAttributionMetric(model, [(x, y)], torch.nn.CrossEntropyLoss()).run(model.bn1.act)
    assert not [w for w in caught if "ReLU-like" in str(w.message)]
    np.testing.assert_allclose(scores, expected)
