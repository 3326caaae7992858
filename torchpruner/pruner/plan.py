"""Pruning plans: every tensor slice, attribute change and optimizer-state slice, before any change.

A :class:`Plan` is built by :meth:`torchpruner.pruner.Pruner.plan`; ``str(plan)`` is a dry run.
``plan.apply(model, optimizer)`` validates every edit against the model it is given (shapes and
attribute values must be what the plan expects) and only then modifies it, so a refused plan leaves
model and optimizer exactly as they were. Edits name modules by qualified name, so a plan built on
one model also applies to another model of the same architecture (an EMA copy, or
``torch.optim.swa_utils.AveragedModel``, whose ``.module`` prefix is handled).

Applying is a transaction. Every change is journaled before it is made, with the old tensor (not a
copy) that undoes it; on any exception (``KeyboardInterrupt`` and ``MemoryError`` included) the
journal is undone in reverse order, which only puts old objects back and allocates nothing, and the
exception propagates. Either every edit lands, model and optimizer, or none does.

Parameters keep their identity and their tensor: new data is assigned with ``.data``, so hooks,
optimizer keys and param-group membership stay. A graph from a forward pass before the prune (a
kept validation output, the last ``loss``, ``retain_graph=True``) holds the parameter's gradient
accumulator, which remembers the old shape; the apply makes sure the next forward builds a new one,
so the next training step works, and marks the pruned tensors as modified, so that using the old
graph fails in ``backward()`` instead of mixing old and new shapes.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from torchpruner._state import collector_paused, unwrap_model
from torchpruner.rules import RECORD_ATTRIBUTES, AttributeChange, Edit, TensorSlice, apply_slice

from .optimizer import OptimizerStateSlice, apply_optimizer_surgery, plan_optimizer_surgery

logger = logging.getLogger(__name__)

__all__ = ["Plan", "resolve_model", "merge_edits"]

Undo = Callable[[], None]


def resolve_model(model: nn.Module) -> nn.Module:
    """Strip wrappers that share parameters: ``torch.compile`` and ``AveragedModel`` (``.module``)."""
    model = unwrap_model(model)
    while isinstance(model, AveragedModel):
        model = unwrap_model(model.module)
    return model


# -- one edit per tensor axis ----------------------------------------------------------------------


def merge_edits(edits: list[Edit], merge: bool = True) -> list[Edit]:
    """The edits with each tensor sliced at most once per axis and each attribute set once.

    Several slices of one tensor are fine on *different* axes (a weight loses rows for one group
    and columns for another, ``in_proj_weight`` its q/k/v rows and its input columns): each keeps
    positions of its own axis, which slicing another axis does not move. Two slices along the
    *same* axis cannot both be applied (the second one's positions refer to the tensor before the
    first), so two that keep the same positions (one tensor reached twice, e.g. through a layer and
    through one of its buffers) are merged into one, and two that differ are refused, naming the
    tensor. Attribute changes alike: the same new value is merged, a different one refused.
    ``merge=False`` refuses identical duplicates too (a plan to apply must hold none).

    Raises:
        ValueError: two edits that cannot both hold.
    """
    slices: dict[tuple[str, str, int], TensorSlice] = {}
    attributes: dict[tuple[str, str], AttributeChange] = {}
    result: list[Edit] = []
    for edit in edits:
        if isinstance(edit, TensorSlice):
            key = (edit.module_name, edit.tensor_name, edit.axis)
            first = slices.get(key)
            if first is None:
                slices[key] = edit
                result.append(edit)
                continue
            same = (
                merge
                and tuple(first.old_shape) == tuple(edit.old_shape)
                and torch.equal(first.keep, edit.keep)
                and _same_group_keep(first.group_keep, edit.group_keep)
            )
            if not same:
                raise ValueError(
                    f"the plan slices '{edit.qualified_name}' twice along axis {edit.axis} "
                    f"(keeping {len(first.keep)} and {len(edit.keep)} of {edit.old_shape[edit.axis]}); "
                    f"one prune may slice a tensor once per axis"
                )
            continue
        if isinstance(edit, AttributeChange) and edit.attribute not in RECORD_ATTRIBUTES:
            key2 = (edit.module_name, edit.attribute)
            first_change = attributes.get(key2)
            if first_change is None:
                attributes[key2] = edit
                result.append(edit)
                continue
            if not (merge and _same_value(first_change.new, edit.new)):
                raise ValueError(
                    f"the plan sets '{edit.module_name}.{edit.attribute}' twice "
                    f"({first_change.new!r} and {edit.new!r}); one prune may set an attribute once"
                )
            continue
        result.append(edit)
    return result


def _same_group_keep(a: tuple[torch.Tensor, ...] | None, b: tuple[torch.Tensor, ...] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _same_value(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - values that do not compare (tensors): not the same
        return a is b


# -- a parameter's gradient accumulator ---------------------------------------------------------


def _other_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype == torch.float32 else torch.float32


@functools.cache
def data_assignment_renews_gradient_accumulator() -> bool:
    """Whether :func:`_assign_data` makes the next forward build a new gradient accumulator.

    torch drops the accumulator a tensor caches when ``.data`` of another dtype is assigned (the
    accumulator's metadata would no longer fit); assigning the real data afterwards keeps it
    dropped. Checked once, on a probe whose accumulator a small graph keeps alive, so that a torch
    that behaves differently is noticed before any model is modified.
    """
    try:
        with torch.inference_mode(False), torch.enable_grad():
            probe = torch.zeros(2, requires_grad=True)
            held = probe * 1  # keeps the accumulator for shape [2] alive
            with torch.no_grad():
                _renew_and_assign(probe, torch.zeros(3))
            (probe * 2).sum().backward()  # type: ignore[no-untyped-call]
            del held
            return probe.grad is not None and tuple(probe.grad.shape) == (3,)
    except RuntimeError:
        return False


def _renew_and_assign(tensor: torch.Tensor, data: torch.Tensor) -> None:
    tensor.data = torch.empty(0, dtype=_other_dtype(tensor.dtype), device=tensor.device)
    tensor.data = data


def _assign_data(tensor: torch.Tensor, data: torch.Tensor) -> None:
    """``tensor.data = data``; for a parameter, the next forward gets a new gradient accumulator
    (the one a graph from before the prune holds remembers the old shape)."""
    if tensor.requires_grad and data_assignment_renews_gradient_accumulator():
        _renew_and_assign(tensor, data)
    else:
        tensor.data = data


def parameter_slices(bound: list[tuple[Edit, nn.Module]]) -> list[tuple[TensorSlice, nn.Parameter]]:
    """The parameter slices among ``(edit, module)`` pairs, each with the Parameter it slices."""
    slices = []
    for edit, module in bound:
        if isinstance(edit, TensorSlice) and edit.is_parameter:
            parameter = module._parameters.get(edit.tensor_name)
            if parameter is None:
                raise ValueError(
                    f"'{edit.qualified_name}' is not a parameter of {type(module).__name__}; the plan "
                    "slices it as one (plan again on the model as it is)"
                )
            slices.append((edit, parameter))
    return slices


def check_graphs_released(parameters: list[tuple[str, nn.Parameter]]) -> None:
    """Refuse (before any change) to slice parameters that a graph from before the prune still
    holds, where the torch in use gives no way to renew their gradient accumulators."""
    if data_assignment_renews_gradient_accumulator():
        return
    for name, parameter in parameters:
        use_count = getattr(parameter, "_use_count", None)
        if parameter.requires_grad and use_count is not None and use_count() > 1:
            raise ValueError(
                f"'{name}' is still held by a graph from a forward pass before the prune (a kept "
                f"output or loss, or backward(retain_graph=True)); its next backward() would fail. "
                f"Drop the references to that graph first (e.g. `del loss, outputs`), or run "
                f"validation forwards under torch.no_grad()"
            )


# -- the journal ------------------------------------------------------------------------------


def _restore_tensor(tensor: torch.Tensor, data: torch.Tensor, grad: torch.Tensor | None, is_parameter: bool) -> None:
    tensor.data = data
    if is_parameter:
        tensor.grad = grad


def _restore_attribute(module: nn.Module, attribute: str, old: Any, existed: bool) -> None:
    if existed:
        setattr(module, attribute, old)
    else:
        module.__dict__.pop(attribute, None)


class _Journal:
    """The changes made so far, each with the call that undoes it (old objects kept, not copied)."""

    def __init__(self) -> None:
        self.undo: list[Undo] = []
        self.tensors: dict[int, torch.Tensor] = {}

    def slice_tensor(self, module: nn.Module, edit: TensorSlice) -> None:
        tensor = getattr(module, edit.tensor_name)
        old_data, old_grad = tensor.data, tensor.grad if edit.is_parameter else None
        data = apply_slice(old_data, edit.axis, edit.keep, edit.group_keep)  # allocations first ...
        grad = None if old_grad is None else apply_slice(old_grad.detach(), edit.axis, edit.keep, edit.group_keep)
        self.undo.append(functools.partial(_restore_tensor, tensor, old_data, old_grad, edit.is_parameter))
        self.tensors[id(tensor)] = tensor
        _assign_data(tensor, data)  # ... then the changes, each one undone by the entry above
        if edit.is_parameter:
            tensor.grad = grad

    def set_attribute(self, module: nn.Module, attribute: str, value: Any) -> None:
        # attributes live in the instance dict (or behind a property); one that only came from the
        # class (or did not exist) is removed again on undo
        existed = attribute in vars(module) or hasattr(getattr(type(module), attribute, None), "__set__")
        self.undo.append(
            functools.partial(_restore_attribute, module, attribute, getattr(module, attribute, None), existed)
        )
        setattr(module, attribute, value)

    def commit(self) -> None:
        """Mark every sliced tensor as modified: a graph from before the prune that saved one of
        them refuses to run backward() (autograd's in-place check) instead of mixing shapes."""
        for tensor in self.tensors.values():
            if not tensor.is_inference():
                torch.autograd.graph.increment_version(tensor)  # one at a time: torch < 2.5 takes one tensor

    def roll_back(self) -> None:
        """Undo every change, newest first. Each undo only puts old objects back."""
        for undo in reversed(self.undo):
            for attempt in range(3):
                try:
                    undo()
                    break
                except BaseException:  # e.g. a second Ctrl-C: undo this change again, then the rest
                    if attempt == 2:
                        logger.exception("could not undo one change of the plan; the model may be inconsistent")
        self.undo.clear()


@dataclass(eq=False)
class Plan:
    """Everything one prune will change, in application order.

    Attributes:
        description: one line: what is pruned (module, units).
        edits: tensor slices and attribute changes (module names resolved).
        optimizer_slices: optimizer-state slices planned for the pruner's optimizer.
    """

    description: str
    edits: list[Edit] = field(default_factory=list)
    optimizer_slices: list[OptimizerStateSlice] = field(default_factory=list)
    _optimizer: Any = None

    @property
    def is_empty(self) -> bool:
        return not self.edits

    @property
    def removed_parameters(self) -> int:
        """Number of parameter elements removed (a tensor sliced on two axes counted once)."""
        # the slices of one tensor are each planned against its shape before the plan, on their
        # own axes: the tensor ends with every sliced axis at its new size
        original: dict[tuple[int, str], tuple[int, ...]] = {}
        final: dict[tuple[int, str], list[int]] = {}
        for edit in self.edits:
            if isinstance(edit, TensorSlice) and edit.is_parameter:
                key = (id(edit.module), edit.tensor_name)
                original.setdefault(key, tuple(edit.old_shape))
                shape = final.setdefault(key, list(edit.old_shape))
                axis = edit.axis % len(shape)
                shape[axis] = min(shape[axis], edit.new_shape[axis])
        return sum(math.prod(original[key]) - math.prod(final[key]) for key in original)

    @property
    def touched_modules(self) -> list[str]:
        names: list[str] = []
        for edit in self.edits:
            if edit.module_name not in names:
                names.append(edit.module_name)
        return names

    def __str__(self) -> str:
        lines = [f"Plan: {self.description}"]
        lines += ["  " + edit.describe() for edit in self.edits]
        lines += ["  " + s.describe() for s in self.optimizer_slices]
        lines.append(
            f"  total: -{self.removed_parameters} parameters in {len(self.touched_modules)} module(s), "
            f"{len(self.optimizer_slices)} optimizer state tensor(s)"
        )
        return "\n".join(lines)

    __repr__ = __str__

    # -- application ------------------------------------------------------------------------

    def _bind(self, model: nn.Module) -> list[tuple[Edit, nn.Module]]:
        """Find each edit's module in ``model`` and check it is in the expected state (no change)."""
        modules = dict(model.named_modules(remove_duplicate=False))
        merge_edits(self.edits, merge=False)  # each tensor axis and attribute changed once
        bound = []
        for edit in self.edits:
            module = modules.get(edit.module_name)
            if module is None:
                raise ValueError(
                    f"cannot apply the plan: {type(model).__name__} has no module named '{edit.module_name}'"
                )
            if isinstance(edit, TensorSlice):
                tensor = getattr(module, edit.tensor_name, None)
                if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(edit.old_shape):
                    found = None if not isinstance(tensor, torch.Tensor) else list(tensor.shape)
                    raise ValueError(
                        f"cannot apply the plan: '{edit.qualified_name}' has shape {found}, "
                        f"the plan expects {list(edit.old_shape)}"
                    )
                if edit.is_parameter and tensor.grad is not None and tensor.grad.shape != tensor.shape:
                    raise ValueError(f"'{edit.qualified_name}' has a gradient of shape {list(tensor.grad.shape)}")
            else:
                if edit.attribute not in RECORD_ATTRIBUTES and getattr(module, edit.attribute, None) != edit.old:
                    raise ValueError(
                        f"cannot apply the plan: '{edit.module_name}.{edit.attribute}' is "
                        f"{getattr(module, edit.attribute, None)!r}, the plan expects {edit.old!r}"
                    )
            bound.append((edit, module))
        return bound

    @collector_paused()
    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Apply the plan to ``model`` (the planned model or a copy with the same architecture).

        Args:
            model: the model; ``torch.compile`` and ``AveragedModel`` wrappers are unwrapped.
                ``nn.DataParallel`` / DDP are refused (TypeError).
            optimizer: optimizer whose state follows the sliced parameters (allowlisted types only,
                see :func:`torchpruner.pruner.register_per_element_optimizer`), or None.

        Raises:
            ValueError / TypeError: before anything changes, when the model does not match the plan
                or the optimizer cannot be sliced.
            Any exception raised while the plan is applied (``KeyboardInterrupt``, ``MemoryError``,
            ...) propagates after every change already made has been undone: model, gradients,
            attributes and optimizer state are then as they were, and the plan can be applied again.
        """
        model = resolve_model(model)
        bound = self._bind(model)
        sliced_parameters = parameter_slices(bound)
        optimizer_plan = plan_optimizer_surgery(optimizer, sliced_parameters, model) if optimizer is not None else []
        check_graphs_released([(edit.qualified_name, parameter) for edit, parameter in sliced_parameters])
        # everything is validated: act, journaling each change. No context manager here: an
        # interrupt at its exit could leave its state behind (e.g. gradients switched off);
        # every slice is taken from detached tensors instead of under no_grad
        journal = _Journal()
        try:
            for edit, module in bound:
                if isinstance(edit, TensorSlice):
                    journal.slice_tensor(module, edit)
                else:
                    journal.set_attribute(module, edit.attribute, edit.new)
            apply_optimizer_surgery(optimizer_plan, journal.undo)
            journal.commit()
        except BaseException:
            journal.roll_back()
            raise
        logger.info("applied %s", self.description)
