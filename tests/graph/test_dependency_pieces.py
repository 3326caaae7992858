"""Pieces of the unit axis: split/chunk/slicing are followed, each piece's units map back to the
source; equal pieces lose the same positions, positions written in the code pin the units up to
the piece's end (only their groups are refused)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oracles import assert_prune_equals_zeroed_twin, assert_unchanged, masked_at_mask_points, masked_units, snapshot
from torchpruner import Pruner


class GLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 12)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.out(a * torch.sigmoid(b))


class TwoPaths(nn.Module):
    """CSPNet-like: the stem output is cut in two, one half goes through a block."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.width = 4
        self.expand_chs = 8
        self.conv = nn.Conv2d(3, 8, 1)
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "chunk":
            xs, xb = y.chunk(2, dim=1)
        elif self.how == "shape":
            xs, xb = y.split(y.size(1) // 2, dim=1)
        elif self.how == "attribute":  # Res2Net: torch.split(out, self.width, 1)
            xs, xb = torch.split(y, self.width, 1)
        elif self.how == "whole":  # CSPNet: x.split(self.expand_chs // 2, dim=1)
            xs, xb = y.split(self.expand_chs // 2, dim=1)
        else:
            xs, xb = y.split(4, dim=1)
        return self.head(torch.cat([xs, self.block(xb)], dim=1))


class Prefix(nn.Module):
    """``y[:, :5]`` with a literal size: units 5..7 are free, 0..4 pinned."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.a = nn.Conv2d(5, 2, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.a(y[:, :5]) + self.b(y)


def test_glu_pairs_the_halves_and_equals_the_zeroed_twin():
    torch.manual_seed(0)
    model = GLU().double().eval()
    pruner = Pruner(model, input_size=(4,))
    (group,) = pruner.groups()
    assert group.num_units == 6 and {str(m) for m in group.members} >= {"out   fc (Linear, 12 units, 2 per unit)"}
    x = torch.randn(3, 4, dtype=torch.float64)
    plan = assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_model(model.fc, [1, 7]),
        lambda twin: masked_units(twin.out, [1], axis=1, on="input"),
        x,
    )
    assert model.fc.out_features == 10 and model.out.in_features == 5
    assert "fc" in plan.touched_modules


def test_glu_half_alone_is_refused_before_any_change():
    model = GLU()
    before = snapshot(model)
    with pytest.raises(ValueError, match="coupled with its units"):
        Pruner(model, input_size=(4,)).prune_model(model.fc, [1])
    assert_unchanged(before, model)


@pytest.mark.parametrize("how", ["chunk", "shape", "attribute", "whole"])
def test_equal_pieces_lose_the_same_positions_and_equal_the_zeroed_twin(how):
    torch.manual_seed(0)
    model = TwoPaths(how).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    pruner = Pruner(model, input_size=(3, 5, 5))
    stem, block = pruner.groups()
    assert stem.source_modules == [model.conv] and stem.num_units == 4
    assert "out   conv (Conv2d, 8 units, 2 per unit)" in [str(m) for m in stem.members]
    assert block.source_modules == [model.block]
    assert_prune_equals_zeroed_twin(
        model, lambda: pruner.prune_model(model.conv, [1, 5]), lambda twin: masked_units(twin.conv, [1, 5]), x
    )
    assert model.conv.out_channels == 6 and model.block.in_channels == 3 and model.head.in_channels == 7
    if how == "attribute":
        assert model.width == 3
    assert model.expand_chs == (6 if how == "whole" else 8)  # the whole width the code halves
    with pytest.raises(ValueError, match="coupled with its units"):
        pruner.prune_model(model.conv, [0])


def test_literal_split_sizes_pin_the_stem_and_name_the_op():
    model = TwoPaths("literal")
    pruner = Pruner(model, input_size=(3, 5, 5))
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"item 0 of split at call site 'split' takes units 0..3 of 8 at positions "
        r"written in the code",
    ):
        pruner.prune_model(model.conv, [0])
    assert_unchanged(before, model)
    assert [g.source_modules for g in pruner.groups()] == [[model.block]]


def test_literal_prefix_leaves_the_units_after_it_free():
    torch.manual_seed(0)
    model = Prefix().double().eval()
    pruner = Pruner(model, input_size=(3, 4, 4))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="removing any unit up to 4 would shift it"):
        pruner.prune_model(model.conv, [2])
    assert_prune_equals_zeroed_twin(
        model, lambda: pruner.prune_model(model.conv, [5, 7]), lambda twin: masked_units(twin.b, [5, 7], on="input"), x
    )
    assert model.conv.out_channels == 6 and model.a.in_channels == 5 and model.b.in_channels == 6
    model(x)


def test_pieces_recombined_shifted_pair_their_units():
    class Stacked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.fc(x)
            a, b = h.chunk(2, dim=-1)
            return self.out(h + torch.cat([b, a], dim=-1))  # unit i of a meets unit i of b

    model = Stacked()
    pruner = Pruner(model, input_size=(3,))
    (group,) = pruner.groups()
    assert group.num_units == 4  # each unit is a pair (i, i + 4)
    pruner.prune_group(group, [0])
    assert model.fc.out_features == 6


class ChannelsLastPad(nn.Module):
    """Swin-style: [B, H, W, C] padded on H and W only (``(0, 0)`` for the channels)."""

    def __init__(self, pad_units: bool = False) -> None:
        super().__init__()
        self.pad_units = pad_units
        self.fc1 = nn.Linear(3, 6)
        self.fc2 = nn.Linear(6 + (2 if pad_units else 0), 2)

    def forward(self, x):
        h = self.fc1(x)
        pad_w = (2 - h.shape[2] % 2) % 2
        h = F.pad(h, (1, 1) if self.pad_units else (0, 0, 0, pad_w, 0, 1))
        return self.fc2(h).mean((1, 2))


def test_pad_of_other_axes_is_followed_and_padding_the_units_refused():
    torch.manual_seed(0)
    model = ChannelsLastPad().double().eval()
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    pruner = Pruner(model, example_inputs=x)
    assert_prune_equals_zeroed_twin(
        model, lambda: pruner.prune_model(model.fc1, [0, 4]), lambda twin: masked_units(twin.fc1, [0, 4], axis=3), x
    )
    assert model.fc2.in_features == 4
    refused = Pruner(ChannelsLastPad(pad_units=True), example_inputs=x.float())
    with pytest.raises(ValueError, match="pads the unit axis 3"):
        refused.prune_model(refused.model.fc1, [0])


class DualPath(nn.Module):
    """DPN's block: both convs are cut at ``self.residual`` (an attribute the prune updates): the
    first parts are a residual sum, the rest a dense concatenation."""

    def __init__(self, suffix_only: bool = False) -> None:
        super().__init__()
        self.suffix_only = suffix_only
        self.residual = 4
        self.stem = nn.Conv2d(3, 7, 1)  # 4 residual + 3 dense
        self.body = nn.Conv2d(7, 6, 3, padding=1)  # 4 residual + 2 dense
        self.head = nn.Conv2d(9, 2, 1)

    def forward(self, x):
        s = self.stem(x)
        if self.suffix_only:  # the first part is not sliced by the attribute: nothing updates it
            return self.head(torch.cat([s, s[:, self.residual :], torch.zeros_like(s[:, :2]) + 1.0], dim=1)[:, :9])
        b = torch.relu(self.body(s))
        return self.head(
            torch.cat([s[:, : self.residual] + b[:, : self.residual], s[:, self.residual :], b[:, self.residual :]], 1)
        )


class PartialShortcut(nn.Module):
    """ReXNet: the shortcut is added to the first ``self.in_channels`` of a wider tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.in_channels = 4
        self.expand = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        s = self.stem(x)
        y = self.expand(torch.relu(s))
        return self.head(torch.cat([y[:, 0 : self.in_channels] + s, y[:, self.in_channels :]], dim=1))


def test_slices_at_an_attribute_follow_and_equal_the_zeroed_twin():
    torch.manual_seed(0)
    model = DualPath().double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    pruner = Pruner(model, input_size=(3, 4, 4))
    assert pruner.refused_groups() == []
    residual = [g for g in pruner.groups() if model.stem in g.source_modules and model.body in g.source_modules]
    assert len(residual) == 1 and residual[0].num_units == 4
    # stem units: 1 of the residual part, 5 of its dense part
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_model(model.stem, [1, 5]),
        lambda twin: masked_at_mask_points(twin, (x,), (twin.stem, [1, 5])),
        x,
    )
    assert model.residual == 3 and model.stem.out_channels == 5 and model.body.out_channels == 5
    assert model.head.in_channels == 7
    model(x)


def test_a_shortcut_into_the_first_channels_at_an_attribute_follows():
    torch.manual_seed(0)
    model = PartialShortcut().double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    pruner = Pruner(model, input_size=(3, 4, 4))
    assert pruner.refused_groups() == []
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_model(model.stem, [2]),
        lambda twin: masked_at_mask_points(twin, (x,), (twin.stem, [2])),
        x,
    )
    assert model.in_channels == 3 and model.expand.out_channels == 5 and model.head.in_channels == 5


def test_a_suffix_at_an_attribute_without_its_prefix_pins_the_units_before_it():
    model = DualPath(suffix_only=True).double().eval()
    pruner = Pruner(model, input_size=(3, 4, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="positions written in the code"):
        pruner.prune_model(model.stem, [0])
    assert_unchanged(before, model)
