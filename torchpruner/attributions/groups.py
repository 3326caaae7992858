"""Scoring coupled groups: a group unit is removed by zeroing it wherever pruning removes it.

A coupled group (:class:`torchpruner.graph.dependency.Group`, from ``pruner.groups()``) is a set
of units shared by several tensors: a residual stream written by a stem convolution and by the
last convolution of every block, one branch of a concatenation, the channels that a depthwise
convolution passes through. Pruning group unit ``u`` removes it from all of them at once.

Where a group unit is zeroed
----------------------------
The group's *mask points* (``group.mask_points()``) are the tensors that the group's consumers
read (the inputs of the next convolutions / Linear layers, at the branch offset inside a
concatenation, the ``H·W`` columns after a flatten). Zeroing unit ``u`` at every mask point gives,
in eval mode, exactly the output of the model with ``u`` pruned: no consumer sees the unit any
more, which is what slicing does. Zeroing the raw outputs of the sources would not be the same
(a BatchNorm after a source turns a zero into its shift ``β − γ·μ/σ``, which pruning removes).
So the metrics below measure the joint removal that ``Pruner.prune_model`` performs.

How each metric reads the mask points (per example n, group unit u, points p, positions s of u):

* Shapley: players are the group units; a coalition zeroes every unit outside it at every point.
* Taylor: ``|Σ_p Σ_s −g_p·z_p|`` with ``g_p`` the *total* derivative of ℓₙ with respect to the
  tensor at p (through every later point too). This is exactly ``−dℓ/dt`` for removing the unit
  gradually (scaling it by ``1 − t`` at every point), the first-order estimate of the joint removal.
* Sensitivity: ``Σ_p Σ_s |g_p|`` with the same total derivatives.
* APoZ: the fraction of positive values over all positions of the unit at all points.
* Random: one U(0, 1) number per group unit.
* WeightNorm: see :func:`group_weight_norms`.

The derivatives come from one forward and one backward: an additive zero ``e_p`` is inserted at
every point (``z_p + e_p``), so ``∂ℓ/∂e_p`` is the total derivative ``g_p``; only the ``e_p`` are
differentiated, so the parameters' ``.grad`` are never touched.
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

from .base import Batch, per_example_loss, unit_mask_shape, units_view, wide

logger = logging.getLogger(__name__)


class CoupledGroupWarning(UserWarning):
    """``run(module)`` scored a layer whose units are shared with other layers (a coupled group):
    the local score measures zeroing this layer's output only, pruning removes the units from
    every layer of the group. Filter it with ``warnings.filterwarnings("ignore",
    category=CoupledGroupWarning)``."""


def is_group(obj: Any) -> bool:
    """True for a coupled group of the dependency analysis."""
    try:
        from torchpruner.graph.dependency import Group
    except ImportError:  # pragma: no cover - the dependency module is part of torchpruner
        return False
    return isinstance(obj, Group)


def group_label(group: Any) -> str:
    """``group 3 (stem, layer1.0.conv2, +2)``: the index and the first sources."""
    names = list(dict.fromkeys(site.label for site in group.sources))
    shown = ", ".join(names[:2]) + (f", +{len(names) - 2}" if len(names) > 2 else "")
    return f"group {group.index} ({shown})" if shown else f"group {group.index}"


def source_modules(group: Any) -> list[nn.Module]:
    """The distinct layers whose outputs feed the group's units."""
    found: list[nn.Module] = []
    for member in group.members:
        if member.direction == "out" and all(member.module is not m for m in found):
            found.append(member.module)
    return found


def check_group(model: nn.Module, group: Any) -> None:
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


def unit_index(positions_fn: Callable[[Sequence[int]], tuple[int, np.ndarray]], size: int,
               num_units: int) -> tuple[int, np.ndarray]:
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


def member_slices(group: Any) -> list[MemberSlice]:
    """For every member of the group, which positions each group unit removes
    (from ``group.member_units()``)."""
    slices = []
    for role, unit_of in group.member_units():
        positions = np.nonzero(unit_of >= 0)[0].astype(np.int64)
        slices.append(MemberSlice(role.module, role.module_name, role.direction, role.parameter,
                                  getattr(role, "axis", None), positions, unit_of[positions].astype(np.int64)))
    return slices


