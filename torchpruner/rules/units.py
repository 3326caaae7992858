"""Unit bookkeeping shared by every planner: index validation, complements, kept unit ids."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .edits import KEPT_UNITS_ATTRIBUTE, SHAPE_ATTRIBUTES_ATTRIBUTE, AttributeChange, Edit
from .registry import SlicingRule, get_slicing_rule

__all__ = [
    "normalize_indices",
    "complement",
    "kept_units",
    "kept_units_edit",
    "param_record_key",
    "shape_attributes_edit",
    "conv_blocked_side",
    "conv_weight_blocks",
]


def normalize_indices(
    indices: Any, num_units: int, module_name: str, allow_all: bool = False, argument: str = "indices"
) -> torch.Tensor:
    """Check user indices and return them as a sorted CPU int64 tensor: the one index check of
    every entry point (``prune_model``, ``prune_module``, ``prune_parameter``, ``prune_group``...).

    Accepted: a sequence of ints, an int, a one-dimensional integer tensor or numpy array. Empty
    input of any of these (``[]``, ``torch.tensor([])``, ``np.array([])``) selects nothing.

    Args:
        indices: what the user passed.
        num_units: the number of units the indices refer to.
        module_name: what they refer to, for the messages (a module name, ``group 3``...).
        allow_all: accept removing every unit (the caller refuses it with a better message).
        argument: the name of the argument, for the messages.

    Raises:
        TypeError: non-integer indices (floats, a boolean mask, strings), a dict, a nested
            structure, a tensor on the meta device (it holds no values).
        ValueError: negative, out-of-range or duplicated indices; every unit (unless ``allow_all``).
    """
    where = f"{argument} for '{module_name}'"
    mask_hint = (
        f"{where} must be integers (unit indices), got a boolean mask; pass the indices of the units to "
        f"remove (mask.nonzero())"
    )
    if isinstance(indices, torch.Tensor):
        if indices.is_meta:
            raise TypeError(
                f"{where} are a tensor on the meta device, which holds no values; pass the indices on the CPU"
            )
        if indices.dim() > 1:
            raise TypeError(f"{where} must be one-dimensional, got shape {list(indices.shape)}")
        if indices.numel() == 0:
            values: list[int] = []
        elif indices.dtype == torch.bool:
            raise TypeError(mask_hint)
        elif indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"{where} must be integers, got a {indices.dtype} tensor")
        else:
            values = [int(v) for v in indices.flatten().tolist()]
    elif isinstance(indices, np.ndarray):
        if indices.ndim > 1:
            raise TypeError(f"{where} must be one-dimensional, got shape {list(indices.shape)}")
        if indices.size == 0:
            values = []
        elif indices.dtype.kind == "b":
            raise TypeError(mask_hint)
        elif indices.dtype.kind not in "iu":
            raise TypeError(f"{where} must be integers, got a numpy array of dtype {indices.dtype}")
        else:
            values = [int(v) for v in indices.reshape(-1).tolist()]
    elif isinstance(indices, Mapping):
        raise TypeError(
            f"{where} must be a sequence of integers, got a {type(indices).__name__} "
            f"(its keys are not unit indices); pass a list"
        )
    elif isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        if not _is_integer(indices):
            raise TypeError(f"{where} must be a sequence of integers, got {indices!r} ({type(indices).__name__})")
        values = [int(indices)]
    else:
        items = list(indices)
        if items and all(isinstance(v, (bool, np.bool_)) for v in items):
            raise TypeError(mask_hint)
        values = []
        for value in items:
            if not _is_integer(value):
                raise TypeError(f"{where} must be integers, got {value!r} ({type(value).__name__})")
            values.append(int(value))
    bad = [v for v in values if v < 0 or v >= num_units]
    if bad:
        raise ValueError(
            f"{where} out of range: {bad[:10]} (there are {num_units} units; "
            f"indices must be in 0..{num_units - 1}, negative indices are not accepted)"
        )
    if len(set(values)) != len(values):
        duplicates = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"{where} contain duplicates: {duplicates[:10]}")
    if not allow_all and values and len(values) == num_units:
        raise ValueError(f"{where} would remove every unit ({num_units}); keep at least one")
    return torch.tensor(sorted(values), dtype=torch.long)


def _is_integer(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_meta:
        return not (value.dtype == torch.bool or value.is_floating_point() or value.is_complex())
    return False


def kept_units(module: nn.Module, direction: str = "out") -> list[int] | None:
    """Original ids of the units ``module`` still holds (``direction`` "out" or "in").

    Stored on the module as ``module._torchpruner_kept_units = {"out": [...], "in": [...]}``
    (a plain attribute, so it survives ``copy.deepcopy``, ``AveragedModel`` copies and pickling).
    An unpruned side reports ``list(range(n))``; None when the module has no unit count there.
    """
    if direction not in ("out", "in"):
        raise ValueError(f"direction must be 'out' or 'in', got {direction!r}")
    record = getattr(module, KEPT_UNITS_ATTRIBUTE, None) or {}
    if direction in record:
        return list(record[direction])
    rule = get_slicing_rule(module)
    if rule is None:
        return None
    count = rule.out_units(module) if direction == "out" else rule.in_units(module)
    return list(range(count)) if count is not None else None


def kept_units_edit(
    module: nn.Module, rule: SlicingRule, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None
) -> list[Edit]:
    old = getattr(module, KEPT_UNITS_ATTRIBUTE, None)
    new = dict(old or {})
    changed = False
    for direction, keep in (("out", out_keep), ("in", in_keep)):
        if keep is None:
            continue
        current = kept_units(module, direction)
        if current is None:
            continue
        new[direction] = [current[i] for i in keep.tolist()]
        changed = True
    if not changed:
        return []
    return [AttributeChange(module=module, attribute=KEPT_UNITS_ATTRIBUTE, old=old, new=new)]


def conv_blocked_side(module: nn.modules.conv._ConvNd) -> str:
    """The side (``"out"`` or ``"in"``) whose channels a convolution's weight holds on dim 0, every
    group's block after the other; dim 1 holds the other side's channels of one group.

    ``Conv*d``: weight ``[out, in/groups, k...]``, so ``"out"``; ``ConvTranspose*d``: weight
    ``[in, out/groups, k...]``, so ``"in"``. The one place the package reads this layout.
    """
    return "in" if module.transposed else "out"


def conv_weight_blocks(module: nn.modules.conv._ConvNd, weight: torch.Tensor | None = None) -> torch.Tensor:
    """A convolution's weight (or ``weight``, a tensor of its shape) as
    ``[groups, out/groups, in/groups, kernel elements]``: entry ``[g, j, i]`` links output channel
    ``g·(out/groups) + j`` to input channel ``g·(in/groups) + i``. A view when the layout allows.
    """
    w = module.weight if weight is None else weight
    groups = module.groups
    if conv_blocked_side(module) == "out":
        return w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)
    return w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).transpose(1, 2)


def complement(remove: torch.Tensor, num_units: int) -> torch.Tensor:
    """The sorted indices of ``range(num_units)`` that are not in ``remove``."""
    mask = torch.ones(num_units, dtype=torch.bool)
    mask[remove] = False
    return mask.nonzero().flatten()


def param_record_key(parameter: str, axis: int) -> str:
    """Key of a bare parameter's kept ids in a module's kept-units record (``"param:pos:2"``)."""
    return f"param:{parameter}:{axis}"


def shape_attributes_edit(changes: list[AttributeChange]) -> list[AttributeChange]:
    """Record each module's changed size attributes (``normalized_shape``) on the module, as JSON
    values (an int or a list of ints), for :func:`torchpruner.save_pruned`; one edit per module."""
    per_module: dict[int, tuple[nn.Module | None, dict[str, Any]]] = {}
    for change in changes:
        new = change.new
        value = int(new) if isinstance(new, int) else [int(n) for n in new]
        module, record = per_module.setdefault(id(change.module), (change.module, {}))
        record[change.attribute] = value
    edits = []
    for module, record in per_module.values():
        old = getattr(module, SHAPE_ATTRIBUTES_ATTRIBUTE, None)
        edits.append(
            AttributeChange(module=module, attribute=SHAPE_ATTRIBUTES_ATTRIBUTE, old=old, new={**(old or {}), **record})
        )
    return edits
