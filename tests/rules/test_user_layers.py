"""A user layer with a registered slicing rule is one call site in the fx graph, and automatic
discovery prunes through it (zeroed-twin oracle, float64)."""

import torch
import torch.nn as nn

from torchpruner.graph import ModelGraph, make_example_inputs
from torchpruner.pruner import Pruner, SlicingRule, register_slicing_rule, set_attribute, slice_tensor

from oracles import assert_prune_equals_zeroed_twin, masked_units


class ChannelScale(nn.Module):
    """y = x * w[c]: one weight per channel; fx would otherwise trace into the view and the mul."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.weight.view(1, -1, *([1] * (x.dim() - 2)))


@register_slicing_rule(ChannelScale)
class ChannelScaleRule(SlicingRule):
    passes_units_through = True
    input_unit_axis = 1

    def out_units(self, module):
        return module.channels

    def in_units(self, module):
        return module.channels

    def prune_out(self, module, selection):
        return slice_tensor(module, "weight", 0, selection.keep) + set_attribute(
            module, "channels", len(selection.keep)
        )

    prune_in = prune_out


def _net():
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(2, 6, 3), ChannelScale(6), nn.Sigmoid(), nn.Conv2d(6, 3, 3), nn.Flatten(), nn.Linear(3 * 2 * 2, 2)
        )
        .double()
        .eval()
    )


def test_registered_user_layer_is_a_leaf_call_site():
    model = _net()
    graph = ModelGraph(model, *make_example_inputs(model, (2, 6, 6)))
    assert graph.method == "fx"
    assert graph.site(model[1]).kind == "module" and graph.site(model[1]).num_units == 6
    # find_best walks past BatchNorm/activations/Dropout only, not past other layers
    assert graph.evaluation_point(model[0], find_best=True).module is model[0]
    assert graph.evaluation_point(model[1], find_best=True).module is model[2]


def test_automatic_discovery_prunes_through_a_user_layer():
    model = _net()
    removed = [1, 4]
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    assert_prune_equals_zeroed_twin(
        model,
        lambda: Pruner(model, input_size=(2, 6, 6)).prune_model(model[0], removed),
        lambda twin: masked_units(twin[2], removed),
        x,  # zero after the activation
        rtol=1e-12,
        atol=1e-12,
    )
    assert model[1].weight.shape == (4,) and model[3].in_channels == 4
