"""A group's L1 WeightNorm takes ``|w|`` in the weights' own dtype and sums in float64, reading
the rows in place when a member holds all of them in order: the scores are bit for bit those of
the definition over the float64 slices (:func:`group_member_slices`: Σ|row| per member, divided
by the member's mean, summed), for float32 / bfloat16 / float64 weights and for members that hold
a part of a tensor (a concatenation), several positions per unit (a flatten into a Linear),
columns (a Linear's inputs, an Embedding) or bare parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from torchpruner import Pruner
from torchpruner.attributions.methods.weight_norm import group_member_slices, group_weight_norms


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.proj = nn.Linear(6, 3)
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.b = nn.Conv2d(3, 4, 1)
        self.dw = nn.Conv2d(9, 9, 3, padding=1, groups=9)
        self.head = nn.Linear(9 * 4 * 4, 7)
        self.scale = nn.Parameter(torch.randn(1, 9, 1, 1))

    def forward(self, tokens):
        x = self.proj(self.embed(tokens).mean(1))[:, :, None, None].expand(-1, -1, 4, 4)
        y = torch.cat([torch.relu(self.bn(self.a(x))), self.b(x)], dim=1)
        return self.head((self.dw(y) * self.scale).flatten(1))


def _definition(group) -> torch.Tensor:
    total = torch.zeros(group.num_units, dtype=torch.float64)
    for _, rows in group_member_slices(group):
        per_unit = rows.abs().sum(dim=1)
        if per_unit.mean() > 0:
            total += per_unit / per_unit.mean()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_group_l1_norms_equal_the_float64_definition_bit_for_bit(dtype):
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    with torch.no_grad():
        model.bn.weight.uniform_(-2, 2)
    groups = Pruner(model, example_inputs=torch.randint(0, 20, (2, 5))).groups(include_outputs=True)
    assert len(groups) >= 3
    shapes = set()
    for group in groups:
        got = group_weight_norms(group)
        assert got.dtype == torch.float64
        assert torch.equal(got, _definition(group)), group
        shapes |= {rows.shape[1] for _, rows in group_member_slices(group)}
    assert len(shapes) > 3  # rows of several layouts were compared


def test_group_member_slices_are_float64_copies():
    model = Mixed().double()
    groups = Pruner(model, example_inputs=torch.randint(0, 20, (2, 5))).groups()
    weights = {p.data_ptr() for p in model.parameters()}
    for group in groups:
        for _, rows in group_member_slices(group):
            assert rows.dtype == torch.float64
            assert rows.data_ptr() not in weights  # writing a row never writes the model
