"""Pruned checkpoints: state dict + JSON manifest resize a freshly built model, then load."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchpruner.pruner import Pruner
from torchpruner.pruner.checkpoint import load_pruned, pruning_manifest, resize_to_manifest, save_pruned

from oracles import assert_state_matches, assert_unchanged, snapshot


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.drop = nn.Dropout(0.4)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = h + F.relu(self.block(h))  # residual: stem and block are coupled
        h = F.relu(self.conv(self.dw(h)))
        h = F.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.fc(self.drop(h))


def _pruned_net():
    torch.manual_seed(0)
    net = Net().double()
    net.bn.running_mean.uniform_(-1, 1)
    pruner = Pruner(net, input_size=(3, 8, 8))
    pruner.prune_model(net.stem, [1, 6])  # whole residual group, dw passes through
    pruner.prune_model(net.conv, [0, 3, 4, 11], cascading_modules=[net.drop, net.fc])
    return net.eval()


def test_round_trip_into_a_fresh_model(tmp_path):
    net = _pruned_net()
    manifest_path = save_pruned(net, tmp_path / "pruned.pt")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["kept_units"]["stem"]["out"] == [0, 2, 3, 4, 5, 7]
    assert manifest["conv_groups"]["dw"] == 6
    fresh = Net().double()
    load_pruned(fresh, tmp_path / "pruned.pt")
    fresh.eval()
    assert repr(fresh) == repr(net)
    assert fresh.drop.p == pytest.approx(net.drop.p)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert_state_matches(fresh, net)
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)
    assert pruning_manifest(fresh)["kept_units"] == manifest["kept_units"]


def test_a_model_that_cannot_take_the_shapes_is_left_unchanged(tmp_path):
    net = _pruned_net()
    manifest = pruning_manifest(net)
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    before = snapshot(other)
    with pytest.raises(ValueError, match="'stem'"):
        resize_to_manifest(other, manifest)
    assert_unchanged(before, other)
    manifest["kept_units"]["conv"]["out"].append(99)
    fresh = Net().double()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="'conv'.*99"):
        resize_to_manifest(fresh, manifest)
    assert_unchanged(before, fresh)
    assert repr(fresh) == repr(Net().double())


def test_missing_manifest_is_a_clear_error(tmp_path):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_pruned(nn.Linear(2, 2), tmp_path / "plain.pt")


class FunctionalLayerNorm(nn.Module):
    """ConvNeXt's LayerNorm: ``F.layer_norm`` reads ``self.normalized_shape``, no slicing rule."""

    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size))
        self.bias = nn.Parameter(torch.randn(size))
        self.normalized_shape = (size,)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, 1e-6)


class LayerNormStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = FunctionalLayerNorm(8)
        self.pw = nn.Linear(8, 4)

    def forward(self, x):
        return self.pw(self.norm(self.conv(x).permute(0, 2, 3, 1)))


def test_a_functional_layer_norms_size_attribute_is_replayed(tmp_path):
    torch.manual_seed(0)
    net = LayerNormStem()
    pruner = Pruner(net, input_size=(3, 8, 8))
    pruner.prune_group(pruner.groups()[0], [0, 5])
    assert net.norm.normalized_shape == (6,)
    save_pruned(net, tmp_path / "ln.pt")
    assert pruning_manifest(net)["size_attributes"] == {"norm": {"normalized_shape": [6]}}

    fresh = LayerNormStem()
    load_pruned(fresh, tmp_path / "ln.pt")
    assert fresh.norm.normalized_shape == (6,)  # the type the module uses, a tuple
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("sizes", [{"normalized_shape": "6"}, {"normalized_shape": [-1]}, {"_private": 3}, [6]])
def test_malformed_size_attributes_are_refused(tmp_path, sizes):
    net = LayerNormStem()
    manifest = pruning_manifest(net)
    manifest["size_attributes"] = {"norm": sizes}
    before = snapshot(net)
    with pytest.raises(ValueError, match="size attributes of 'norm'"):
        resize_to_manifest(net, manifest)
    assert_unchanged(before, net)


def test_size_attributes_that_do_not_fit_the_model_are_refused():
    net = LayerNormStem()
    manifest = pruning_manifest(net)
    manifest["size_attributes"] = {"norm": {"normalized_shape": [6, 2]}}
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"'norm'.normalized_shape to \[6, 2\]"):
        resize_to_manifest(net, manifest)
    assert_unchanged(before, net)


def test_load_pruned_accepts_the_path_save_pruned_returns(tmp_path):
    net = _pruned_net()
    returned = save_pruned(net, tmp_path / "pruned.pt")
    fresh = Net().double()
    load_pruned(fresh, returned)
    assert repr(fresh) == repr(net)
    assert_state_matches(fresh, net)
