"""The Pruner refuses what it cannot do correctly, before anything changes.

Unit indices are checked by one function for every entry point; a layer subclass with tensors its
rule does not know is refused by name; a plan that cannot be verified is refused; removing the
model's own output units needs an explicit opt-in; the other arguments are checked too.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
import torch.nn as nn

from torchpruner import Pruner
from torchpruner.pruner import register_slicing_rule, slice_tensor
from torchpruner.rules.layers import LinearRule

from oracles import assert_unchanged, masked_units, snapshot


def trained(model: nn.Module, inputs: torch.Tensor) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``model`` after two SGD-momentum steps, so the optimizer has per-element state to protect."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()
    return model, optimizer


def chain() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    return trained(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)), torch.randn(8, 4))


# --------------------------------------------------------------------------------------------
# One index check for every entry point
# --------------------------------------------------------------------------------------------

MASK = [i in (7, 12) for i in range(16)]  # a boolean mask of units 7 and 12

BAD_INDICES = {
    "bool-list-mask": (MASK, TypeError, "boolean mask"),
    "bool-tensor-mask": (torch.tensor(MASK), TypeError, "boolean mask"),
    "bool-numpy-mask": (np.array(MASK), TypeError, "boolean mask"),
    "floats": ([1.7, 2.2], TypeError, "integers"),
    "float-tensor": (torch.tensor([1.7, 2.2]), TypeError, "integers"),
    "float-numpy": (np.array([1.7, 2.2]), TypeError, "integers"),
    "duplicates": ([3, 3], ValueError, "duplicates"),
    "out-of-range": ([16], ValueError, "out of range"),
    "negative": ([-1], ValueError, "out of range.*negative"),
    "meta-tensor": (torch.tensor([1, 2], device="meta"), TypeError, "meta"),
    "dict": ({1: 0, 2: 0}, TypeError, "dict"),
    "nested": ([[1, 2]], TypeError, "integers"),
    "string": ("12", TypeError, "str"),
}


def _entry_points(model, pruner):
    """Each public way to remove units of ``model[0]``'s output (16 units), with its argument name."""

    def group():
        (first,) = [g for g in pruner.groups() if model[0] in g.source_modules]
        return first

    return {
        "prune_model": (lambda idx: pruner.prune_model(model[0], idx), "indices"),
        "prune_model-cascade": (lambda idx: pruner.prune_model(model[0], idx, [model[1], model[2]]), "indices"),
        "plan": (lambda idx: pruner.plan(model[0], idx), "indices"),
        "prune_module": (lambda idx: pruner.prune_module(model[0], idx), "indices"),
        "prune_parameter": (lambda idx: pruner.prune_parameter(model[0], "weight", idx, axis=0), "indices"),
        "prune_group": (lambda idx: pruner.prune_group(group(), idx), "units"),
        "plan_groups": (lambda idx: pruner.plan_groups({group(): idx}), "units"),
    }


ENTRY_POINTS = list(_entry_points(None, None))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", list(BAD_INDICES))
def test_bad_indices_are_refused_the_same_way_everywhere(entry, case):
    indices, error, match = BAD_INDICES[case]
    model, optimizer = chain()
    pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
    prune, argument = _entry_points(model, pruner)[entry]
    before = snapshot(model, optimizer)
    with pytest.raises(error, match=match) as info:
        prune(indices)
    assert argument in str(info.value)
    assert_unchanged(before, model, optimizer)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(
    "empty",
    [[], torch.tensor([]), np.array([]), torch.tensor([], dtype=torch.long)],
    ids=["list", "float-tensor", "float-numpy", "long-tensor"],
)
def test_empty_indices_are_a_no_op_everywhere(entry, empty):
    model, optimizer = chain()
    pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
    prune, _ = _entry_points(model, pruner)[entry]
    before = snapshot(model, optimizer)
    plan = prune(empty)
    assert "nothing to do" in plan.description
    assert_unchanged(before, model, optimizer)


