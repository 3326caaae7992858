"""Sparsity regularisers that prepare a model for pruning.

Network slimming (Liu et al., ICCV 2017) trains with an L1 penalty ``s·Σ|γ|`` on the BatchNorm
scales, so that unimportant channels end with γ near zero; they are then pruned by |γ|
(:class:`~torchpruner.attributions.BNScaleAttributionMetric`). :func:`update_bn` adds the penalty's
subgradient ``s·sign(γ)`` to the BatchNorm weight gradients, one call between ``backward()`` and
``step()``::

    batchnorms = prunable_batchnorms(pruner)     # optional: only BatchNorms the Pruner can shrink
    for inputs, targets in loader:
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        update_bn(model, s=1e-4, layers=batchnorms)   # layers=None: every BatchNorm
        optimizer.step()

Mixed precision: with ``torch.amp.GradScaler`` the gradients are scaled until
``scaler.unscale_(optimizer)``; call ``update_bn`` after it (``scaler.scale(loss).backward();
scaler.unscale_(optimizer); update_bn(model, s); scaler.step(optimizer); scaler.update()``). Called
before, the term would be divided by the scale. Steps that the scaler skips (inf/NaN gradients)
skip the term too.

Gradient accumulation: the term does not depend on the data, so add it **once per optimizer
step**, after the last micro-batch's ``backward()``, with the same ``s`` as without accumulation
(the objective is ``mean loss + s·Σ|γ|``). Adding it after every micro-batch with ``s /
accumulation_steps`` gives the same gradient.

:class:`GroupLasso` is the group-sparsity regulariser over coupled groups (DepGraph, Fang et al.,
CVPR 2023): ``Σ_groups Σ_units ||θ_unit||_2``, where ``θ_unit`` holds every parameter element that
pruning the unit removes, in every layer of its group (conv filters and biases, BatchNorm γ and β,
the consumers' input columns). It is a differentiable tensor to add to the loss::

    lasso = GroupLasso(pruner)                    # once: maps every parameter slice to its unit
    loss = loss_fn(model(inputs), targets) + 1e-4 * lasso()
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from torchpruner.graph import unwrap_model
from torchpruner.graph.dependency import Group
from torchpruner.pruner import Pruner
from torchpruner.pruner.planning import group_edits
from torchpruner.rules import TensorSlice, complement

logger = logging.getLogger(__name__)

__all__ = ["GroupLasso", "group_lasso", "prunable_batchnorms", "update_bn"]

BATCHNORM_LAYERS: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)

#: What ``layers=`` / ``groups=`` accept.
Layers = Pruner | Group | Iterable[nn.Module | Group]


# --------------------------------------------------------------------------------------------
# L1 on BatchNorm scales
# --------------------------------------------------------------------------------------------
def _check_strength(s: object) -> float:
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Real):
        raise TypeError(
            f"s must be a non-negative number (the L1 strength on BatchNorm scales), got {s!r} ({type(s).__name__})"
        )
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"s must be a finite number >= 0 (the L1 strength on BatchNorm scales), got {s!r}")
    return float(s)


def _batchnorms_of_groups(groups: Iterable[Group]) -> list[nn.Module]:
    found: dict[int, nn.Module] = {}
    for group in groups:
        for member in group.members:
            if isinstance(member.module, BATCHNORM_LAYERS):
                found.setdefault(id(member.module), member.module)
    return list(found.values())


def prunable_batchnorms(layers: Pruner | Group | Iterable[Group]) -> list[nn.Module]:
    """The BatchNorms of a Pruner's prunable groups (``pruner.groups()``), or of the given groups:
    the BatchNorms whose channels pruning can remove. Compute it once and pass it to
    :func:`update_bn` (``pruner.groups()`` traces the model the first time)."""
    if isinstance(layers, Pruner):
        return _batchnorms_of_groups(layers.groups())
    if isinstance(layers, Group):
        return _batchnorms_of_groups([layers])
    items = list(layers)
    strangers = [item for item in items if not isinstance(item, Group)]
    if strangers:
        raise TypeError(
            f"prunable_batchnorms takes a Pruner or groups from pruner.groups(), got {type(strangers[0]).__name__}"
        )
    return _batchnorms_of_groups(items)


def _resolve_batchnorms(model: nn.Module, layers: Layers | None) -> list[nn.Module]:
    """The BatchNorms ``layers`` names, each once, all checked to be BatchNorms of ``model``."""
    names = {id(module): name for name, module in model.named_modules()}
    if layers is None:
        return [module for module in model.modules() if isinstance(module, BATCHNORM_LAYERS)]
    if isinstance(layers, (Pruner, Group)):
        batchnorms = prunable_batchnorms(layers)
    elif isinstance(layers, nn.Module):
        raise TypeError(
            f"layers must be None, a Pruner, a group or a list of BatchNorms/groups, got one "
            f"{type(layers).__name__} module; wrap it in a list"
        )
    elif isinstance(layers, Iterable) and not isinstance(layers, (str, bytes)):
        batchnorms = []
        for item in layers:
            if isinstance(item, Group):
                batchnorms += _batchnorms_of_groups([item])
            elif isinstance(item, BATCHNORM_LAYERS):
                batchnorms.append(item)
            elif isinstance(item, nn.Module):
                name = names.get(id(item))
                label = f"'{name}' ({type(item).__name__})" if name is not None else type(item).__name__
                raise TypeError(
                    f"layers holds {label}, which is not a BatchNorm; pass BatchNorm modules, groups "
                    "from pruner.groups() or a Pruner"
                )
            else:
                raise TypeError(
                    f"layers holds {item!r} ({type(item).__name__}); pass BatchNorm modules, groups "
                    "from pruner.groups() or a Pruner"
                )
    else:
        raise TypeError(
            f"layers must be None, a Pruner, a group or a list of BatchNorms/groups, got {type(layers).__name__}"
        )
    unique: dict[int, nn.Module] = {}
    for module in batchnorms:
        if id(module) not in names:
            raise ValueError(
                f"layers holds a {type(module).__name__} that is not part of the model "
                f"{type(model).__name__}; pass the model's own BatchNorms (or its Pruner)"
            )
        unique.setdefault(id(module), module)
    return list(unique.values())


@torch.no_grad()
def update_bn(model: nn.Module, s: float = 1e-4, layers: Layers | None = None) -> int:
    """Add ``s·sign(γ)`` to the gradient of every BatchNorm scale γ (network slimming's sparsity
    training): the subgradient of the penalty ``s·Σ|γ|``. Call it between ``loss.backward()`` and
    ``optimizer.step()``; see the module docstring for GradScaler and gradient accumulation.

    Args:
        model: the model (a ``torch.compile`` wrapper is unwrapped).
        s: the L1 strength, a finite number >= 0 (network slimming uses 1e-4 to 1e-5).
        layers: which BatchNorms: None (default) every BatchNorm of the model; a
            :class:`~torchpruner.pruner.Pruner` or groups (``pruner.groups()``) for the BatchNorms of
            prunable groups only; or a list of BatchNorm modules (groups may be mixed in).

    BatchNorms without a scale (``affine=False``), with a frozen scale or without a gradient yet
    (``weight.grad is None``) are skipped. Arguments are checked before any gradient changes.

    Returns:
        The number of BatchNorms whose gradient changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    s = _check_strength(s)
    batchnorms = _resolve_batchnorms(unwrap_model(model), layers)
    updated = 0
    for module in batchnorms:
        weight = module.weight
        if not isinstance(weight, torch.Tensor) or weight.grad is None:
            continue
        if s:
            weight.grad.add_(torch.sign(weight.detach()).to(weight.grad.dtype), alpha=s)
        updated += 1
    return updated


