"""Edits: what a slicing rule asks for, as data. Nothing here modifies a model.

A rule returns :class:`TensorSlice` and :class:`AttributeChange` edits; the Pruner collects them in
a :class:`~torchpruner.pruner.Plan`, validates the whole plan and only then applies it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "TensorSlice",
    "AttributeChange",
    "Edit",
    "KEPT_UNITS_ATTRIBUTE",
    "RECORD_ATTRIBUTES",
    "SHAPE_ATTRIBUTES_ATTRIBUTE",
    "apply_slice",
    "slice_tensor",
    "set_attribute",
]

#: Module attribute holding ``{"out": [...], "in": [...]}``: original unit ids a layer still holds.
KEPT_UNITS_ATTRIBUTE = "_torchpruner_kept_units"
#: Module attribute holding ``{attribute: size}`` for the sizes a plan changed outside any slicing
#: rule (the ``normalized_shape`` a functional ``F.layer_norm`` reads), so checkpoints replay them.
SHAPE_ATTRIBUTES_ATTRIBUTE = "_torchpruner_shape_attributes"
#: Bookkeeping attributes: a plan merges into them, whatever they held (no "expected old value").
RECORD_ATTRIBUTES = (KEPT_UNITS_ATTRIBUTE, SHAPE_ATTRIBUTES_ATTRIBUTE)


def apply_slice(
    tensor: torch.Tensor, axis: int, keep: torch.Tensor, group_keep: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """Keep ``keep`` along ``axis`` (per block of dim 0 with ``group_keep``); returns a new tensor.

    The result has the layout of ``tensor``: a ``channels_last`` weight (or gradient, or Adam
    moment) stays ``channels_last``, a transposed one stays transposed. The slice is taken on the
    view that makes ``tensor`` contiguous, so no second copy is made.
    """
    order = _dense_dim_order(tensor)
    if order is None:
        return _index(tensor, axis, keep, group_keep, block_dim=0)
    view = tensor.permute(order)  # contiguous: view dim i is tensor dim order[i]
    sliced = _index(view, order.index(axis), keep, group_keep, block_dim=order.index(0))
    return sliced.permute([order.index(d) for d in range(tensor.dim())])


def _index(
    tensor: torch.Tensor, axis: int, keep: torch.Tensor, group_keep: Sequence[torch.Tensor] | None, block_dim: int
) -> torch.Tensor:
    if group_keep is None:
        return tensor.index_select(axis, keep.to(tensor.device))
    blocks = tensor.chunk(len(group_keep), dim=block_dim)
    return torch.cat([b.index_select(axis, k.to(tensor.device)) for b, k in zip(blocks, group_keep)], dim=block_dim)


def _dense_dim_order(tensor: torch.Tensor) -> list[int] | None:
    """The dims from the outermost stride to the innermost, when ``tensor`` is dense in that order
    and not simply contiguous (``channels_last``, transposed); None otherwise."""
    if tensor.dim() < 2 or tensor.is_contiguous():
        return None
    strides = tensor.stride()
    order = sorted(range(tensor.dim()), key=lambda d: -strides[d])
    return order if tensor.permute(order).is_contiguous() else None


def _sliced_shape(old_shape: tuple[int, ...], axis: int, keep: torch.Tensor) -> tuple[int, ...]:
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

    module: nn.Module | None
    tensor_name: str
    axis: int
    keep: torch.Tensor
    old_shape: tuple[int, ...]
    is_parameter: bool
    group_keep: tuple[torch.Tensor, ...] | None = None
    module_name: str = ""

    @property
    def new_shape(self) -> tuple[int, ...]:
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
        return (
            f"{kind} {self.qualified_name:<40} {list(self.old_shape)} -> {list(self.new_shape)} "
            f"axis {self.axis}{grouped}  (-{self.removed_elements} elements)"
        )


@dataclass(eq=False)
class AttributeChange:
    """Set ``module.<attribute>`` from ``old`` to ``new``."""

    module: nn.Module | None
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
        if self.attribute == SHAPE_ATTRIBUTES_ATTRIBUTE:
            return f"record {name:<40} changed sizes recorded for checkpoints"
        return f"attr   {name:<40} {old} -> {new}"


Edit = TensorSlice | AttributeChange


def slice_tensor(
    module: nn.Module, tensor_name: str, axis: int, keep: torch.Tensor, group_keep: Sequence[torch.Tensor] | None = None
) -> list[Edit]:
    """An edit that keeps ``keep`` along ``axis`` of a parameter or buffer of ``module``.

    Returns an empty list when the tensor is None (``bias=False``, untracked BatchNorm stats).

    Args:
        module: the module that owns the tensor.
        tensor_name: attribute name of the parameter or buffer (``"weight"``, ``"running_mean"``).
        axis: the axis that is sliced.
        keep: indices kept along ``axis``.
        group_keep: for grouped layers: the tensor is cut into ``len(group_keep)`` equal blocks
            along dim 0 and block ``j`` keeps ``group_keep[j]`` along ``axis`` (which must not be 0).
    """
    tensor: torch.Tensor | None
    if tensor_name in module._parameters:
        tensor, is_parameter = module._parameters[tensor_name], True
    elif tensor_name in module._buffers:
        tensor, is_parameter = module._buffers[tensor_name], False
    else:
        raise TypeError(f"{type(module).__name__} has no parameter or buffer named {tensor_name!r}")
    if tensor is None:
        return []
    axis = axis % tensor.dim()
    keep = torch.as_tensor(keep, dtype=torch.long).cpu()
    groups = None
    if group_keep is not None:
        if axis == 0:
            raise ValueError("group_keep slices within blocks of dim 0; axis must not be 0")
        groups = tuple(torch.as_tensor(k, dtype=torch.long).cpu() for k in group_keep)
    return [
        TensorSlice(
            module=module,
            tensor_name=tensor_name,
            axis=axis,
            keep=keep,
            old_shape=tuple(tensor.shape),
            is_parameter=is_parameter,
            group_keep=groups,
        )
    ]


def set_attribute(module: nn.Module, attribute: str, value: object) -> list[Edit]:
    """An edit that sets ``module.<attribute> = value`` (skipped when already equal)."""
    old = getattr(module, attribute)
    if old == value:
        return []
    return [AttributeChange(module=module, attribute=attribute, old=old, new=value)]