def test_bool_mask_never_prunes_units_0_and_1():
    """The mask of units 7 and 12 read as integers would be units 0 and 1."""
    model, optimizer = chain()
    pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
    (group,) = [g for g in pruner.groups() if model[0] in g.source_modules]
    with pytest.raises(TypeError, match="nonzero"):
        pruner.prune_group(group, torch.tensor(MASK))
    assert model[0].out_features == 16


# --------------------------------------------------------------------------------------------
# Other arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "axis, error, match",
    [
        (0.0, TypeError, "axis.*float"),
        ("0", TypeError, "axis.*str"),
        (True, TypeError, "axis.*bool"),
        (2, ValueError, "axis 2 is out of range"),
        (-3, ValueError, "axis -3 is out of range"),
    ],
)
def test_prune_parameter_checks_the_axis(axis, error, match):
    model, optimizer = chain()
    pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
    before = snapshot(model, optimizer)
    with pytest.raises(error, match=match):
        pruner.prune_parameter(model[0], "weight", [1], axis=axis)
    assert_unchanged(before, model, optimizer)


def test_prune_parameter_accepts_numpy_integer_axis():
    model, optimizer = chain()
    Pruner(model, input_size=(4,), optimizer=optimizer).prune_parameter(model[0], "weight", [1], axis=np.int64(1))
    assert model[0].weight.shape == (16, 3)


@pytest.mark.parametrize(
    "input_size, error, match",
    [
        ((3.9, 8, 8), TypeError, "input_size.*3.9"),
        ((3, True, 8), TypeError, "input_size.*True"),
        (4, TypeError, "input_size.*sequence"),
        ((3, 0, 8), ValueError, "input_size.*positive"),
    ],
)
def test_input_size_must_hold_positive_integers(input_size, error, match):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    before = snapshot(model)
    with pytest.raises(error, match=match):
        Pruner(model, input_size=input_size).prune_model(model[0], [1])
    assert_unchanged(before, model)


def test_input_size_of_numpy_integers_and_torch_size_still_works():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    Pruner(model, input_size=torch.Size([3, 8, 8])).prune_model(model[0], [1])
    Pruner(model, input_size=np.array([3, 8, 8])).prune_model(model[0], [1])
    assert model[0].out_channels == 2


def test_prune_group_refuses_what_is_not_a_group():
    model, optimizer = chain()
    pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
    before = snapshot(model, optimizer)
    with pytest.raises(TypeError, match="group.*Group.*'x'.*str"):
        pruner.prune_group("x", [1])
    with pytest.raises(TypeError, match="selection.*dict.*list"):
        pruner.plan_groups([(pruner.groups()[0], [1])])
    assert_unchanged(before, model, optimizer)


def test_prune_group_refuses_a_group_of_another_model():
    model, optimizer = chain()
    other, _ = chain()
    pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
    foreign = Pruner(other, input_size=(4,)).groups()[0]
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="another model"):
        pruner.prune_group(foreign, [1])
    assert_unchanged(before, model, optimizer)


# --------------------------------------------------------------------------------------------
# Output units of the model need an opt-in
# --------------------------------------------------------------------------------------------


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, the Pruner follows forward hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        if x.sum() > 1e9:
            x = x * 0
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("how", ["discovered", "explicit", "hooks"])
def test_pruning_the_classifier_outputs_needs_include_outputs(how):
    torch.manual_seed(0)
    model = Untraceable() if how == "hooks" else nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    model, optimizer = trained(model, torch.randn(8, 4))
    last = model.fc2 if how == "hooks" else model[2]
    cascade = None if how == "discovered" else []
    pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="output.*of the model.*include_outputs=True"):
        pruner.prune_model(last, [1], cascade)
    assert_unchanged(before, model, optimizer)
    pruner.prune_model(last, [1], cascade, include_outputs=True)
    assert last.out_features == 2
    assert model(torch.randn(2, 4)).shape == (2, 2)


