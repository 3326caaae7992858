"""Scoring coupled groups: a group unit is removed by zeroing it wherever pruning removes it.

A coupled group (:class:`torchpruner.graph.dependency.Group`, from ``pruner.groups()``) is a set
of units shared by several tensors: a residual stream written by a stem convolution and by the
last convolution of every block, one branch of a concatenation, the channels that a depthwise
convolution passes through. Pruning group unit ``u`` removes it from all of them at once. A group
is scored by the one :class:`~torchpruner.attributions.runner.Runner`, with two kinds of points:

Read points
-----------
The tensors that the group's consumers read (``group.mask_points()``: the inputs of the next
convolutions / Linear layers, at the branch offset inside a concatenation, the ``H·W`` columns
after a flatten). Zeroing unit ``u`` at every read point gives, in eval mode, exactly the output
of the model with ``u`` pruned: no consumer sees the unit any more, which is what slicing does.
Zeroing the raw outputs of the sources would not be the same (a BatchNorm after a source turns a
zero into its shift ``β − γ·μ/σ``, which pruning removes).

Entry points
------------
The tensors that enter the shared stream (``group.entry_points()``): each source's output after
the BatchNorm / activation that follow it, up to the addition or concatenation that merges it
into the stream. Zeroing there gives the same model as zeroing at the read points, but the read
points of a residual stream are chained (the block output that the head reads already contains
the stem output that the block read), so scaling a unit by ``1 − t`` at every read point
compounds: its first-order term counts the stem once per block. At the entry points each source
is scaled once, so the first-order term is that of scaling the unit linearly everywhere. A
product of two tensors with the units (a squeeze-excitation gate ``x * s``, where a later layer
writes the gate of each unit) is scaled through one operand only: the gate, read by nothing
else, is not an entry point, since scaling both would scale the product by ``(1 − t)²``.

How each metric reads the points (per example n, group unit u, positions s of u):

* Shapley: players are the group units; a coalition zeroes every unit outside it at every read
  point. The loss of the coalition "all but u" is the loss after ``Pruner.prune_model`` removes u.
* Taylor: ``|Σ_e Σ_s −g_e·z_e|`` over the entry points e, with ``g_e`` the *total* derivative of
  ℓₙ with respect to the tensor at e (through every later point too): ``dℓ/dt`` at ``t = 0``
  for scaling the unit by ``1 − t`` at every entry point (t = 1 is pruning), the first-order
  estimate of ``ℓ(unit pruned) − ℓ``.
* Sensitivity: ``Σ_e Σ_s |g_e|`` with the same total derivatives.
* APoZ: the fraction of positive values over all positions of the unit at all read points.
* Random: one U(0, 1) number per group unit.
* WeightNorm: see :func:`~torchpruner.attributions.methods.weight_norm.group_weight_norms`.

For a plain chain (conv → BN → ReLU → conv) the one entry point is the one read point, the
evaluation point of ``run(module, find_best_evaluation_module=True)``: the scores are the same.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from torchpruner.graph import ModelGraph
from torchpruner.graph.dependency import Group, get_dependency_graph

from .runner import MaskPoint, Runner

logger = logging.getLogger(__name__)


class CoupledGroupWarning(UserWarning):
    """``run(module)`` scored a layer whose units are shared with other layers (a coupled group):
    the local score measures zeroing this layer's output only, pruning removes the units from
    every layer of the group. Filter it with ``warnings.filterwarnings("ignore",
    category=CoupledGroupWarning)``."""


def group_label(group: Group) -> str:
    """``group 3 (stem, layer1.0.conv2, +2)``: the index and the first sources."""
    names = list(dict.fromkeys(site.label for site in group.sources))
    shown = ", ".join(names[:2]) + (f", +{len(names) - 2}" if len(names) > 2 else "")
    return f"group {group.index} ({shown})" if shown else f"group {group.index}"


def check_group(model: nn.Module, group: Group) -> None:
    """Refuse groups that cannot be pruned (so "what is scored is what is pruned" cannot hold)
    and groups of another model."""
    reason = group.why_not_prunable(include_outputs=True)  # output units: see inexact_members
    if reason is not None:
        raise ValueError(f"{group_label(group)} cannot be scored: {reason}")
    in_model = {id(m) for m in model.modules()}
    strangers = [m.module_name for m in group.members if id(m.module) not in in_model]
    if strangers:
        raise ValueError(
            f"{group_label(group)} holds layers that are not part of the model "
            f"{type(model).__name__} ({', '.join(strangers[:3])}): compute the groups on this model"
        )


def unit_index(
    positions_fn: Callable[[Sequence[int]], tuple[int, np.ndarray]], size: int, num_units: int
) -> tuple[int, np.ndarray]:
    """``(axis, index)``: the group unit of every position along ``axis`` (-1: another group's).

    Asks ``positions_fn`` about ``1 + log2(units)`` sets of units instead of once per unit: a
    position removed with the units whose bit ``b`` is set has bit ``b`` set in its unit index
    (every position belongs to exactly one unit).
    """
    axis, inside = positions_fn(range(num_units))
    inside = np.asarray(inside, dtype=np.int64)
    index = np.full(size, -1, dtype=np.int64)
    index[inside] = 0
    for bit in range(max(1, (num_units - 1).bit_length())):
        _, positions = positions_fn([u for u in range(num_units) if u >> bit & 1])
        index[np.asarray(positions, dtype=np.int64)] += 1 << bit
    if (index[inside] >= num_units).any():
        raise RuntimeError("internal: inconsistent group positions")
    return int(axis), index


@dataclass
class MemberSlice:
    """The positions of one member's sliced side that belong to the group.

    Attributes:
        module, module_name: the layer (for a bare parameter: its owner).
        direction: ``"out"``, ``"in"`` or ``"param"`` (see ``torchpruner.graph.dependency.Member``).
        parameter, axis: for ``"param"``: the bare parameter's name and sliced axis.
        positions: positions on the sliced side removed with the group's units.
        units: ``units[k]`` is the group unit of ``positions[k]``.
    """

    module: nn.Module
    module_name: str
    direction: str
    parameter: str | None
    axis: int | None
    positions: np.ndarray
    units: np.ndarray


def member_slices(group: Group) -> list[MemberSlice]:
    """For every member of the group, which positions each group unit removes
    (from ``group.member_units()``)."""
    slices = []
    for role, unit_of in group.member_units():
        positions = np.nonzero(unit_of >= 0)[0].astype(np.int64)
        slices.append(
            MemberSlice(
                role.module,
                role.module_name,
                role.direction,
                role.parameter,
                getattr(role, "axis", None),
                positions,
                unit_of[positions].astype(np.int64),
            )
        )
    return slices


# --------------------------------------------------------------------------------------------
# Mask points in the graph used for scoring
# --------------------------------------------------------------------------------------------
PositionsFn = Callable[[Sequence[int]], tuple[int, np.ndarray]]


def _points(
    graph: ModelGraph, group: Group, traced: list[tuple[Any, PositionsFn]], known: dict[str, MaskPoint]
) -> list[MaskPoint]:
    """Points of ``group`` as call sites of ``graph`` (the graph of the current model); a site
    already in ``known`` (by name) is reused, so a tensor that is both a read and an entry point
    is intercepted once.

    A group keeps the call sites of the graph it was computed on. Those are looked up by name in
    ``graph`` (the same objects when both come from the tracer's cache), and their unit counts are
    checked, so a group computed before the model was pruned is refused instead of masking the
    wrong channels.
    """
    by_name = {site.name: site for site in graph.sites}
    points: list[MaskPoint] = []
    for site, positions_fn in traced:
        if site.name in known:
            points.append(known[site.name])
            continue
        current = by_name.get(site.name)
        traced_shape = tuple(site.shape) if site.shape is not None else None
        axis, _ = positions_fn([])
        if traced_shape is None or not 0 <= axis < len(traced_shape) or (axis == 0 and site.kind != "attr"):
            raise ValueError(f"{group_label(group)}: call site '{site.label}' has no units on axis {axis}")
        axis, index = unit_index(positions_fn, int(traced_shape[axis]), group.num_units)
        if (
            current is None
            or current.kind != site.kind
            or current.shape is None
            or len(current.shape) != len(traced_shape)
            or current.shape[axis] != traced_shape[axis]
        ):
            now = None if current is None or current.shape is None else tuple(current.shape)
            raise ValueError(
                f"{group_label(group)} does not match the model any more: call site '{site.label}' had "
                f"shape {traced_shape} when the group was computed, now {now}; compute the groups "
                "again (pruner.groups()) after pruning"
            )
        inside = np.nonzero(index >= 0)[0]
        point = MaskPoint(
            site=current,
            axis=axis,
            size=int(current.shape[axis]),
            positions=torch.as_tensor(inside, dtype=torch.long),
            units=torch.as_tensor(index[inside], dtype=torch.long),
        )
        known[site.name] = point
        points.append(point)
    return points


def group_runner(graph: ModelGraph, group: Group, criterion: Callable[..., Any]) -> Runner:
    """The runner of ``run(group)``: the group's read and entry points in ``graph``."""
    known: dict[str, MaskPoint] = {}
    read = _points(graph, group, group.mask_points(), known)
    if not read:
        raise ValueError(
            f"{group_label(group)} has no tensor read by another layer (its units only reach "
            "the model output): nothing to zero"
        )
    entry = _points(graph, group, group.entry_points(), known)
    if not entry:
        raise ValueError(f"{group_label(group)} has no tensor where its units enter the model")
    inexact = inexact_members(group)
    if inexact:
        warnings.warn(
            f"{group_label(group)} is scored by zeroing its units where its consumers read them, which "
            f"is not exactly pruning them: pruning also changes {'; '.join(inexact[:3])}",
            UserWarning,
            stacklevel=4,
        )
    return Runner(read, entry, group.num_units, criterion, group_label(group), group=group)


def inexact_members(group: Group) -> list[str]:
    """Why zeroing the group's units is not the same as pruning them (empty when it is): a
    LayerNorm / RMSNorm (or an RMSNorm written out) over the pruned axis normalises with
    statistics that include the pruned units, attention mixes every embed dim into its scores (and
    its scale 1/sqrt(head_dim) changes), and units that reach the model output are removed from it."""
    reasons = []
    if getattr(group, "output_reason", None):
        reasons.append(f"the model output ({group.output_reason})")
    for member in group.members:
        if member.direction != "in":
            continue
        if isinstance(member.module, (nn.LayerNorm, nn.RMSNorm)):
            reasons.append(f"the statistics of '{member.module_name}' ({type(member.module).__name__})")
        elif isinstance(member.module, nn.MultiheadAttention):
            reasons.append(f"the attention of '{member.module_name}' (MultiheadAttention)")
    for owner in group.normalizations():
        reasons.append(f"the statistics of '{owner}' (RMSNorm written out)")
    return reasons


# --------------------------------------------------------------------------------------------
# run(module) inside a larger group
# --------------------------------------------------------------------------------------------
def warn_if_coupled(graph: ModelGraph, module: nn.Module, call_index: int, stacklevel: int = 4) -> None:
    """Warn (:class:`CoupledGroupWarning`) when ``module``'s output units belong to a group with
    other sources. Uses the dependency analysis cached on ``graph`` (no second trace); silent when
    the analysis is not available for this model or module."""
    if getattr(graph, "method", None) != "fx":
        return
    try:
        groups = get_dependency_graph(graph).groups_of(module, call_index)
    except Exception as error:  # the analysis is optional here: never let it break scoring
        logger.debug("no coupled-group check for %s: %s", type(module).__name__, error)
        return
    for group in groups:
        sources = group.source_modules
        if len(sources) > 1 and any(m is module for m in sources):
            names = ", ".join(graph.module_name(m) for m in sources[:4]) + (", ..." if len(sources) > 4 else "")
            warnings.warn(
                f"module '{graph.module_name(module)}' ({type(module).__name__}) belongs to a coupled "
                f"group of {len(sources)} layers sharing {group.num_units} units (group {group.index}: "
                f"{names}); run(module) scores zeroing this layer's output alone, while pruning removes "
                "the units from all of them: score the group with run(group) (pruner.groups())",
                CoupledGroupWarning,
                stacklevel=stacklevel,
            )
