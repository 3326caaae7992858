"""Layers that fx traces into: a subclass of a torch.nn layer whose forward calls the functional
form (``F.linear``, ``F.conv2d``, ``F.batch_norm``, ``F.group_norm``) on its own tensors stands for
that layer, and is pruned once, by its rule; a plan never slices a tensor twice along one axis."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oracles import assert_prune_equals_zeroed_twin, assert_unchanged, masked_at_mask_points, masked_units, snapshot
from torchpruner import Pruner
from torchpruner.graph import get_graph
from torchpruner.pruner import Plan
from torchpruner.rules import TensorSlice, slice_tensor
from torchpruner.schedule import prune_groups


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass calling F.batch_norm, then its activation."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return self.act(x)


class PlainLinear(nn.Linear):
    """A Linear subclass with no tensors of its own (timm's Linear)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class GroupedConv(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class LiteralGroupsConv(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, 8)


class OneGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class ConvBNAct(nn.Module):
    def __init__(self, depthwise: type = nn.Conv2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = BatchNormAct(8)
        self.dw = depthwise(8, 8, 3, padding=1, groups=8)
        self.bn2 = BatchNormAct(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = PlainLinear(8, 6)
        self.fc2 = PlainLinear(6, 3)

    def forward(self, x):
        x = self.bn2(self.dw(self.bn(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(self.pool(x).flatten(1))))


def _randomize(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return model.double().eval()


def test_functional_call_inside_a_layer_subclass_is_that_layers_call_site():
    model = ConvBNAct()
    graph = get_graph(model, (torch.randn(1, 3, 6, 6),))
    site = graph.site(model.bn)
    assert site.kind == "function" and site.target is F.batch_norm and site.module is model.bn
    assert graph.site(model.fc1).module_name == "fc1" and graph.site(model.fc1).unit_axis == 1


def test_batchnorm_subclass_is_sliced_once_and_equals_the_zeroed_twin():
    """A BatchNorm2d subclass fx traces into (its running stats read by F.batch_norm) is one
    member with its rule, not its rule plus its buffers as bare parameters (sliced twice)."""
    model = _randomize(ConvBNAct())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    pruner = Pruner(model, input_size=(3, 6, 6))
    (group,) = [g for g in pruner.groups() if model.conv in g.source_modules]
    assert [m.parameter for m in group.members if m.module is model.bn] == [None]
    plan = assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_model(model.conv, [1, 4, 6]),
        lambda twin: masked_units(twin.fc1, [1, 4, 6], on="input"),
        x,
    )
    names = [e.qualified_name for e in plan.edits if isinstance(e, TensorSlice)]
    assert len(names) == len(set((e.qualified_name, e.axis) for e in plan.edits if isinstance(e, TensorSlice)))
    assert model.bn.running_mean.shape == (5,) and model.bn.num_features == 5
    assert model.dw.groups == 5 and model.bn2.running_var.shape == (5,) and model.fc1.in_features == 5


def test_plain_linear_subclass_prunes_by_discovery():
    """``class X(nn.Linear)`` without tensors of its own: F.linear on its weight is its call."""
    model = _randomize(ConvBNAct())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    pruner = Pruner(model, input_size=(3, 6, 6))
    assert_prune_equals_zeroed_twin(
        model, lambda: pruner.prune_model(model.fc1, [0, 5]), lambda twin: masked_units(twin.fc1, [0, 5]), x
    )
    assert model.fc1.out_features == 4 and model.fc2.in_features == 4 and model.fc1.bias.shape == (4,)


def test_every_group_of_a_traced_through_model_prunes_with_the_optimizer():
    model = ConvBNAct(GroupedConv)
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()
    optimizer.step()
    pruner = Pruner(model, input_size=(3, 6, 6), optimizer=optimizer)
    assert len(pruner.groups()) == 2
    prune_groups(pruner, fraction=0.5)
    assert model.dw.groups == 4 and model.dw.weight.shape == (4, 1, 3, 3)
    model.train()
    optimizer.zero_grad()
    model(x).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_literal_groups_in_a_conv_subclass_are_refused_naming_the_layer():
    model = ConvBNAct(LiteralGroupsConv)
    pruner = Pruner(model, input_size=(3, 6, 6))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'dw' \(LiteralGroupsConv, conv2d\) passes groups=8 as a constant"):
        pruner.prune_model(model.conv, [0])
    assert_unchanged(before, model)
    assert [g for g in pruner.groups() if model.fc1 in g.source_modules]  # the other group still prunes


class SwitchedGroupsConv(nn.Conv2d):
    """Reads ``groups`` from its attribute, or writes it as a literal when ``literal`` is set (a
    plain attribute, or a buffer whose value the forward reads)."""

    def __init__(self, channels: int, literal: bool, as_buffer: bool) -> None:
        super().__init__(channels, channels, 3, padding=1, groups=4)
        if as_buffer:
            self.register_buffer("literal", torch.tensor(literal))
        else:
            self.literal = literal

    def forward(self, x):
        groups = 4 if bool(self.literal) else self.groups
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, groups)


@pytest.mark.parametrize("as_buffer", [False, True])
def test_two_layers_of_one_class_that_differ_in_a_flag_are_checked_each_on_its_own(as_buffer):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 1)
            self.reads = SwitchedGroupsConv(8, literal=False, as_buffer=as_buffer)
            self.conv2 = nn.Conv2d(3, 8, 1)
            self.writes = SwitchedGroupsConv(8, literal=True, as_buffer=as_buffer)

        def forward(self, x):
            return self.reads(self.conv1(x)) + self.writes(self.conv2(x))

    model = Net()
    pruner = Pruner(model, input_size=(3, 6, 6))
    prunable = [g for g in pruner.groups() if model.conv1 in g.source_modules]
    assert prunable and prunable[0].count_cells() is not None
    (refused,) = [g for g in pruner.refused_groups() if model.conv2 in g.source_modules]
    assert "'writes' (SwitchedGroupsConv, conv2d) passes groups=4 as a constant" in refused.refusal


def test_tied_weight_read_outside_its_layer_is_refused():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            h = self.fc(x)
            return self.out(h * self.fc.bias)  # the bias read again outside fc's call

    model = Tied()
    pruner = Pruner(model, input_size=(4,))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'fc.bias' is read outside the call of its layer 'fc'"):
        pruner.prune_model(model.fc, [1])
    assert_unchanged(before, model)


def test_group_norm_subclass_is_followed_as_group_norm():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.norm = OneGroupNorm(4, 8)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(self.norm(self.conv(x)))

    model = Net()
    pruner = Pruner(model, input_size=(3, 5, 5))
    pruner.prune_model(model.conv, [0, 1])  # one whole group of two channels
    assert model.norm.num_groups == 3 and model.norm.weight.shape == (6,) and model.head.in_channels == 6
    with pytest.raises(ValueError, match="whole groups|coupled"):
        pruner.prune_model(model.conv, [0])


# -- one slice per tensor axis -------------------------------------------------------------------


def test_two_slices_of_one_tensor_along_one_axis_are_refused_before_any_change():
    model = nn.Sequential(nn.Linear(4, 6))
    before = snapshot(model)
    edits = slice_tensor(model[0], "bias", 0, torch.tensor([0, 1, 2, 3, 4])) + slice_tensor(
        model[0], "bias", 0, torch.tensor([1, 2, 3, 4, 5])
    )
    for edit in edits:
        edit.module_name = "0"
    with pytest.raises(ValueError, match=r"slices '0.bias' twice along axis 0"):
        Plan(description="two slices", edits=edits).apply(model)
    assert_unchanged(before, model)


def test_same_slice_reached_twice_is_merged_and_other_axes_stay():
    """Planning merges two identical slices of a tensor (the same units reached twice); slices
    of one weight along two axes (rows for one group, columns for another) both stay."""
    from torchpruner.pruner.planning import finish_plan

    model = nn.Sequential(nn.Linear(4, 4))
    keep = torch.tensor([0, 2, 3])
    edits = (
        slice_tensor(model[0], "weight", 0, keep)
        + slice_tensor(model[0], "weight", 0, keep)
        + slice_tensor(model[0], "weight", 1, torch.tensor([1, 2]))
    )
    plan = finish_plan(model, None, "merge", edits)
    assert [(e.tensor_name, e.axis) for e in plan.edits] == [("weight", 0), ("weight", 1)]
    assert plan.removed_parameters == 16 - 6
    reference = model[0].weight.detach()[keep][:, [1, 2]].clone()
    plan.apply(model)
    assert torch.equal(model[0].weight.detach(), reference)
    with pytest.raises(ValueError, match="twice along axis 0"):
        finish_plan(
            model,
            None,
            "differ",
            slice_tensor(model[0], "weight", 0, torch.tensor([0, 1]))
            + slice_tensor(model[0], "weight", 0, torch.tensor([1, 2])),
        )


# -- a refusal stays in its group ------------------------------------------------------------------


class Attention(nn.Module):
    """A residual stream around an attention whose head reshape cannot be followed."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.qkv = nn.Linear(8, 24)
        self.norm = nn.Identity()  # timm's attention norm: after the refused reshape, before proj
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        b, n, _ = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 8)
        return self.out(h + self.proj(self.norm(a)))


def test_a_refused_attention_does_not_refuse_the_stream_around_it():
    torch.manual_seed(0)
    model = Attention().double().eval()
    pruner = Pruner(model, example_inputs=torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.warns(UserWarning, match=r"1 of \d+ groups of Attention hold units of a layer but cannot be pruned"):
        groups = pruner.groups()
    (stream,) = [g for g in groups if model.inp in g.source_modules]
    assert {model.inp, model.proj} <= set(stream.source_modules) and model.out in stream
    (refused,) = pruner.refused_groups()
    assert refused.source_modules == [model.qkv] and refused.refusal_site.name == "reshape"
    assert "reshape at call site 'reshape'" in refused.refusal
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_group(stream, [2, 5]),
        lambda twin: masked_at_mask_points(twin, (x,), {stream.index: [2, 5]}, min_sites=2),
        x,
    )
    assert model.proj.out_features == 6 and model.qkv.in_features == 6


def test_groups_warns_once_per_trace_and_prune_groups_reports_it():
    model = Attention()
    pruner = Pruner(model, example_inputs=torch.randn(2, 3, 4))
    with pytest.warns(UserWarning, match="refused_groups"):
        prune_groups(pruner, fraction=0.25)
    assert model.inp.out_features == 6
    with pytest.warns(UserWarning, match="cannot be pruned"):  # a new trace after the prune: said again
        pruner.groups()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.groups()  # the same trace: said once


class TokenMixing(nn.Module):
    """MLP-Mixer: a Linear over the tokens ([N, C, L]) passes the channel units through."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.tokens = nn.Linear(5, 5)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.embed(x)  # [N, L, C]
        h = h + self.tokens(h.transpose(1, 2)).transpose(1, 2)  # mix the tokens, channel by channel
        return self.head(h.mean(1))


def test_a_linear_over_another_axis_passes_the_units_through():
    torch.manual_seed(0)
    model = TokenMixing().double().eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    pruner = Pruner(model, example_inputs=x)
    (group,) = pruner.groups()
    assert model.tokens not in group and group.source_modules == [model.embed]
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_model(model.embed, [0, 3]),
        lambda twin: masked_units(twin.head, [0, 3], axis=1, on="input"),
        x,
    )
    assert model.head.in_features == 4 and model.tokens.weight.shape == (5, 5)


def test_addcmul_affine_is_element_wise_and_slices_its_parameters():
    """ResMLP's Affine: ``torch.addcmul(self.beta, self.alpha, x)``, per channel."""

    class Affine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 6)
            self.alpha = nn.Parameter(torch.randn(6))
            self.beta = nn.Parameter(torch.randn(6))
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(torch.addcmul(self.beta, self.alpha, self.fc(x)))

    torch.manual_seed(0)
    model = Affine().double().eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    pruner = Pruner(model, example_inputs=x)
    assert_prune_equals_zeroed_twin(
        model, lambda: pruner.prune_model(model.fc, [1, 2]), lambda twin: masked_units(twin.head, [1, 2], on="input"), x
    )
    assert model.alpha.shape == model.beta.shape == (4,)


