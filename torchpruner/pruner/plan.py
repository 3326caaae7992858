"""Pruning plans: every tensor slice, attribute change and optimizer-state slice, before any change.

A :class:`Plan` is built by :meth:`torchpruner.pruner.Pruner.plan`; ``str(plan)`` is a dry run.
``plan.apply(model, optimizer)`` validates every edit against the model it is given (shapes and
attribute values must be what the plan expects) and only then modifies it, so a refused plan leaves
model and optimizer exactly as they were. Edits name modules by qualified name, so a plan built on
one model also applies to another model of the same architecture (an EMA copy, or
``torch.optim.swa_utils.AveragedModel``, whose ``.module`` prefix is handled).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

__all__ = ["TensorSlice", "AttributeChange", "OptimizerStateSlice", "Plan", "Edit", "KEPT_UNITS_ATTRIBUTE",
           "apply_slice", "resolve_model"]

#: Module attribute holding ``{"out": [...], "in": [...]}``: original unit ids a layer still holds.
KEPT_UNITS_ATTRIBUTE = "_torchpruner_kept_units"


def apply_slice(tensor: torch.Tensor, axis: int, keep: torch.Tensor,
                group_keep: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Keep ``keep`` along ``axis`` (per block of dim 0 with ``group_keep``); returns a new tensor."""
    if group_keep is None:
        return tensor.index_select(axis, keep.to(tensor.device))
    blocks = tensor.chunk(len(group_keep), dim=0)
    return torch.cat([b.index_select(axis, k.to(tensor.device)) for b, k in zip(blocks, group_keep)], dim=0)


def _sliced_shape(old_shape: Tuple[int, ...], axis: int, keep: torch.Tensor) -> Tuple[int, ...]:
    shape = list(old_shape)
    shape[axis] = len(keep)
    return tuple(shape)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(eq=False)
class TensorSlice:
    """Keep ``keep`` along ``axis`` of parameter/buffer ``tensor_name`` of a module.

    Attributes:
        module: the module while planning (not used to apply: ``module_name`` is).
        tensor_name: attribute name of the parameter or buffer.
        axis: sliced axis.
        keep: kept indices (CPU int64).
        old_shape: shape the tensor must have when the plan is applied.
        is_parameter: parameter (with ``.grad`` and optimizer state) or buffer.
        group_keep: per-block kept indices for grouped layers (see :func:`apply_slice`).
        module_name: qualified name, filled in by the planner.
    """

    module: Optional[nn.Module]
    tensor_name: str
    axis: int
    keep: torch.Tensor
    old_shape: Tuple[int, ...]
    is_parameter: bool
    group_keep: Optional[Tuple[torch.Tensor, ...]] = None
    module_name: str = ""

    @property
    def new_shape(self) -> Tuple[int, ...]:
        return _sliced_shape(self.old_shape, self.axis, self.keep)

    @property
    def removed_elements(self) -> int:
        return _numel(self.old_shape) - _numel(self.new_shape)

    @property
    def qualified_name(self) -> str:
        return f"{self.module_name}.{self.tensor_name}" if self.module_name else self.tensor_name

    def describe(self) -> str:
        kind = "param " if self.is_parameter else "buffer"
        grouped = " (per group)" if self.group_keep is not None else ""
        return (f"{kind} {self.qualified_name:<40} {list(self.old_shape)} -> {list(self.new_shape)} "
                f"axis {self.axis}{grouped}  (-{self.removed_elements} elements)")


@dataclass(eq=False)
class AttributeChange:
    """Set ``module.<attribute>`` from ``old`` to ``new``."""

    module: Optional[nn.Module]
    attribute: str
    old: Any
    new: Any
    module_name: str = ""

    def describe(self) -> str:
        name = f"{self.module_name}.{self.attribute}" if self.module_name else self.attribute
        old, new = self.old, self.new
        if isinstance(old, float) or isinstance(new, float):
            old, new = f"{old:.6g}", f"{new:.6g}"
        if self.attribute == KEPT_UNITS_ATTRIBUTE:
            return f"record {name:<40} kept unit ids updated"
        return f"attr   {name:<40} {old} -> {new}"


@dataclass(eq=False)
class OptimizerStateSlice:
    """Slice optimizer state ``state[parameter][key]`` like the parameter it belongs to."""

    parameter_name: str
    key: str
    axis: int
    old_shape: Tuple[int, ...]
    new_shape: Tuple[int, ...]

    def describe(self) -> str:
        return (f"optim  state[{self.parameter_name}][{self.key!r}]".ljust(48)
                + f" {list(self.old_shape)} -> {list(self.new_shape)} axis {self.axis}")


Edit = Union[TensorSlice, AttributeChange]


def resolve_model(model: nn.Module) -> nn.Module:
    """Strip wrappers that share parameters: ``torch.compile`` and ``AveragedModel`` (``.module``)."""
    from torchpruner.graph import unwrap_model

    model = unwrap_model(model)
    try:
        from torch.optim.swa_utils import AveragedModel
    except ImportError:  # pragma: no cover
        AveragedModel = ()
    while isinstance(model, AveragedModel):
        model = unwrap_model(model.module)
    return model


