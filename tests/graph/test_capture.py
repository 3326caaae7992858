"""The ATen-to-torch translation of torch.export capture (graph/capture.py), on ops whose
arguments the torch-level form must keep: negative dims of slice/select, division rounding modes,
and avg_pool2d's divisor override. The captured graph must compute what the model computes. And a
class whose rule is registered by class path (Hugging Face's Conv1D) is a leaf from the first
trace on."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from oracles import assert_prune_equals_zeroed_twin, masked_at_mask_points, masked_units
from torchpruner import Pruner
from torchpruner.graph import get_graph, invalidate_graph
from torchpruner.graph.capture import capture
from torchpruner.rules import register_slicing_rule_by_path
from torchpruner.rules.layers import TransposedLinearRule


def captured(model: nn.Module, *examples: torch.Tensor):
    """``capture(model, (examples[0],))``, checked to compute what ``model`` computes on every example."""
    graph = capture(model, (examples[0],))
    with torch.no_grad():
        for x in examples:
            torch.testing.assert_close(graph(x), model(x), rtol=0, atol=1e-12)
    return graph


class Ops(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        a = h.narrow(-1, 1, 3)  # aten.slice on dim -1
        b = h.select(-2, 2).unsqueeze(-2)  # aten.select on dim -2
        c = torch.div(h, 3.0, rounding_mode="floor")  # not a true division
        d = F.avg_pool2d(h, 2, divisor_override=3)  # not a mean
        return a.sum((-1, -2)) + b.sum((-1, -2)) + c.sum((-1, -2)) + d.sum((-1, -2))


def test_captured_graph_keeps_negative_dims_rounding_modes_and_divisor_overrides():
    torch.manual_seed(0)
    model = Ops().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    captured(model, x, torch.randn(3, 3, 6, 6, dtype=torch.float64))  # another batch size too


def test_a_rule_registered_by_class_path_makes_the_class_a_leaf_from_the_first_trace():
    """A class known by path only (as Hugging Face's Conv1D is) is a leaf in the very first trace
    of a model, so every later trace is the same graph."""

    class PathConv1D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))  # [in, out], y = x @ W + b
            self.bias = nn.Parameter(torch.zeros(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.addmm(self.bias, x, self.weight)

    PathConv1D.__module__, PathConv1D.__qualname__ = "a_library_not_imported", "PathConv1D"
    register_slicing_rule_by_path("a_library_not_imported.PathConv1D")(TransposedLinearRule)
    model = nn.Sequential(PathConv1D(), nn.ReLU(), nn.Linear(3, 2))
    first = get_graph(model, (torch.randn(2, 4),))
    first_ops = [site.kind for site in first.sites]
    invalidate_graph(model)
    second = get_graph(model, (torch.randn(2, 4),))
    assert first.has_sites(model[0]) and [site.kind for site in second.sites] == first_ops


class PaddedSame(nn.Module):
    """Padding chosen from the input size as a Python int: fx cannot trace it, the export
    captures ``aten.pad`` (F.pad with a mode), which pads the spatial axes only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.head = nn.Conv2d(6, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if int(h.shape[-1]) % 2 == 1:  # a size as a Python int: fx cannot trace it, torch.export can
            h = F.pad(h, [1, 1, 1, 1], mode="reflect") + F.pad(h, [1, 1, 1, 1], value=0.5)
            h = h + F.pad(h[..., 1:-1, 1:-1], [1, 1, 1, 1], mode="replicate")
        return self.head(h)


def test_an_exported_pad_with_a_mode_is_followed_and_prunes_like_the_zeroed_twin():
    torch.manual_seed(0)
    model = PaddedSame().double().eval()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    graph = captured(model, x)
    pads = [n for n in graph.graph.nodes if n.target is F.pad]
    # aten.pad, or the reflection_pad2d / constant_pad_nd older exports decompose it into
    assert [n.kwargs.get("mode", "constant") for n in pads] == ["reflect", "constant", "replicate"]
    pruner = Pruner(model, example_inputs=(x,))
    assert pruner.graph().capture == "export"
    assert pruner.refused_groups() == []

    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_model(model.conv, [0, 4]),
        lambda twin: masked_units(twin.head, [0, 4], on="input"),  # both padded copies of the channels
        x,
    )
    assert model.conv.out_channels == 4 and model.head.in_channels == 4


class InPlaceResidual(nn.Module):
    """Hugging Face's ResNet layer: ``hidden += residual``; exported as ``aten.add_``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.stem(x)
        hidden = self.conv(torch.relu(residual))
        if int(hidden.shape[-1]) % 2 == 1:  # a size as a Python int: fx fails, torch.export captures
            hidden += residual
            hidden *= 0.5
        return self.head(torch.relu(hidden))


def test_an_exported_in_place_residual_add_is_followed_and_prunes_like_the_zeroed_twin():
    torch.manual_seed(0)
    model = InPlaceResidual().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    captured(model, x)
    pruner = Pruner(model, example_inputs=(x,))
    assert pruner.graph().capture == "export"
    assert pruner.refused_groups() == []
    (stream,) = [g for g in pruner.groups() if model.stem in g.source_modules]
    assert model.conv in stream.source_modules  # the add couples the two
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_group(stream, [2]),
        lambda twin: masked_at_mask_points(twin, (x,), {stream.index: [2]}),
        x,
    )
    assert model.stem.out_channels == 5 and model.conv.out_channels == 5 and model.head.in_channels == 5