# --------------------------------------------------------------------------------------------
# Group lasso over coupled groups
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Owned:
    """The positions of one parameter's axis that the units of one group own."""

    parameter: nn.Parameter
    name: str
    axis: int
    size: int
    positions: torch.Tensor  # positions along ``axis`` held by the group
    units: torch.Tensor  # group unit of each position


def _groups_of(groups: Layers) -> list[Group]:
    if isinstance(groups, Pruner):
        return groups.groups()
    if isinstance(groups, Group):
        return [groups]
    if isinstance(groups, nn.Module) or not isinstance(groups, Iterable):
        raise TypeError(
            f"groups must be a Pruner, a group or a list of groups from pruner.groups(), got {type(groups).__name__}"
        )
    items = list(groups)
    found = [item for item in items if isinstance(item, Group)]
    if len(found) != len(items):
        stranger = next(item for item in items if not isinstance(item, Group))
        raise TypeError(f"groups holds {type(stranger).__name__}; pass groups from pruner.groups() or a Pruner")
    return found


def _owned_slices(group: Group) -> list[_Owned]:
    """Which positions of which parameter axis each unit of ``group`` owns, read off the edits that
    pruning would make (the slicing rules: what is penalised is what pruning removes).

    Asks about ``1 + log2(units)`` selections: unit 0, then every set of units whose bit ``b`` is
    set; a position removed with the units of bit ``b`` has bit ``b`` in its unit index.
    """
    count = group.num_units
    probes = [(None, [0])] + [
        (bit, [u for u in range(count) if u >> bit & 1]) for bit in range(max(0, (count - 1).bit_length()))
    ]
    found: dict[tuple[int, int], list[Any]] = {}  # (parameter id, axis) -> [parameter, name, axis, held, code]
    names = {id(member.module): member.module_name for member in group.members}
    for bit, units in probes:
        try:
            edits = group_edits({group: units}, "linear")
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"GroupLasso cannot split group {group.index} into the parameter slices of its units: {error}"
            ) from None
        for edit in edits:
            if not isinstance(edit, TensorSlice) or not edit.is_parameter:
                continue
            if edit.group_keep is not None:
                owner = names.get(id(edit.module), type(edit.module).__name__)
                raise ValueError(
                    f"GroupLasso cannot split group {group.index}: '{owner}.{edit.tensor_name}' is sliced "
                    "per convolution group; leave that layer out (pruner.groups(ignored_layers=...))"
                )
            assert edit.module is not None  # planned edits hold their module
            parameter = edit.module._parameters[edit.tensor_name]
            size = edit.old_shape[edit.axis]
            key = (id(parameter), edit.axis)
            if key not in found:
                name = f"{names.get(id(edit.module), type(edit.module).__name__)}.{edit.tensor_name}"
                found[key] = [parameter, name, edit.axis, np.zeros(size, dtype=bool), np.zeros(size, dtype=np.int64)]
            removed = complement(edit.keep, size).numpy()
            record = found[key]
            record[3][removed] = True
            if bit is not None:
                record[4][removed] |= 1 << bit
    owned = []
    for parameter, name, axis, held, code in found.values():
        positions = np.nonzero(held)[0]
        if (code[positions] >= count).any():
            raise RuntimeError(f"internal: inconsistent unit slices of '{name}' in group {group.index}")
        owned.append(
            _Owned(parameter, name, axis, len(held), torch.as_tensor(positions), torch.as_tensor(code[positions]))
        )
    return owned