def test_a_shape_read_from_the_stream_for_another_tensor_refuses_the_stream():
    """PVT-v2: ``B, N, C = x.shape`` of the stream, then the attention output ``.reshape(B, N, C)``:
    pruning the stream would change C under a tensor that keeps its width."""

    class ReusedWidth(Attention):
        def forward(self, x):
            h = self.inp(x)
            b, n, c = h.shape
            q, k, v = self.qkv(h).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
            return self.out(h + self.proj(self.norm(a)))

    model = ReusedWidth()
    pruner = Pruner(model, example_inputs=torch.randn(2, 3, 4))
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"reshape at call site 'reshape_1' computes an argument from the number of "
        r"units of 'inp'",
    ):
        pruner.prune_model(model.inp, [0])
    assert_unchanged(before, model)


def _same_padding(size: int, kernel: int, stride: int) -> int:
    size = int(size)  # a traced size as a Python int: fx cannot trace it, torch.export can
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


class SamePaddedConv(nn.Conv2d):
    """timm's Conv2dSame: the padding is computed in Python from the input size as an int (fx
    cannot trace that), so the model is captured by torch.export, which keeps ``groups`` as a
    literal: where it comes from is found by running the layer."""

    literal_groups: int | None = None

    def forward(self, x):
        ph = _same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        pw = _same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        groups = self.groups if self.literal_groups is None else self.literal_groups
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, groups)


