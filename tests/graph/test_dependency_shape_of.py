"""``x.view_as(other)`` / ``reshape_as`` / ``expand_as`` where ``other`` carries units too: ``other``
is read only for its shape, so its units line up with the result's (they lose the same positions)
and the op is followed as a movement of ``x`` (it used to be refused: "reads 2 tensors with units")."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oracles import assert_prune_equals_zeroed_twin, assert_unchanged, masked_at_mask_points, masked_units, snapshot
from torchpruner import Pruner


class Gate(nn.Module):
    """Channel attention: a per-channel gate broadcast back with ``expand_as`` (SE/ECA style)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.gate = nn.Linear(6, 6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        h = self.conv(x)
        g = torch.sigmoid(self.gate(h.mean((2, 3))))
        g = g.view(g.size(0), -1, 1, 1)
        if self.how == "expand_as":
            g = g.expand_as(h)
        return self.head(torch.relu(h * g))


class RoundTrip(nn.Module):
    """A reshape and back to the input's own shape with ``reshape_as`` / ``view_as``."""

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        h = self.conv(x)
        flat = torch.relu(h.reshape(h.size(0), h.size(1), -1))
        return self.head(getattr(flat, self.method)(h))


class ChannelMix(nn.Module):
    """ECA: a 1-d convolution along the channel axis; the gate's units do not line up with ``h``'s."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        h = self.conv(x)
        g = self.mix(h.mean((2, 3)).view(h.size(0), 1, -1))
        return self.head(h * torch.sigmoid(g.view(h.size(0), -1, 1, 1)).expand_as(h))


@pytest.mark.parametrize("how", ["expand_as", "broadcast"])
def test_a_gate_expanded_as_its_input_prunes_and_equals_the_zeroed_twin(how):
    torch.manual_seed(0)
    model = Gate(how).double().eval()
    pruner = Pruner(model, input_size=(3, 5, 5))
    assert pruner.refused_groups() == []
    (group,) = [g for g in pruner.groups() if any(m is model.conv for m in g.source_modules)]
    names = {m.module_name for m in group.members}
    assert {"conv", "gate", "head"} <= names  # the gate's rows and columns go with the channels
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_model(model.conv, [1, 4]),
        lambda twin: masked_units(twin.conv, [1, 4]),
        x,
    )
    assert model.conv.out_channels == 4 and model.gate.weight.shape == (4, 4) and model.head.in_channels == 4


@pytest.mark.parametrize("method", ["reshape_as", "view_as"])
def test_a_reshape_back_to_the_inputs_shape_prunes_and_equals_the_zeroed_twin(method):
    torch.manual_seed(0)
    model = RoundTrip(method).double().eval()
    pruner = Pruner(model, input_size=(3, 4, 4))
    assert pruner.refused_groups() == []
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_model(model.conv, [0, 5]),
        lambda twin: masked_units(twin.conv, [0, 5]),
        x,
    )
    assert model.head.in_channels == 4


def test_a_shape_taken_from_a_tensor_whose_units_do_not_line_up_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    model = ChannelMix().double().eval()
    pruner = Pruner(model, input_size=(3, 4, 4))
    refused = [g for g in pruner.refused_groups() if any(m is model.conv for m in g.source_modules)]
    assert len(refused) == 1 and refused[0].refusal
    assert not [g for g in pruner.groups() if any(m is model.conv for m in g.source_modules)]
    before = snapshot(model)
    with pytest.raises(Exception, match="cannot prune .conv.*expand_as"):
        pruner.prune_model(model.conv, [0])
    assert_unchanged(before, model)


class StandardisedConv(nn.Conv2d):
    """Weight standardisation (NF-ResNet's ScaledStdConv2d): the forward computes its weight."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight) * self.gain, self.bias, padding=self.padding)


def test_a_layer_computing_its_own_weight_is_refused_naming_the_weight_not_a_later_op():
    """A conv weight has units on two axes: its computation cannot be followed; the refusal names
    it and the way out, instead of an op downstream ("reshape_as spreads the units" or "reads 2
    tensors with units"), and no group holds a guessed (kernel) axis of the weight."""
    model = nn.Sequential(StandardisedConv(3, 8), nn.ReLU(), StandardisedConv(8, 4)).double().eval()
    pruner = Pruner(model, input_size=(3, 5, 5))
    assert pruner.groups() == []
    refused = pruner.refused_groups()
    assert refused and all("weight standardisation" in g.refusal and "StandardisedConv" in g.refusal for g in refused)
    assert all(m.num_units in (8, 4) for g in refused for m in g.members)


class Scale(nn.Module):
    """timm's MetaFormer ``Scale``: ``x * self.scale.view(self.shape)``, the whole view shape one tuple
    attribute (fx writes its value into the graph)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shape = (dim, 1, 1)
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * self.scale.view(self.shape)


class ScaledResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.scale = Scale(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        h = self.conv(x)
        return self.head(h + self.scale(torch.relu(h)))


def test_a_view_shape_held_by_a_tuple_attribute_follows_and_the_prune_updates_it():
    torch.manual_seed(0)
    model = ScaledResidual().double().eval()
    pruner = Pruner(model, input_size=(3, 4, 4))
    assert pruner.refused_groups() == []
    (group,) = pruner.groups()
    assert {m.module_name for m in group.members} == {"conv", "scale", "head"}
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_model(model.conv, [0, 4]),
        lambda twin: masked_units(twin.conv, [0, 4]),
        torch.randn(2, 3, 4, 4, dtype=torch.float64),
    )
    assert model.scale.shape == (4, 1, 1) and type(model.scale.shape) is tuple
    assert model.scale.scale.shape == (4,)


class CountReused(nn.Module):
    """``B, H, W, C = h.shape`` reused for another tensor (Swin's window reverse): ``w.view(B, H, W, C)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 6)
        self.fc2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc1(x)
        b, height, width, c = h.shape
        w = self.fc2(torch.relu(h).view(b, height * width, c))
        return self.head(torch.relu(w.view(b, height, width, c))).mean((1, 2))


def test_a_unit_count_reused_for_another_tensors_reshape_links_the_two_and_prunes():
    """The reshape's units take their count from ``h``: both lose the same positions (one group), so
    the count it reads stays right (it used to refuse ``h``'s units: 'computes an argument from the
    number of units of fc1')."""
    torch.manual_seed(0)
    model = CountReused().double().eval()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    pruner = Pruner(model, example_inputs=x)
    assert pruner.refused_groups() == []
    (group,) = pruner.groups()
    assert set(group.source_modules) == {model.fc1, model.fc2}
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_group(group, [1, 4]),
        lambda twin: masked_at_mask_points(twin, (x,), {group.index: [1, 4]}),
        x,
    )
    assert model.fc1.out_features == 4 and model.fc2.weight.shape == (4, 4) and model.head.in_features == 4
