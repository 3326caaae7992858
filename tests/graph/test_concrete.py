"""fx symbolic tracing with the example inputs: shape checks decided, wrapped forwards traced.

Before, ``if x.shape[1] != 3: raise`` (Hugging Face ResNet/ConvNeXt embeddings), timm VGG's
``if x.shape[-2] < self.input_kernel_size`` and MobileViT's ``if new_h != H`` stopped fx, and a
forward wrapped by a ``(*args, **kwargs)`` decorator (Hugging Face's ``can_return_tuple``) gave fx
one proxy for ``*args``: those models went to torch.export (~1 s each, sizes fixed) and a branch
on a unit count was specialised silently. Checked here:

- a condition computed from sizes only is decided on the example and guarded in the graph
  (``torch._assert``): the graph raises where the branch would go the other way;
- a branch that some unit count a prune can leave would flip refuses those units, naming the
  check; a branch no count flips (a spatial size, ``dim()``) leaves them prunable, and the prune
  equals the zeroed twin;
- a condition on tensor values is not decided (fx fails as before and torch.export takes over);
- a wrapped forward gets placeholders named like its inputs and returns the model's structure;
  when its graph does not compute what the model computes, torch.export takes over;
- tracing leaves the model as found.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracles import assert_prune_equals_zeroed_twin, masked_at_mask_points, snapshot, assert_unchanged

from torchpruner.graph import ModelGraph
from torchpruner.graph.concrete import GraphMismatch
from torchpruner.pruner import Pruner

pytestmark = pytest.mark.filterwarnings("ignore::torchpruner.graph.dependency.RefusedGroupsWarning")


class Branchy(nn.Module):
    """An input-channel check, then a branch on the unit count of ``c1`` (``threshold``) or on a
    spatial size (``threshold=None``)."""

    def __init__(self, threshold: int | None) -> None:
        super().__init__()
        self.threshold = threshold
        self.c1 = nn.Conv2d(3, 8, 3)
        self.c2 = nn.Conv2d(8, 8, 3)
        self.c3 = nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError("expected 3 channels")
        y = self.c1(x)
        if self.threshold is None:
            if y.shape[-1] > 4 and y.dim() == 4:
                y = y.relu()
        elif y.shape[1] > self.threshold:
            y = y.relu()
        return self.c3(self.c2(y).relu())


def groups_of(model: nn.Module, x: torch.Tensor) -> tuple[Pruner, dict[str, object], dict[str, object]]:
    pruner = Pruner(model, example_inputs=(x,))
    prunable = {group.source_modules[0]: group for group in pruner.groups()}
    refused = {group.source_modules[0]: group for group in pruner.refused_groups()}
    return pruner, prunable, refused


def test_a_branch_some_unit_count_flips_refuses_those_units():
    """``if y.shape[1] > 4`` after an 8-channel conv: pruning 4 of them takes the other branch (no
    ReLU). torch.export specialised it and the group was prunable; now it is refused, naming the
    check, and the next group still prunes."""
    model = Branchy(threshold=4)
    x = torch.randn(2, 3, 12, 12)
    assert ModelGraph(model, (x,)).capture == "symbolic_trace"
    pruner, prunable, refused = groups_of(model, x)
    assert model.c1 in refused and model.c1 not in prunable
    assert "shape check" in refused[model.c1].refusal and "'c1'" in refused[model.c1].refusal
    assert model.c2 in prunable


def test_a_branch_no_unit_count_flips_keeps_the_units_and_prunes_like_the_zeroed_twin():
    model = Branchy(threshold=None).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    pruner, prunable, refused = groups_of(model, x)
    assert model.c1 in prunable, [g.reason for g in refused.values()]
    group = prunable[model.c1]
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.plan_groups({group: [0, 5, 6]}).apply(model),
        lambda twin: masked_at_mask_points(twin, (x,), {group.index: [0, 5, 6]}),
        x,
    )
    assert model.c1.out_channels == 5


def test_a_decided_branch_is_guarded_in_the_graph():
    """The graph traced on 12x12 inputs holds where ``y.shape[-1] > 4``; on 6x6 inputs (4x4 after
    c1) the model takes the other branch, and the graph says so instead of computing otherwise.
    Another batch size keeps every branch: the graph runs."""
    model = Branchy(threshold=None).eval()
    graph = ModelGraph(model, (torch.randn(2, 3, 12, 12),))
    guards = [n for n in graph.traced.graph.nodes if n.op == "call_function" and n.target is torch._assert]
    assert len(guards) == 3  # channels != 3, shape[-1] > 4, dim() == 4
    with torch.no_grad():
        other = torch.randn(5, 3, 12, 12)
        torch.testing.assert_close(graph.traced(other), model(other))
        with pytest.raises(AssertionError, match="torchpruner: the traced graph holds"):
            graph.traced(torch.randn(2, 3, 6, 6))


class ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.c2 = nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        if y.sum() > 0:  # reads tensor values: never decided on the example
            y = y.relu()
        return self.c2(y)


def test_a_branch_on_tensor_values_is_not_decided():
    graph = ModelGraph(ValueBranch(), (torch.randn(2, 3, 8, 8),))
    assert graph.capture != "symbolic_trace"  # torch.export refuses it too: forward hooks
    assert isinstance(graph.fx_error, torch.fx.proxy.TraceError)
    with pytest.raises(torch.fx.proxy.TraceError):
        ModelGraph(ValueBranch(), (torch.randn(2, 3, 8, 8),), method="fx")


def passes_everything_on(forward):
    """A decorator in the style of Hugging Face's ``can_return_tuple``."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        kwargs.pop("return_dict", None)
        return forward(self, *args, **kwargs)

    return wrapper


