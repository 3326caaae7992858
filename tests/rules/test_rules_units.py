"""The one reading of a convolution's weight layout (``torchpruner.rules.units``), checked against
what torch's convolutions compute: entry ``[g, j, i]`` of ``conv_weight_blocks`` is the only
weight that links output channel ``g·(out/groups) + j`` to input channel ``g·(in/groups) + i``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from torchpruner.attributions.methods.weight_norm import input_weight_slices, unit_weight_slices
from torchpruner.rules.units import conv_blocked_side, conv_weight_blocks

LAYERS = {
    "conv": lambda: nn.Conv2d(6, 4, 3, groups=2, bias=False),
    "conv_transpose": lambda: nn.ConvTranspose2d(6, 4, 3, groups=2, bias=False),
    "conv1d_depthwise_multiplier": lambda: nn.Conv1d(3, 6, 3, groups=3, bias=False),
    "conv_transpose3d": lambda: nn.ConvTranspose3d(4, 6, 1, groups=2, bias=False),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_each_block_entry_links_exactly_its_output_and_input_channel(kind):
    module = LAYERS[kind]().double()
    groups, out_per_group, in_per_group = (
        module.groups,
        module.out_channels // module.groups,
        module.in_channels // module.groups,
    )
    spatial = (5,) * (module.weight.dim() - 2)
    for g in range(groups):
        for j in range(out_per_group):
            for i in range(in_per_group):
                with torch.no_grad():
                    module.weight.zero_()
                    conv_weight_blocks(module)[g, j, i] = 1.0  # a view: writes the weight
                out, read = g * out_per_group + j, g * in_per_group + i
                for channel in range(module.in_channels):
                    x = torch.zeros((1, module.in_channels) + spatial, dtype=torch.float64)
                    x[0, channel] = 1.0
                    with torch.no_grad():
                        y = module(x)[0]
                    reached = [c for c in range(module.out_channels) if y[c].abs().sum() > 0]
                    assert reached == ([out] if channel == read else [])


def test_blocked_side_is_the_side_on_weight_dim_zero():
    assert conv_blocked_side(nn.Conv2d(6, 4, 3, groups=2)) == "out"
    assert conv_blocked_side(nn.ConvTranspose2d(6, 4, 3, groups=2)) == "in"


@pytest.mark.parametrize("kind", LAYERS)
def test_weight_slices_follow_the_blocks(kind):
    module = LAYERS[kind]().double()
    blocks = conv_weight_blocks(module).detach()
    rows_out, rows_in = unit_weight_slices(module), input_weight_slices(module)
    assert rows_out.shape[0] == module.out_channels and rows_in.shape[0] == module.in_channels
    per_out, per_in = module.out_channels // module.groups, module.in_channels // module.groups
    for o in range(module.out_channels):
        torch.testing.assert_close(rows_out[o], blocks[o // per_out, o % per_out].reshape(-1), rtol=0, atol=0)
    for c in range(module.in_channels):
        torch.testing.assert_close(rows_in[c], blocks[c // per_in, :, c % per_in].reshape(-1), rtol=0, atol=0)