def _replace_parameter_data(parameter: nn.Parameter, data: torch.Tensor, grad: Optional[torch.Tensor],
                            name: str) -> None:
    """Give ``parameter`` (the same Python object) new data and gradient.

    A graph from a forward pass before the prune (e.g. the previous step's ``loss`` still in
    scope) keeps the parameter's gradient accumulator alive, and that node remembers the old shape:
    after a plain ``parameter.data = ...`` the next ``backward()`` would fail. Swapping in a fresh
    tensor implementation (``torch.utils.swap_tensors``) gives the parameter a new accumulator while
    the object, its attributes, optimizer keys and param-group membership stay. Where swapping is
    impossible (weak references to the parameter, extra views of it, Parameter subclasses) the data
    is assigned and a warning says what to avoid.
    """
    swap = getattr(torch.utils, "swap_tensors", None)
    if swap is not None and type(parameter) is nn.Parameter:
        replacement = nn.Parameter(data, requires_grad=parameter.requires_grad)
        if grad is not None:
            replacement.grad = grad
        replacement.__dict__.update(parameter.__dict__)
        # tensor hooks live on the tensor implementation, which is swapped out: carry them over
        # (the same dicts, so handles taken before the prune still remove them)
        for hooks in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            if getattr(parameter, hooks, None):
                setattr(replacement, hooks, getattr(parameter, hooks))
        try:
            swap(parameter, replacement)
            return
        except RuntimeError as exc:
            logger.warning("could not swap the tensor of '%s' (%s); assigning .data instead: a graph from before "
                           "the prune that is still alive will fail in backward()", name, exc)
    parameter.data = data
    parameter.grad = grad


@dataclass(eq=False)
class Plan:
    """Everything one prune will change, in application order.

    Attributes:
        description: one line: what is pruned (module, units).
        edits: tensor slices and attribute changes (module names resolved).
        optimizer_slices: optimizer-state slices planned for the pruner's optimizer.
        removed_units: ``{module name: original-index tensor}`` of the pruned layer.
    """

    description: str
    edits: List[Edit] = field(default_factory=list)
    optimizer_slices: List[OptimizerStateSlice] = field(default_factory=list)
    _optimizer: Any = None

    @property
    def is_empty(self) -> bool:
        return not self.edits

    @property
    def removed_parameters(self) -> int:
        """Number of parameter elements removed."""
        return sum(e.removed_elements for e in self.edits if isinstance(e, TensorSlice) and e.is_parameter)

    @property
    def touched_modules(self) -> List[str]:
        names: List[str] = []
        for edit in self.edits:
            if edit.module_name not in names:
                names.append(edit.module_name)
        return names

    def __str__(self) -> str:
        lines = [f"Plan: {self.description}"]
        lines += ["  " + edit.describe() for edit in self.edits]
        lines += ["  " + s.describe() for s in self.optimizer_slices]
        lines.append(f"  total: -{self.removed_parameters} parameters in {len(self.touched_modules)} module(s), "
                     f"{len(self.optimizer_slices)} optimizer state tensor(s)")
        return "\n".join(lines)

    __repr__ = __str__

    # -- application ------------------------------------------------------------------------

    def _bind(self, model: nn.Module) -> List[Tuple[Edit, nn.Module]]:
        """Find each edit's module in ``model`` and check it is in the expected state (no change)."""
        modules = dict(model.named_modules(remove_duplicate=False))
        bound = []
        for edit in self.edits:
            module = modules.get(edit.module_name)
            if module is None:
                raise ValueError(f"cannot apply the plan: {type(model).__name__} has no module named "
                                 f"'{edit.module_name}'")
            if isinstance(edit, TensorSlice):
                tensor = getattr(module, edit.tensor_name, None)
                if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(edit.old_shape):
                    found = None if not isinstance(tensor, torch.Tensor) else list(tensor.shape)
                    raise ValueError(f"cannot apply the plan: '{edit.qualified_name}' has shape {found}, "
                                     f"the plan expects {list(edit.old_shape)}")
                if edit.is_parameter and tensor.grad is not None and tensor.grad.shape != tensor.shape:
                    raise ValueError(f"'{edit.qualified_name}' has a gradient of shape {list(tensor.grad.shape)}")
            else:
                if edit.attribute != KEPT_UNITS_ATTRIBUTE and getattr(module, edit.attribute, None) != edit.old:
                    raise ValueError(f"cannot apply the plan: '{edit.module_name}.{edit.attribute}' is "
                                     f"{getattr(module, edit.attribute, None)!r}, the plan expects {edit.old!r}")
            bound.append((edit, module))
        return bound

    def apply(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Apply the plan to ``model`` (the planned model or a copy with the same architecture).

        Args:
            model: the model; ``torch.compile`` and ``AveragedModel`` wrappers are unwrapped.
                ``nn.DataParallel`` / DDP are refused (TypeError).
            optimizer: optimizer whose state follows the sliced parameters (allowlisted types only,
                see :func:`torchpruner.pruner.register_per_element_optimizer`), or None.

        Raises:
            ValueError / TypeError: before anything changes, when the model does not match the plan
                or the optimizer cannot be sliced.
        """
        from .optimizer import apply_optimizer_surgery, plan_optimizer_surgery

        model = resolve_model(model)
        bound = self._bind(model)
        parameter_slices = [(edit, module._parameters[edit.tensor_name]) for edit, module in bound
                            if isinstance(edit, TensorSlice) and edit.is_parameter]
        optimizer_plan = plan_optimizer_surgery(optimizer, parameter_slices, model) if optimizer is not None else []
        # everything is validated: act
        with torch.no_grad():
            for edit, module in bound:
                if isinstance(edit, TensorSlice):
                    tensor = getattr(module, edit.tensor_name)
                    data = apply_slice(tensor.data, edit.axis, edit.keep, edit.group_keep)
                    if edit.is_parameter:
                        grad = tensor.grad
                        if grad is not None:
                            grad = apply_slice(grad, edit.axis, edit.keep, edit.group_keep)
                        _replace_parameter_data(tensor, data, grad, edit.qualified_name)
                    else:
                        tensor.data = data
                else:
                    setattr(module, edit.attribute, edit.new)
        apply_optimizer_surgery(optimizer_plan)
        logger.info("applied %s", self.description)
