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
from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from torchpruner._state import unwrap_model
from torchpruner.rules import KEPT_UNITS_ATTRIBUTE, Edit, TensorSlice, apply_slice

from .optimizer import OptimizerStateSlice, apply_optimizer_surgery, plan_optimizer_surgery

logger = logging.getLogger(__name__)

__all__ = ["Plan", "resolve_model"]


def resolve_model(model: nn.Module) -> nn.Module:
    """Strip wrappers that share parameters: ``torch.compile`` and ``AveragedModel`` (``.module``)."""
    model = unwrap_model(model)
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