# --------------------------------------------------------------------------------------------
# Mask points in the graph used for scoring
# --------------------------------------------------------------------------------------------
@dataclass
class MaskPoint:
    """One tensor where the group's units are zeroed: ``site``'s output, units on ``axis``.

    Attributes:
        site: the call site in the graph the model is run with.
        axis: the axis of the group's positions in the site's output.
        size: the length of that axis.
        positions: the positions of the group's units (long tensor).
        units: ``units[k]`` is the group unit of ``positions[k]``.
    """

    site: Any
    axis: int
    size: int
    positions: torch.Tensor
    units: torch.Tensor

    def keep_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """Bool ``[size]``: False where the unit is not in the coalition ``keep`` (bool ``[U]``)."""
        mask = torch.ones(self.size, dtype=torch.bool)
        mask[self.positions] = keep.cpu()[self.units]
        return mask


def mask_points(graph: Any, group: Any) -> list[MaskPoint]:
    """The group's mask points as call sites of ``graph`` (the graph of the current model).

    A group keeps the call sites of the graph it was computed on. Those are looked up by name in
    ``graph`` (the same objects when both come from the tracer's cache), and their unit counts are
    checked, so a group computed before the model was pruned is refused instead of masking the
    wrong channels.
    """
    by_name = {site.name: site for site in graph.sites}
    points: list[MaskPoint] = []
    for site, positions_fn in group.mask_points():
        current = by_name.get(site.name)
        traced_shape = tuple(site.shape) if site.shape is not None else None
        axis, _ = positions_fn([])
        if traced_shape is None or not 0 < axis < len(traced_shape):
            raise ValueError(f"{group_label(group)}: call site '{site.label}' has no units on axis {axis}")
        axis, index = unit_index(positions_fn, int(traced_shape[axis]), group.num_units)
        if (current is None or current.kind != site.kind or current.shape is None
                or len(current.shape) != len(traced_shape) or current.shape[axis] != traced_shape[axis]):
            now = None if current is None or current.shape is None else tuple(current.shape)
            raise ValueError(
                f"{group_label(group)} does not match the model any more: call site '{site.label}' had "
                f"shape {traced_shape} when the group was computed, now {now}; compute the groups "
                "again (pruner.groups()) after pruning"
            )
        inside = np.nonzero(index >= 0)[0]
        points.append(MaskPoint(site=current, axis=axis, size=int(current.shape[axis]),
                                positions=torch.as_tensor(inside, dtype=torch.long),
                                units=torch.as_tensor(index[inside], dtype=torch.long)))
    if not points:
        raise ValueError(f"{group_label(group)} has no tensor read by another layer (its units only reach "
                         "the model output): nothing to zero")
    inexact = inexact_members(group)
    if inexact:
        warnings.warn(
            f"{group_label(group)} is scored by zeroing its units where its consumers read them, which "
            f"is not exactly pruning them: pruning also changes {'; '.join(inexact[:3])}",
            UserWarning,
            stacklevel=4,
        )
    return points


def inexact_members(group: Any) -> list[str]:
    """Why zeroing the group's units is not the same as pruning them (empty when it is): a
    LayerNorm / RMSNorm over the pruned axis normalises with statistics that include the pruned
    units, attention mixes every embed dim into its scores (and its scale 1/sqrt(head_dim)
    changes), and units that reach the model output are removed from it."""
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
    return reasons