class LiteralSamePaddedConv(SamePaddedConv):
    literal_groups = 8


@pytest.mark.parametrize("training", [False, True])
def test_groups_of_a_layer_fx_cannot_trace_alone_are_found_by_running_it(training):
    model = _randomize(ConvBNAct(SamePaddedConv)).train(training)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before = snapshot(model)
    pruner = Pruner(model, input_size=(3, 6, 6))
    assert pruner.graph().capture == "export"
    (group,) = [g for g in pruner.groups() if model.conv in g.source_modules]
    assert model.dw in group
    assert_unchanged(before, model)  # the run that reads the attribute changed no statistic nor mode
    model.eval()
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_model(model.conv, [0, 5]),
        lambda twin: masked_units(twin.fc1, [0, 5], on="input"),
        x,
    )
    assert model.dw.groups == 6 and model.dw.weight.shape == (6, 1, 3, 3)


def test_literal_groups_in_a_layer_fx_cannot_trace_alone_are_refused():
    model = _randomize(ConvBNAct(LiteralSamePaddedConv))
    pruner = Pruner(model, input_size=(3, 6, 6))
    assert pruner.graph().capture == "export"
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'dw' \(LiteralSamePaddedConv, conv2d\) passes groups=8 as a constant"):
        pruner.prune_model(model.conv, [0])
    assert_unchanged(before, model)
