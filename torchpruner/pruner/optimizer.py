"""Optimizer surgery: slice the optimizer state of pruned parameters in place.

``torch.optim`` keeps ``optimizer.state[param] = {name: value}``. For the allowlisted optimizers
every state tensor shaped like the parameter is *per element* (momentum, Adam's moments, Rprop's
step sizes, ASGD's average...), so it is sliced along the same axis as the parameter; scalar state
(``step``, ASGD's ``eta``/``mu``, NAdam's ``mu_product``) is kept. Param groups, hyper-parameters
and LR schedulers are untouched (they hold the same ``nn.Parameter`` objects).

Optimizers whose state couples elements are refused by name: LBFGS (flat history vectors over all
parameters), SparseAdam (sparse gradients), Adafactor (factored row/column statistics), Muon
(orthogonalised matrix updates). Unknown optimizers are refused too; register yours with
:func:`register_per_element_optimizer` when every state tensor shaped like its parameter is
per element.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from torchpruner.rules import TensorSlice, apply_slice

logger = logging.getLogger(__name__)

__all__ = [
    "PER_ELEMENT_OPTIMIZERS",
    "REFUSED_OPTIMIZERS",
    "OptimizerStateSlice",
    "apply_optimizer_surgery",
    "check_optimizer",
    "plan_optimizer_surgery",
    "register_per_element_optimizer",
]

PER_ELEMENT_OPTIMIZERS: set[type[torch.optim.Optimizer]] = {
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD", "Rprop")
    if hasattr(torch.optim, name)
}

REFUSED_OPTIMIZERS: dict[str, str] = {
    "LBFGS": "its state holds flat history vectors over all parameters, which cannot be sliced per parameter",
    "SparseAdam": "it works on sparse gradients and is not supported",
    "Adafactor": "its factored row/column statistics couple the elements of a parameter",
    "Muon": "its orthogonalised updates couple the elements of each weight matrix",
}


@dataclass(eq=False)
class OptimizerStateSlice:
    """Slice optimizer state ``state[parameter][key]`` like the parameter it belongs to."""

    parameter_name: str
    key: str
    axis: int
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]

    def describe(self) -> str:
        return (
            f"optim  state[{self.parameter_name}][{self.key!r}]".ljust(48)
            + f" {list(self.old_shape)} -> {list(self.new_shape)} axis {self.axis}"
        )


def register_per_element_optimizer(optimizer_class: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """Declare that ``optimizer_class`` keeps only per-element (or scalar) state per parameter.

    Every state tensor shaped like its parameter is then sliced with it, other tensors of
    dimension 0 are kept, and anything else makes the prune fail before any change. Usable as a
    class decorator.
    """
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(f"expected a torch.optim.Optimizer subclass, got {optimizer_class!r}")
    PER_ELEMENT_OPTIMIZERS.add(optimizer_class)
    return optimizer_class


def check_optimizer(optimizer: Any) -> None:
    """TypeError unless ``optimizer`` is an allowlisted (or registered) per-element optimizer."""
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    klass = type(optimizer)
    if klass in PER_ELEMENT_OPTIMIZERS:
        return
    reason = REFUSED_OPTIMIZERS.get(klass.__name__)
    if reason is not None:
        raise TypeError(
            f"optimizer {klass.__name__} cannot follow a prune: {reason}. Prune without it "
            f"(optimizer=None) and build a new optimizer afterwards"
        )
    raise TypeError(
        f"unknown optimizer type {klass.__module__}.{klass.__name__}: the pruner only slices the state "
        f"of optimizers known to keep per-element state. If every state tensor of "
        f"{klass.__name__} shaped like its parameter is per element, call "
        f"torchpruner.pruner.register_per_element_optimizer({klass.__name__})"
    )


@dataclass(eq=False)
class _StateEdit:
    state: dict[str, Any]
    key: str
    edit: TensorSlice


def plan_optimizer_surgery(
    optimizer: torch.optim.Optimizer | None,
    parameter_slices: Sequence[tuple[TensorSlice, nn.Parameter]],
    model: nn.Module | None = None,
) -> list[_StateEdit]:
    """Check the optimizer and list the state tensors to slice; changes nothing.

    Args:
        optimizer: the optimizer (None: nothing to do).
        parameter_slices: ``(slice, parameter)`` for every parameter the plan slices.
        model: unused; kept for symmetry with the plan's call.

    Raises:
        TypeError: refused or unknown optimizer type.
        ValueError: a state tensor that is neither scalar nor shaped like its parameter.
    """
    if optimizer is None:
        return []
    check_optimizer(optimizer)
    edits: list[_StateEdit] = []
    for edit, parameter in parameter_slices:
        state = optimizer.state.get(parameter)
        if not state:
            continue
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue  # scalar state (step, eta, mu, mu_product) stays
            if tuple(value.shape) == tuple(edit.old_shape):
                edits.append(_StateEdit(state, key, edit))
            else:
                raise ValueError(
                    f"{type(optimizer).__name__} state[{edit.qualified_name!r}][{key!r}] has shape "
                    f"{list(value.shape)}, neither scalar nor the parameter's {list(edit.old_shape)}; "
                    f"cannot slice it"
                )
    return edits


def describe_optimizer_surgery(edits: Sequence[_StateEdit]) -> list[OptimizerStateSlice]:
    return [
        OptimizerStateSlice(
            parameter_name=e.edit.qualified_name,
            key=e.key,
            axis=e.edit.axis,
            old_shape=tuple(e.edit.old_shape),
            new_shape=tuple(e.edit.new_shape),
        )
        for e in edits
    ]


def apply_optimizer_surgery(edits: Sequence[_StateEdit], undo: list[Callable[[], None]] | None = None) -> None:
    """Slice the listed state tensors (call only after :func:`plan_optimizer_surgery` succeeded).

    Each sliced tensor keeps its memory format. With ``undo``, a call that puts the old state
    tensor back (the tensor itself, not a copy) is appended before each change.
    """
    for e in edits:
        old = e.state[e.key]
        new = apply_slice(old.detach(), e.edit.axis, e.edit.keep, e.edit.group_keep)
        if undo is not None:
            undo.append(functools.partial(e.state.__setitem__, e.key, old))
        e.state[e.key] = new