def test_hidden_layers_need_no_opt_in():
    model, optimizer = chain()
    Pruner(model, input_size=(4,), optimizer=optimizer).prune_model(model[0], [7, 12], [model[1], model[2]])
    assert model[0].out_features == 14 and model[2].out_features == 3


# --------------------------------------------------------------------------------------------
# Subclasses of registered layers with tensors of their own
# --------------------------------------------------------------------------------------------


class GatedLinear(nn.Linear):
    """A Linear with a learned per-output gate the Linear rule does not know about."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.gate = nn.Parameter(torch.linspace(0.5, 2.0, out_features))

    def forward(self, x):
        return super().forward(x) * self.gate


class TrackedLinear(nn.Linear):
    """A Linear with a per-output running statistic, updated in training mode only."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("running_norm", torch.ones(out_features))

    def forward(self, x):
        y = super().forward(x)
        if self.training:
            self.running_norm.mul_(0.9).add_(0.1 * y.detach().abs().mean(0))
        return y


def subclass_net(layer: type) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(layer(4, 6), nn.ReLU(), nn.Linear(6, 2))


@pytest.mark.parametrize("layer, tensor", [(GatedLinear, "gate"), (TrackedLinear, "running_norm")])
@pytest.mark.parametrize("how", ["discovered", "explicit", "prune_module", "consumer"])
def test_subclass_with_unknown_tensors_is_refused_by_name(layer, tensor, how):
    model = subclass_net(layer)
    if how == "consumer":
        model = nn.Sequential(nn.Linear(4, 6), layer(6, 6), nn.ReLU(), nn.Linear(6, 2))
    model, optimizer = trained(model, torch.randn(8, 4))
    pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=f"'{layer.__name__}'|{layer.__name__}") as info:
        if how == "discovered":
            pruner.prune_model(model[0], [2])
        elif how == "explicit":
            pruner.prune_model(model[0], [2], [model[1], model[2]])
        elif how == "prune_module":
            pruner.prune_module(model[0], [2])
        else:
            pruner.prune_model(model[0], [2], [model[1]])
    assert tensor in str(info.value) and "register_slicing_rule" in str(info.value)
    assert_unchanged(before, model, optimizer)


def test_a_rule_registered_for_the_subclass_takes_precedence():
    class RegisteredGatedLinear(GatedLinear):
        pass

    @register_slicing_rule(RegisteredGatedLinear)
    class GatedLinearRule(LinearRule):
        tensors = LinearRule.tensors | {"gate"}

        def prune_out(self, module, selection):
            return super().prune_out(module, selection) + slice_tensor(module, "gate", 0, selection.keep)

    model = subclass_net(RegisteredGatedLinear).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    with masked_units(model[0], [2]), torch.no_grad():
        expected = model(x)
    Pruner(model, input_size=(4,)).prune_model(model[0], [2])
    assert model[0].gate.shape == (5,) and model[2].in_features == 5
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_subclass_without_tensors_of_its_own_keeps_the_base_rule():
    class PlainLinear(nn.Linear):  # timm-like: a forward override, no tensors of its own
        def forward(self, x):
            return super().forward(x)

    model, optimizer = trained(subclass_net(PlainLinear), torch.randn(8, 4))
    Pruner(model, input_size=(4,), optimizer=optimizer).prune_model(model[0], [2], [model[1], model[2]])
    assert model[0].out_features == 5 and model[2].in_features == 5


# --------------------------------------------------------------------------------------------
# A plan that cannot be verified is refused
# --------------------------------------------------------------------------------------------


class UntraceableResidual(nn.Module):
    """fx cannot trace it (data-dependent branch); ``h + fc2(h)`` is a merge the hooks trace
    cannot see; the open file makes a deep copy impossible."""

    def __init__(self, log) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 2)
        self.log = log

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > -1e9:
            h = h + self.fc2(h)
        return self.fc3(h)