class Wrapped(nn.Module):
    def __init__(self, tensor_check: bool = False) -> None:
        super().__init__()
        self.tensor_check = tensor_check
        self.l1 = nn.Linear(6, 10)
        self.l2 = nn.Linear(10, 3)

    @passes_everything_on
    def forward(self, features: torch.Tensor, scale: float = 1.0, **kwargs: object) -> dict[str, torch.Tensor]:
        hidden = self.l1(features).relu()
        if self.tensor_check and not isinstance(hidden, torch.Tensor):  # a proxy takes another path
            hidden = hidden * 2
        return {"logits": self.l2(hidden) * scale, "mean": features.mean(1)}


def test_a_wrapped_forward_is_traced_with_placeholders_named_like_its_inputs():
    model = Wrapped().double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    graph = ModelGraph(model, (), {"features": x, "scale": 0.5})
    assert graph.capture == "symbolic_trace"
    # the float input is fixed to its example value, as torch.export fixes it
    assert [n.target for n in graph.traced.graph.nodes if n.op == "placeholder"] == ["features"]
    with torch.no_grad():
        out = graph.traced(x)
        assert isinstance(out, dict) and list(out) == ["logits", "mean"]
        torch.testing.assert_close(out["logits"], model(features=x, scale=0.5)["logits"])
    pruner = Pruner(model, example_inputs={"features": x, "scale": 0.5})
    (group,) = pruner.groups()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected = twin.l2(twin.l1(x).relu() * torch.tensor([0.0, 1, 1, 0] + [1.0] * 6, dtype=torch.float64)) * 0.5
    pruner.plan_groups({group: [0, 3]}).apply(model)
    with torch.no_grad():
        torch.testing.assert_close(model(features=x, scale=0.5)["logits"], expected)


def test_a_wrapped_forward_whose_graph_computes_otherwise_falls_back_to_export():
    model = Wrapped(tensor_check=True).eval()
    x = torch.randn(4, 6)
    graph = ModelGraph(model, (), {"features": x})
    assert graph.capture == "export" and isinstance(graph.fx_error, GraphMismatch)
    with torch.no_grad():
        torch.testing.assert_close(graph.traced(features=x)["logits"], model(features=x)["logits"])


class NormThenCheck(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.bn(self.c1(x)))
        if y.shape[-1] >= 3:  # decided by running c1, bn and the dropout on the example
            y = y.relu()
        return self.c2(y)


def test_deciding_a_branch_leaves_the_model_as_found():
    """The ops a condition depends on run on the example while tracing: in eval mode, without
    touching BatchNorm statistics, the training flags or the RNG."""
    torch.manual_seed(0)
    model = NormThenCheck().train()
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    rng = torch.get_rng_state()
    graph = ModelGraph(model, (x,))
    assert graph.capture == "symbolic_trace"
    assert_unchanged(before, model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())


def test_f_interpolate_sizes_from_a_shape_check_stay_symbolic():
    """MobileViT's unfold: ``math.ceil(H / p) * p`` compared with H (math functions on sizes)."""
    import math

    class Unfold(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 1)
            self.c2 = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c1(x)
            h = math.ceil(y.shape[-1] / 4) * 4
            if h != y.shape[-1]:
                y = F.interpolate(y, size=(h, h))
            return self.c2(y)

    model = Unfold().eval()
    graph = ModelGraph(model, (torch.randn(2, 3, 6, 6),))
    assert graph.capture == "symbolic_trace"
    with torch.no_grad():
        x = torch.randn(3, 3, 6, 6)
        torch.testing.assert_close(graph.traced(x), model(x))


class SplitHeads(nn.Module):
    """``h.view((*h.shape[:-1], 2, -1))`` (Hugging Face attention): fx could not iterate the shape."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        heads = h.view((*h.shape[:-1], 2, -1)).relu()
        return self.out(heads.flatten(-2))


def test_a_shape_unpacked_into_a_tuple_is_traced_with_its_length_guarded():
    model = SplitHeads().double().eval()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    graph = ModelGraph(model, (x,))
    assert graph.capture == "symbolic_trace", graph.fx_failure
    with torch.no_grad():
        other = torch.randn(3, 7, 6, dtype=torch.float64)  # other batch and length: same rank
        torch.testing.assert_close(graph.traced(other), model(other))
        with pytest.raises(AssertionError, match="of length 2"):
            graph.traced(torch.randn(5, 6, dtype=torch.float64))
    pruner, prunable, refused = groups_of(model, x)
    assert model.proj in prunable, [g.refusal for g in refused.values()]
    group = prunable[model.proj]
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.plan_groups({group: [1]}).apply(model),
        lambda twin: masked_at_mask_points(twin, (x,), {group.index: [1]}),
        x,
    )


class ViewedBack(nn.Module):
    """GPT-2's ``output_shape = (-1,) + input_shape[1:] + (hidden.size(-1),)``, read from the stream
    early and used to view the last stream tensor back: one computed tuple whose only entry that
    follows the stream's units is its unit axis, so the stream stays prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.res = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        output_shape = (-1,) + h.shape[1:-1] + (h.size(-1),)
        flat = (h + self.res(h)).flatten(0, 1)
        return self.head(flat.view(output_shape).relu())


def test_a_reshape_to_a_computed_shape_that_follows_only_its_unit_axis_keeps_the_stream():
    model = ViewedBack().double().eval()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    pruner, prunable, refused = groups_of(model, x)
    assert model.inp in prunable, [g.refusal for g in refused.values()]
    group = prunable[model.inp]
    assert model.res in group.source_modules
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.plan_groups({group: [0, 4, 7]}).apply(model),
        lambda twin: masked_at_mask_points(twin, (x,), {group.index: [0, 4, 7]}),
        x,
    )
    assert model.inp.out_features == 5 and model.head.in_features == 5