class GroupLasso:
    """``Σ_groups Σ_units ||θ_unit||_2`` over coupled groups: a differentiable penalty to add to the loss.

    ``θ_unit`` is every parameter element removed with the unit when it is pruned, across all the
    layers of its group (weights and biases of the sources, BatchNorm γ and β, the consumers' input
    columns, bare parameters such as class tokens); buffers (running statistics) are not counted.
    An element that one unit removes along two axes of one parameter (a square weight coupled to
    itself) is counted once per axis. The norm of an all-zero unit has gradient 0 there.

    Args:
        groups: a :class:`~torchpruner.pruner.Pruner` (its prunable groups), a group or a list of
            groups from ``pruner.groups()``.

    Build it once (it reads the slicing rules for every group) and call it every step. After the
    model is pruned the groups change: build a new one from ``pruner.groups()`` (a stale one refuses
    to run).
    """

    def __init__(self, groups: Layers) -> None:
        self.groups = _groups_of(groups)
        self._owned = [_owned_slices(group) for group in self.groups]

    def unit_norms(self) -> list[torch.Tensor]:
        """``||θ_unit||_2`` for every unit of every group (one ``[units]`` tensor per group)."""
        norms = []
        for group, owned in zip(self.groups, self._owned):
            squares = None
            for slice_ in owned:
                parameter = slice_.parameter
                if parameter.dim() <= slice_.axis or parameter.shape[slice_.axis] != slice_.size:
                    raise ValueError(
                        f"'{slice_.name}' has shape {tuple(parameter.shape)}, not the one group "
                        f"{group.index} was computed on (the model was pruned): build a new GroupLasso "
                        "from pruner.groups()"
                    )
                wide = parameter.to(torch.promote_types(parameter.dtype, torch.float32))
                per_position = wide.movedim(slice_.axis, 0).reshape(slice_.size, -1).pow(2).sum(dim=1)
                positions = slice_.positions.to(parameter.device)
                contribution = torch.zeros(group.num_units, dtype=wide.dtype, device=parameter.device).index_add(
                    0, slice_.units.to(parameter.device), per_position.index_select(0, positions)
                )
                squares = contribution if squares is None else squares + contribution.to(squares)
            if squares is None:
                squares = torch.zeros(group.num_units)
            positive = squares > 0
            # sqrt has an infinite derivative at 0: an all-zero unit gets the subgradient 0
            norms.append(
                torch.where(
                    positive,
                    torch.sqrt(torch.where(positive, squares, torch.ones_like(squares))),
                    torch.zeros_like(squares),
                )
            )
        return norms

    def __call__(self) -> torch.Tensor:
        """The penalty, a 0-dim tensor that backpropagates into every group parameter."""
        norms = self.unit_norms()
        if not norms:
            return torch.zeros(())
        return torch.stack([n.sum().to(norms[0]) for n in norms]).sum()

    def __repr__(self) -> str:
        units = sum(group.num_units for group in self.groups)
        return f"GroupLasso({len(self.groups)} groups, {units} units)"


def group_lasso(groups: Layers) -> torch.Tensor:
    """``Σ_groups Σ_units ||θ_unit||_2`` once (see :class:`GroupLasso`; inside a training loop,
    build a ``GroupLasso`` once and call it every step)."""
    return GroupLasso(groups)()
