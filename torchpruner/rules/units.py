"""Unit bookkeeping shared by every planner: index validation, complements, kept unit ids."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, List, Optional

import numpy as np
import torch
import torch.nn as nn

from .edits import KEPT_UNITS_ATTRIBUTE, AttributeChange, Edit
from .registry import SlicingRule, get_slicing_rule

__all__ = ["normalize_indices", "complement", "kept_units", "kept_units_edit", "param_record_key"]


def normalize_indices(indices: Any, num_units: int, module_name: str, allow_all: bool = False) -> torch.Tensor:
    """Check user indices and return them as a sorted CPU int64 tensor.

    Raises:
        TypeError: non-integer indices (floats, bools, strings) or a nested structure.
        ValueError: negative, out-of-range or duplicated indices; every unit (unless ``allow_all``).
    """
    where = f"indices for '{module_name}'"
    if isinstance(indices, torch.Tensor):
        if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"{where} must be integers, got a {indices.dtype} tensor")
        if indices.dim() > 1:
            raise TypeError(f"{where} must be one-dimensional, got shape {list(indices.shape)}")
        values = [int(v) for v in indices.flatten().tolist()]
    elif isinstance(indices, np.ndarray):
        if indices.dtype.kind not in "iu":
            raise TypeError(f"{where} must be integers, got a numpy array of dtype {indices.dtype}")
        if indices.ndim > 1:
            raise TypeError(f"{where} must be one-dimensional, got shape {list(indices.shape)}")
        values = [int(v) for v in indices.reshape(-1).tolist()]
    elif isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        if _is_integer(indices):
            values = [int(indices)]
        else:
            raise TypeError(f"{where} must be a sequence of integers, got {type(indices).__name__}")
    else:
        values = []
        for value in indices:
            if not _is_integer(value):
                raise TypeError(f"{where} must be integers, got {value!r} ({type(value).__name__})")
            values.append(int(value))
    bad = [v for v in values if v < 0 or v >= num_units]
    if bad:
        raise ValueError(f"{where} out of range: {bad[:10]} (the layer has {num_units} units; "
                         f"indices must be in 0..{num_units - 1}, negative indices are not accepted)")
    if len(set(values)) != len(values):
        duplicates = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"{where} contain duplicates: {duplicates[:10]}")
    if not allow_all and values and len(values) == num_units:
        raise ValueError(f"{where} would remove every unit ({num_units}) of the layer; keep at least one")
    return torch.tensor(sorted(values), dtype=torch.long)


def _is_integer(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return not (value.dtype == torch.bool or value.is_floating_point() or value.is_complex())
    return False



def kept_units(module: nn.Module, direction: str = "out") -> Optional[List[int]]:
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

def kept_units_edit(module: nn.Module, rule: SlicingRule, out_keep: Optional[torch.Tensor],
                     in_keep: Optional[torch.Tensor]) -> List[Edit]:
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


def complement(remove: torch.Tensor, num_units: int) -> torch.Tensor:
    """The sorted indices of ``range(num_units)`` that are not in ``remove``."""
    mask = torch.ones(num_units, dtype=torch.bool)
    mask[remove] = False
    return mask.nonzero().flatten()



def param_record_key(parameter: str, axis: int) -> str:
    """Key of a bare parameter's kept ids in a module's kept-units record (``"param:pos:2"``)."""
    return f"param:{parameter}:{axis}"