# --------------------------------------------------------------------------------------------
# Running the model with every mask point intercepted
# --------------------------------------------------------------------------------------------
class GroupRunner:
    """Runs the model on a batch with all mask points of a group intercepted.

    The counterpart of :class:`~torchpruner.attributions.base.SiteRunner` for groups: one
    interception per point stays installed for the whole run; :meth:`activations`,
    :meth:`activations_and_gradients` and :meth:`losses` set what it does on each forward.
    Every interception returns a new tensor, so in-place ops downstream never touch a capture.
    """

    def __init__(self, points: list[MaskPoint], num_units: int, criterion: Callable, label: str) -> None:
        self.points = points
        self.num_units = num_units
        self.criterion = criterion
        self.label = label
        self.forward: Callable[..., Any] | None = None
        self._transform: Callable[[int, torch.Tensor], torch.Tensor] = lambda k, z: z.clone()

    def functions(self) -> dict[Any, Callable[[torch.Tensor], torch.Tensor]]:
        """``{site: fn}`` for ``graph.intercept``; each fn delegates to the current transform."""
        return {point.site: (lambda z, k=k: self._apply(k, z)) for k, point in enumerate(self.points)}

    def _apply(self, k: int, z: torch.Tensor) -> torch.Tensor:
        point = self.points[k]
        if not isinstance(z, torch.Tensor) or z.dim() <= point.axis or z.shape[point.axis] != point.size:
            raise ValueError(
                f"the activation at {point.site.label} has shape {tuple(getattr(z, 'shape', ()))}, "
                f"expected {point.size} units on axis {point.axis} (as traced)"
            )
        return self._transform(k, z)

    def _run(self, batch: Batch, transform: Callable[[int, torch.Tensor], torch.Tensor]) -> Any:
        self._transform = transform
        try:
            return self.forward(*batch.args, **batch.kwargs)
        finally:
            self._transform = lambda k, z: z.clone()

    def _captured(self, captured: dict[int, Any]) -> list[Any]:
        missing = [self.points[k].site.label for k in range(len(self.points)) if k not in captured]
        if missing:
            raise RuntimeError(f"the mask points {missing} of {self.label} were not reached")
        return [captured[k] for k in range(len(self.points))]

    def activations(self, batch: Batch) -> list[torch.Tensor]:
        """The tensor at every mask point (no gradient)."""
        captured: dict[int, torch.Tensor] = {}

        def capture(k: int, z: torch.Tensor) -> torch.Tensor:
            captured[k] = z.detach()
            return z.clone()

        with torch.no_grad():
            self._run(batch, capture)
        return self._captured(captured)

    def activations_and_gradients(self, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(z_p, g_p)]`` per mask point: the tensor and the total derivative ``∂ℓₙ/∂z_p`` of
        each example's loss (through every later point), from one forward and one backward.

        In eval mode each example's output depends on its own input only, so the gradient of
        ``Σₙ ℓₙ`` gives every example's own derivative.
        """
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def perturb(k: int, z: torch.Tensor) -> torch.Tensor:
            zero = torch.zeros_like(z, requires_grad=True)
            captured[k] = (z.detach(), zero)
            return z + zero  # a new tensor: downstream in-place ops are allowed

        with torch.enable_grad():
            output = self._run(batch, perturb)
            pairs = self._captured(captured)
            losses = per_example_loss(self.criterion, output, batch.target, batch.size)
            grads = torch.autograd.grad(wide(losses).sum(), [zero for _, zero in pairs], allow_unused=True)
        return [(z, torch.zeros_like(z) if g is None else g) for (z, _), g in zip(pairs, grads)]

    def losses(self, batch: Batch, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example losses ``[N]`` (float64) with the group units where ``keep`` (bool ``[U]``)
        is False zeroed at every mask point (``keep=None``: nothing zeroed)."""
        masks = None if keep is None else [point.keep_mask(keep) for point in self.points]

        def apply(k: int, z: torch.Tensor) -> torch.Tensor:
            if masks is None:
                return z.clone()
            point = self.points[k]
            mask = masks[k].to(z.device).reshape(unit_mask_shape(z.dim(), point.axis, point.size))
            return z.masked_fill(~mask, 0)

        with torch.no_grad():
            output = self._run(batch, apply)
            return per_example_loss(self.criterion, output, batch.target, batch.size).to(torch.float64)

    def sum_per_unit(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[N, U]`` float64: for each group unit, the sum of ``tensors[p]`` (shaped like the
        tensor at point p) over every position of the unit at every point."""
        total: torch.Tensor | None = None
        for point, t in zip(self.points, tensors):
            per_position = units_view(t, point.axis).to(torch.float64).sum(dim=2)  # [N, size]
            if total is None:
                total = torch.zeros(per_position.shape[0], self.num_units, dtype=torch.float64,
                                    device=per_position.device)
            positions, units = point.positions.to(per_position.device), point.units.to(per_position.device)
            total.index_add_(1, units, per_position.index_select(1, positions))
        assert total is not None
        return total


# --------------------------------------------------------------------------------------------
# run(module) inside a larger group
# --------------------------------------------------------------------------------------------
def warn_if_coupled(graph: Any, module: nn.Module, call_index: int, stacklevel: int = 4) -> None:
    """Warn (:class:`CoupledGroupWarning`) when ``module``'s output units belong to a group with
    other sources. Uses the dependency analysis cached on ``graph`` (no second trace); silent when
    the analysis is not available for this model or module."""
    if getattr(graph, "method", None) != "fx":
        return
    try:
        from torchpruner.graph.dependency import get_dependency_graph

        groups = get_dependency_graph(graph).groups_of(module, call_index)
    except Exception as error:  # the analysis is optional here: never let it break scoring
        logger.debug("no coupled-group check for %s: %s", type(module).__name__, error)
        return
    for group in groups:
        sources = source_modules(group)
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
