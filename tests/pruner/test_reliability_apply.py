"""Applying a plan is a transaction, survives a live graph and keeps each tensor's memory format.

- **All or nothing**: an exception at any point of ``Plan.apply`` (KeyboardInterrupt, MemoryError:
  any BaseException) undoes every edit already made, model and optimizer bit for bit, Parameter
  objects included, and re-raises; the same plan then applies cleanly. Faults are injected at every
  edit of a real plan (tensor slices of data and gradient, buffers, attribute changes, optimizer
  state slices) and, by a line tracer, at every line the apply executes.
- **A live graph from before the prune** (a kept validation output, ``retain_graph=True``) does
  not break the next ordinary training step; the old graph fails loudly if it is used.
- **Memory format**: ``channels_last`` weights, gradients and optimizer state stay
  ``channels_last``, with the values of the ordinary prune.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchpruner.pruner.optimizer as optimizer_module
import torchpruner.pruner.plan as plan_module
from torchpruner.pruner import Plan, Pruner
from torchpruner.rules import AttributeChange, TensorSlice, apply_slice

from oracles import Snapshot, assert_same_structure, assert_unchanged, snapshot

OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "adam": lambda model: torch.optim.Adam(model.parameters(), lr=1e-2),
    "sgd-momentum": lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
}


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(5, 3),
    )


def batch(seed: int = 1, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    x, y = batch(seed)
    optimizer.zero_grad()
    with torch.random.fork_rng():  # the same Dropout masks for a model and its twin
        torch.manual_seed(seed)
        F.cross_entropy(model(x), y).backward()
    optimizer.step()


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    plan: Plan
    kind: str


def copy_of(model: nn.Module, optimizer: torch.optim.Optimizer, kind: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Deep copies of model (gradients included) and optimizer (its state included)."""
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    twin_optimizer = OPTIMIZERS[kind](twin)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return twin, twin_optimizer


def trained(kind: str) -> Setup:
    """One optimizer step done (state exists), then a backward (gradients exist, step not taken),
    and a plan that prunes two coupled groups: conv+BN, conv (in and out)+BN, Dropout, Linear."""
    model = make_model()
    optimizer = OPTIMIZERS[kind](model)
    step(model, optimizer, seed=1)
    x, y = batch(2)
    F.cross_entropy(model(x), y).backward()
    pruner = Pruner(model, input_size=(3, 8, 8), optimizer=optimizer)
    first, second = pruner.groups()
    plan = pruner.plan_groups({first: [1, 4], second: [0, 2]})
    return Setup(model, optimizer, plan, kind)


_SETUPS: dict[str, Setup] = {}


def setup_for(kind: str) -> Setup:
    """A fresh copy of the trained model and optimizer, with the plan (built once per optimizer)."""
    if kind not in _SETUPS:
        _SETUPS[kind] = trained(kind)
    base = _SETUPS[kind]
    model, optimizer = copy_of(base.model, base.optimizer, kind)
    return Setup(model, optimizer, base.plan, kind)


