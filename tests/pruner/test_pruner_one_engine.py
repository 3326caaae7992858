"""One engine: with an fx trace, an explicit cascading_modules list is planned by the dependency
analysis and checked against its group, so the explicit and the discovered path give the same plan
wherever both apply, and refuse the same ops (these three used to be accepted by the explicit walk
and gave a model that ran but differed from the masked one)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracles import assert_prune_equals_zeroed_twin, assert_unchanged, masked_units, snapshot

from torchpruner import Pruner
from torchpruner.rules import TensorSlice


class AcrossUnits(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.next = nn.Conv2d(8, 2, 1)
        self.op = op

    def forward(self, x):
        h = self.conv(x)
        if self.op == "channel_shuffle":
            h = F.channel_shuffle(h, 2)
        elif self.op == "fft":
            h = torch.fft.fft(h, dim=1).real
        elif self.op == "sort":
            h = torch.sort(h, dim=1).values
        return self.next(h)


@pytest.mark.parametrize("op", ["channel_shuffle", "fft", "sort"])
@pytest.mark.parametrize("path", ["explicit", "discovered"])
def test_ops_that_mix_the_unit_axis_are_refused_on_both_paths(op, path):
    torch.manual_seed(0)
    model = AcrossUnits(op)
    pruner = Pruner(model, input_size=(3, 6, 6))
    assert pruner.graph().method == "fx"
    before = snapshot(model)
    with pytest.raises(ValueError, match="cannot prune 'conv'"):
        pruner.prune_model(model.conv, [1, 6], [model.next] if path == "explicit" else None)
    assert_unchanged(before, model)


def slices(plan) -> list[tuple[str, str, int, list]]:
    return [
        (
            e.module_name,
            e.tensor_name,
            e.axis,
            e.keep.tolist(),
            None if e.group_keep is None else [k.tolist() for k in e.group_keep],
        )
        for e in plan.edits
        if isinstance(e, TensorSlice)
    ]


def test_grouped_conv_outputs_need_equal_counts_not_equal_positions():
    """Units [1, 6] of Conv2d(4, 8, groups=2): one unit from each conv group, at different local
    positions. Both paths accept it with the same plan, and it equals the zeroed twin."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 3, 1)).double()
    twin = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 3, 1)).double()
    twin.load_state_dict(model.state_dict())
    explicit = Pruner(model, input_size=(4, 5, 5)).plan(model[0], [1, 6], [model[2]])
    discovered = Pruner(twin, input_size=(4, 5, 5)).plan(twin[0], [1, 6])
    assert slices(explicit) == slices(discovered)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert_prune_equals_zeroed_twin(
        model.eval(), lambda: explicit.apply(model), lambda twin: masked_units(twin[1], [1, 6]), x
    )
    assert model[0].groups == 2 and model[0].out_channels == 6 and model[2].in_channels == 6


@pytest.mark.parametrize("indices", [[0, 1, 4], [0]])
def test_grouped_conv_unequal_counts_are_refused_on_both_paths(indices):
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 3, 1))
    pruner = Pruner(model, input_size=(4, 5, 5))
    before = snapshot(model)
    for listed in ([model[2]], None):
        with pytest.raises(ValueError, match="'0'.*groups=2.*same number of units in every group"):
            pruner.prune_model(model[0], indices, listed)
    assert_unchanged(before, model)


def test_prune_groups_removes_the_same_count_from_every_conv_group():
    from torchpruner import prune_groups

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4), nn.ReLU(), nn.Conv2d(8, 2, 1))
    pruner = Pruner(model, input_size=(3, 9, 9))
    scores = {0: torch.arange(8.0).flip(0).numpy()}  # lowest: channels 7, 6, 5, ... (the last conv group)
    group = next(g for g in pruner.groups() if model[0] in g.source_modules)
    prune_groups(pruner, fraction=0.5, scores=lambda g: scores[0] if g is group else torch.rand(g.num_units).numpy())
    kept = pruner.kept_units(model[0])
    assert len(kept) == 4 and sorted({c // 2 for c in kept}) == [0, 1, 2, 3]  # one left in each conv group
    assert model[2].groups == 4 and model[2].in_channels == 4