def test_a_plan_that_cannot_be_checked_on_a_copy_is_refused():
    with tempfile.TemporaryFile() as log:
        torch.manual_seed(0)
        model, optimizer = trained(UntraceableResidual(log), torch.randn(8, 4))
        pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
        before = snapshot(model, optimizer)
        with pytest.raises(ValueError, match="cannot be verified.*deep-cop") as info:
            pruner.prune_model(model.fc1, [1], [model.fc2])
        assert "UntraceableResidual" in str(info.value) and "torch.fx" in str(info.value)
        assert_unchanged(before, model, optimizer)


def test_a_plan_that_can_be_checked_on_a_copy_still_applies():
    torch.manual_seed(0)
    model, optimizer = trained(Untraceable(), torch.randn(8, 4))
    Pruner(model, input_size=(4,), optimizer=optimizer).prune_model(model.fc1, [1], [model.act, model.fc2])
    assert model.fc1.out_features == 5 and model.fc2.in_features == 5


# --------------------------------------------------------------------------------------------
# Messages that say what happens
# --------------------------------------------------------------------------------------------


class GLU(nn.Module):
    """A gated unit: the halves of fc1's output are multiplied, coupling unit i with unit i + 4."""

    def __init__(self, traceable: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(4, 2)
        self.traceable = traceable

    def forward(self, x):
        if not self.traceable and x.sum() > 1e9:
            x = x * 0
        a, b = self.fc1(x).chunk(2, dim=1)
        return self.fc2(a * torch.sigmoid(b))


@pytest.mark.parametrize("traceable", [True, False], ids=["fx", "hooks"])
def test_glu_consumer_is_reached_through_a_chunk_not_unreached(traceable):
    torch.manual_seed(0)
    model, optimizer = trained(GLU(traceable), torch.randn(8, 4))
    pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError) as info:
        pruner.prune_model(model.fc1, [1], [model.fc2])
    message = str(info.value)
    assert "not reached" not in message and "does not depend" not in message
    assert "fc1" in message and ("chunk" in message or "split" in message)
    assert_unchanged(before, model, optimizer)


class ReadsTheInput(nn.Module):
    """fc2 reads the model input, not fc1's units (torch.fx cannot trace it)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, width)
        self.fc2 = nn.Linear(4, 2)
        self.fc3 = nn.Linear(width, 2)

    def forward(self, x):
        if x.sum() > 1e9:
            x = x * 0
        return self.fc3(self.fc1(x)) + self.fc2(x * 2)


@pytest.mark.parametrize("width", [4, 8], ids=["same-width", "other-width"])
def test_a_listed_module_that_does_not_read_the_units_is_reported_as_not_reached(width):
    torch.manual_seed(0)
    model, optimizer = trained(ReadsTheInput(width), torch.randn(8, 4))
    pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="'fc2'.*does not depend on the pruned units of 'fc1'"):
        pruner.prune_model(model.fc1, [1], [model.fc2, model.fc3])
    assert_unchanged(before, model, optimizer)


class HiddenReader(nn.Module):
    """fc2 reads half of fc1's units through a slice the forward-hook trace cannot see; after
    pruning only fc1 and fc3 the model still runs, but fc2 would read other units."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(4, 2)
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x):
        if x.sum() > 1e9:
            x = x * 0
        h = torch.relu(self.fc1(x))
        return self.fc3(h) + self.fc2(h[:, :4])


def test_an_unlisted_module_reading_the_units_through_hidden_code_is_refused():
    torch.manual_seed(0)
    model, optimizer = trained(HiddenReader(), torch.randn(8, 4))
    pruner = Pruner(model, input_size=(4,), optimizer=optimizer)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="'fc2'.*reads the pruned units of 'fc1'.*not in cascading_modules"):
        pruner.prune_model(model.fc1, [1], [model.fc3])
    assert_unchanged(before, model, optimizer)
    # units that fc2 does not read are fine
    pruner.prune_model(model.fc1, [5, 6], [model.fc3])
    assert model.fc1.out_features == 6 and model.fc3.in_features == 6