# --------------------------------------------------------------------------------------------
# Fault injection at every edit of the plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """Where a fault strikes: the ``index``-th edit of the plan (``part``: which tensor of it),
    or the ``index``-th optimizer state slice."""

    index: int
    part: str  # "data", "grad", "buffer", "attribute", "optimizer"
    label: str


def positions(kind: str) -> list[Position]:
    base = setup_for(kind)
    found = []
    for i, edit in enumerate(base.plan.edits):
        if isinstance(edit, TensorSlice) and edit.is_parameter:
            found.append(Position(i, "data", edit.qualified_name))
            if base.model.get_submodule(edit.module_name).get_parameter(edit.tensor_name).grad is not None:
                found.append(Position(i, "grad", edit.qualified_name))
        elif isinstance(edit, TensorSlice):
            found.append(Position(i, "buffer", edit.qualified_name))
        else:
            assert isinstance(edit, AttributeChange)
            found.append(Position(i, "attribute", f"{edit.module_name}.{edit.attribute}"))
    for i, state_slice in enumerate(base.plan.optimizer_slices):
        found.append(Position(i, "optimizer", f"{state_slice.parameter_name}[{state_slice.key}]"))
    return found


FAULTS = [(kind, position) for kind in OPTIMIZERS for position in positions(kind)]


def _same_storage(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@contextlib.contextmanager
def fault_at(setup: Setup, position: Position, exception: type[BaseException]) -> Iterator[list[str]]:
    """Raise ``exception`` when the apply reaches ``position`` (before that change is made).

    Tensor slices are caught where they are computed (``apply_slice``, in the plan and in the
    optimizer surgery), attribute changes where they are set. Yields a list that records the hit:
    a fault that never fires fails the test.
    """
    fired: list[str] = []
    modules = dict(setup.model.named_modules())
    if position.part == "optimizer":
        state_slice = setup.plan.optimizer_slices[position.index]
        parameter = setup.model.get_parameter(state_slice.parameter_name)
        # the n-th slice of that state tensor (a tensor sliced on two axes has two)
        occurrence = [
            s
            for s in setup.plan.optimizer_slices[: position.index + 1]
            if (s.parameter_name, s.key) == (state_slice.parameter_name, state_slice.key)
        ]
    else:
        edit = setup.plan.edits[position.index]
        module = modules[edit.module_name]
    seen = {"count": 0}

    def hit(what: str) -> None:
        fired.append(what)
        raise exception(f"injected fault at {position.part} {position.label}")

    def sliced(tensor, axis, keep, group_keep=None):
        if not fired:
            if position.part == "optimizer":
                state = setup.optimizer.state.get(parameter, {})
                if _same_storage(state.get(state_slice.key), tensor):
                    seen["count"] += 1
                    if seen["count"] == len(occurrence):
                        hit(position.label)
            elif position.part in ("data", "grad", "buffer") and keep is edit.keep and axis == edit.axis:
                current = getattr(module, edit.tensor_name)
                target = current.grad if position.part == "grad" else current
                if _same_storage(target, tensor):
                    hit(position.label)
        return apply_slice(tensor, axis, keep, group_keep)

    original_setattr = nn.Module.__setattr__

    def setattr_(self, name, value):
        if not fired and position.part == "attribute" and self is module and name == edit.attribute:
            hit(position.label)
        original_setattr(self, name, value)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plan_module, "apply_slice", sliced)
        patch.setattr(optimizer_module, "apply_slice", sliced)
        patch.setattr(nn.Module, "__setattr__", setattr_)
        yield fired


def assert_same_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, reference: nn.Module, reference_optimizer: torch.optim.Optimizer
) -> None:
    """Two models (and optimizers) hold the same tensors, gradients, attributes and state, bit for bit."""
    got, want = snapshot(model, optimizer), snapshot(reference, reference_optimizer)
    assert got.repr == want.repr
    assert got.tensors.keys() == want.tensors.keys()
    for name, tensor in want.tensors.items():
        assert got.tensors[name].shape == tensor.shape and torch.equal(got.tensors[name], tensor), name
    for name, grad in want.grads.items():
        assert (got.grads[name] is None) == (grad is None), f"{name}.grad"
        if grad is not None:
            assert torch.equal(got.grads[name], grad), f"{name}.grad"
    assert got.attributes == want.attributes
    assert_same_structure(got.optimizer, want.optimizer)


def assert_retry_equals_clean_prune(
    setup: Setup, before: Snapshot, clean: tuple[nn.Module, torch.optim.Optimizer]
) -> None:
    """The same plan applies to the rolled-back model, which then equals a clean prune and trains on."""
    setup.plan.apply(setup.model, setup.optimizer)
    clean_model, clean_optimizer = clean
    setup.plan.apply(clean_model, clean_optimizer)
    for name, param in setup.model.named_parameters():
        assert param is before.parameters[name], f"{name} is a new Parameter object"
    assert set(map(id, setup.optimizer.state)) == set(map(id, setup.model.parameters()))
    assert_same_state(setup.model, setup.optimizer, clean_model, clean_optimizer)
    step(setup.model, setup.optimizer, seed=3)  # the next training step works ...
    step(clean_model, clean_optimizer, seed=3)
    assert_same_state(setup.model, setup.optimizer, clean_model, clean_optimizer)  # ... and is the same


@pytest.mark.parametrize("exception", [KeyboardInterrupt, MemoryError])
@pytest.mark.parametrize(
    ("kind", "position"), FAULTS, ids=[f"{kind}-{p.part}-{p.index}-{p.label}" for kind, p in FAULTS]
)
def test_a_fault_at_any_edit_undoes_every_edit_already_made(kind, position, exception):
    setup = setup_for(kind)
    clean = copy_of(setup.model, setup.optimizer, kind)
    before = snapshot(setup.model, setup.optimizer)
    with pytest.raises(exception, match="injected fault"), fault_at(setup, position, exception) as fired:
        setup.plan.apply(setup.model, setup.optimizer)
    assert fired == [position.label], "the fault was never reached: the plan did not apply this edit"
    assert_unchanged(before, setup.model, setup.optimizer)
    assert_retry_equals_clean_prune(setup, before, clean)


def test_every_edit_position_is_covered():
    """The plan under test has every kind of edit the fault test is meant to cover."""
    for kind in OPTIMIZERS:
        parts = {p.part for p in positions(kind)}
        assert parts == {"data", "grad", "buffer", "attribute", "optimizer"}, kind
        labels = {p.label for p in positions(kind)}
        assert {"8.p", "9.in_features", "3.in_channels", "1.num_features"} <= labels


class _LineFault:
    """A tracer that raises KeyboardInterrupt at the ``at``-th line executed in the apply's own files
    (as Ctrl-C would between two lines), or only counts lines (``at=None``)."""

    FILES = tuple(
        os.path.abspath(m.__file__) for m in (plan_module, optimizer_module, sys.modules[TensorSlice.__module__])
    )

    # checks that run before anything changes (a fault there trivially changes nothing)
    CHECKS = frozenset({"_bind", "plan_optimizer_surgery", "check_optimizer", "check_graphs_released", "resolve_model"})

    def __init__(self, at: int | None) -> None:
        self.at, self.count, self.fired = at, 0, False

    def __call__(self, frame, event, arg):
        if event == "call":
            code = frame.f_code
            return self if code.co_filename in self.FILES and code.co_name not in self.CHECKS else None
        if event == "line":
            if self.count == self.at:
                self.fired = True
                raise KeyboardInterrupt(f"injected at line {frame.f_lineno}")
            self.count += 1
        return self

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = sys.gettrace()
        sys.settrace(self)
        try:
            yield
        finally:
            sys.settrace(previous)


@pytest.mark.skipif(sys.gettrace() is not None, reason="a tracer (coverage, debugger) is already installed")
def test_an_interrupt_at_any_line_of_apply_leaves_the_model_unchanged_or_fully_pruned():
    """Ctrl-C can arrive between any two lines: the model is then as before (and the plan applies
    again) or completely pruned (the interrupt came after the last change); never half-pruned."""
    plan_module.data_assignment_renews_gradient_accumulator()  # probed once per process: not in the count
    kind = "sgd-momentum"
    setup = setup_for(kind)
    clean_model, clean_optimizer = copy_of(setup.model, setup.optimizer, kind)
    counter = _LineFault(None)
    with counter.installed():
        setup.plan.apply(clean_model, clean_optimizer)
    assert counter.count > 300
    outcomes = {"unchanged": 0, "pruned": 0}
    for at in range(counter.count):
        setup = setup_for(kind)
        before = snapshot(setup.model, setup.optimizer)
        fault = _LineFault(at)
        with pytest.raises(KeyboardInterrupt), fault.installed():
            setup.plan.apply(setup.model, setup.optimizer)
        assert fault.fired
        if repr(setup.model) == before.repr:  # not one attribute changed: then nothing may have
            assert_unchanged(before, setup.model, setup.optimizer)
            outcomes["unchanged"] += 1
            if at % 20 == 0:
                assert_retry_equals_clean_prune(
                    setup, before, copy_of(_SETUPS[kind].model, _SETUPS[kind].optimizer, kind)
                )
        else:  # something changed: then everything
            assert_same_state(setup.model, setup.optimizer, clean_model, clean_optimizer)
            outcomes["pruned"] += 1
    assert outcomes["unchanged"] > counter.count * 0.9, outcomes


# --------------------------------------------------------------------------------------------
# A graph from before the prune that is still alive
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("graph", ["kept-output", "retain-graph"])
def test_a_live_graph_from_before_the_prune_does_not_break_the_next_step(graph):
    """A validation forward kept in a variable (without no_grad), or a backward with
    retain_graph=True, holds the parameters' saved tensors and gradient accumulators: the next
    ordinary training step still works and equals the step of a model pruned without that graph;
    the old graph fails loudly if it is used."""
    setup = setup_for("adam")
    reference, reference_optimizer = copy_of(setup.model, setup.optimizer, "adam")
    x, y = batch(5)

    def forward(model: nn.Module) -> torch.Tensor:
        with torch.random.fork_rng():
            torch.manual_seed(5)
            loss = F.cross_entropy(model(x), y)
        if graph == "retain-graph":
            loss.backward(retain_graph=True)
        return loss

    old = forward(setup.model)
    forward(reference)  # the same forward (BatchNorm statistics, gradients), its graph dropped at once
    setup.plan.apply(setup.model, setup.optimizer)
    setup.plan.apply(reference, reference_optimizer)
    step(setup.model, setup.optimizer, seed=6)
    step(reference, reference_optimizer, seed=6)
    assert_same_state(setup.model, setup.optimizer, reference, reference_optimizer)
    with pytest.raises(RuntimeError):
        old.backward()


def test_this_torch_lets_the_apply_renew_gradient_accumulators():
    """The live-graph test above exercises the renewal, not the refusal below."""
    assert plan_module.data_assignment_renews_gradient_accumulator()


def test_without_renewal_a_live_graph_is_refused_before_anything_changes(monkeypatch):
    """Where the torch in use cannot renew gradient accumulators, a prune under a live graph is
    refused up front, with the fix in the message; once the graph is dropped it goes ahead."""
    monkeypatch.setattr(plan_module, "data_assignment_renews_gradient_accumulator", lambda: False)
    setup = setup_for("adam")
    x, _ = batch(5)
    kept_output = setup.model(x)  # a validation forward without no_grad, kept in a variable
    before = snapshot(setup.model, setup.optimizer)
    with pytest.raises(ValueError, match=r"still held by a graph.*del loss.*torch\.no_grad"):
        setup.plan.apply(setup.model, setup.optimizer)
    assert_unchanged(before, setup.model, setup.optimizer)
    del kept_output
    setup.plan.apply(setup.model, setup.optimizer)
    step(setup.model, setup.optimizer, seed=6)


# --------------------------------------------------------------------------------------------
# Memory format
# --------------------------------------------------------------------------------------------


def _to_contiguous(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.contiguous()
            if p.grad is not None:
                p.grad = p.grad.contiguous()
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                state[key] = value.contiguous()


def test_channels_last_weights_gradients_and_optimizer_state_stay_channels_last():
    model = make_model().to(memory_format=torch.channels_last)
    optimizer = OPTIMIZERS["adam"](model)
    step(model, optimizer, seed=1)
    x, y = batch(2)
    F.cross_entropy(model(x.to(memory_format=torch.channels_last)), y).backward()
    reference, reference_optimizer = copy_of(model, optimizer, "adam")
    _to_contiguous(reference, reference_optimizer)  # the ordinary prune, same values

    def four_d(m: nn.Module, o: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        found = {}
        for name, p in m.named_parameters():
            if p.dim() == 4:
                found[name] = p
                found[f"{name}.grad"] = p.grad
                found.update({f"{name}[{k}]": v for k, v in o.state[p].items() if v.dim() == 4})
        return found

    tensors = four_d(model, optimizer)
    assert len(tensors) == 8  # two conv weights: data, grad, exp_avg, exp_avg_sq
    for name, tensor in tensors.items():
        assert tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous(), name

    pruner = Pruner(model, input_size=(3, 8, 8), optimizer=optimizer)
    first, second = pruner.groups()
    plan = pruner.plan_groups({first: [1, 4], second: [0, 2]})
    plan.apply(model, optimizer)
    plan.apply(reference, reference_optimizer)

    expected = four_d(reference, reference_optimizer)
    for name, tensor in four_d(model, optimizer).items():
        assert tensor.is_contiguous(memory_format=torch.channels_last), f"{name} lost channels_last"
        assert tensor.shape == expected[name].shape and torch.equal(tensor, expected[name]), name
    assert_same_state(model, optimizer, reference, reference_optimizer)
    step(model, optimizer, seed=3)  # training goes on in channels_last
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model[0].weight.grad.is_contiguous(memory_format=torch.channels_last)


def _dim_order(tensor: torch.Tensor) -> list[int]:
    return sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))


LAYOUTS = {
    "contiguous": lambda: torch.randn(6, 4, 5, 3),
    "channels_last": lambda: torch.randn(6, 4, 5, 3).to(memory_format=torch.channels_last),
    "channels_last_3d": lambda: torch.randn(6, 4, 5, 3, 2).to(memory_format=torch.channels_last_3d),
    "transposed": lambda: torch.randn(5, 6).t(),
    "permuted": lambda: torch.randn(3, 4, 6).permute(2, 0, 1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_apply_slice_keeps_the_layout_of_its_tensor(layout):
    torch.manual_seed(0)
    tensor = LAYOUTS[layout]()
    for axis in range(tensor.dim()):
        keep = torch.tensor([0, 2]) if tensor.shape[axis] > 2 else torch.tensor([1])
        result = apply_slice(tensor, axis, keep)
        assert torch.equal(result, tensor.contiguous().index_select(axis, keep)), (layout, axis)
        assert _dim_order(result) == _dim_order(tensor), (layout, axis)
        assert result.permute(_dim_order(tensor)).is_contiguous(), (layout, axis)  # dense, no gaps
        if axis != 0 and tensor.shape[0] % 2 == 0:  # grouped: per block of dim 0
            group_keep = (keep, keep.flip(0))
            result = apply_slice(tensor, axis, keep, group_keep)
            blocks = tensor.contiguous().chunk(2, dim=0)
            expected = torch.cat([b.index_select(axis, k) for b, k in zip(blocks, group_keep)])
            assert torch.equal(result, expected), (layout, axis, "grouped")
            assert _dim_order(result) == _dim_order(tensor), (layout, axis, "grouped")


def test_removed_parameters_counts_a_tensor_sliced_on_two_axes_once():
    """A conv losing output channels (one group) and input channels (another) in one plan."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    pruner = Pruner(net, input_size=(3, 12, 12))
    groups = pruner.groups()
    before = sum(p.numel() for p in net.parameters())
    plan = pruner.plan_groups({groups[0]: [0, 1], groups[1]: [2, 3, 4]})
    plan.apply(net)
    assert plan.removed_parameters == before - sum(p.numel() for p in net.parameters())


def test_a_plan_refuses_a_model_whose_sliced_parameter_became_a_buffer():
    """The plan slices ``0.weight`` as a Parameter; a model holding a same-shaped buffer there instead
    is refused with a ValueError naming it, and nothing changes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    plan = Pruner(net, input_size=(4,)).plan(net[0], [1, 2])
    other = copy.deepcopy(net)
    weight = other[0].weight.detach().clone()
    del other[0].weight
    other[0].register_buffer("weight", weight)
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"'0\.weight' is not a parameter"):
        plan.apply(other)
    assert_unchanged(before, other)
