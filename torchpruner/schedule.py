"""Thin helpers over coupled groups: prune a fraction of every group, once or on a schedule.

Built only from public pieces: ``pruner.groups()`` (:class:`~torchpruner.graph.dependency.Group`),
a score per group unit, and one validated plan that removes the chosen units of every group at
once (with optimizer surgery). ``Pruner``, ``prune_groups`` and ``IterativePruning`` are all
re-exported by the ``torchpruner`` package::

    pruner = Pruner(model, input_size=(3, 224, 224), optimizer=optimizer)
    plan = prune_groups(pruner, fraction=0.3)                       # 30% of every group, L1 scores
    plan = prune_groups(pruner, fraction=0.3, global_ranking=True)  # one ranking over all groups
    plan = prune_groups(pruner, ratios={model.layer1[0].conv1: 0.5}, fraction=0.0)

    schedule = IterativePruning(pruner, target=0.5, steps=5, every=200)
    for step, (x, y) in enumerate(loader):
        ...; optimizer.step()
        schedule.step()          # prunes a little at steps 200, 400, ... 1000

Every argument is checked before anything changes (a TypeError or ValueError names it): fractions,
``ratios`` values and ``target`` are numbers in [0, 1); ``steps``, ``every`` and ``round_to`` are
positive ints, ``min_units`` a non-negative int; each ``ratios`` key is a layer of the model whose
output units a group holds; scores are never NaN (and finite in a global ranking). A refused call
leaves the model, the optimizer and the schedule as they were.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch.nn as nn

from torchpruner.attributions.base import AttributionMetric
from torchpruner.attributions.methods.weight_norm import group_weight_norms
from torchpruner.graph.dependency import Group
from torchpruner.pruner import Plan, Pruner

logger = logging.getLogger(__name__)

__all__ = ["weight_norm_scores", "select_units", "prune_groups", "IterativePruning"]

ScoreFn = Callable[[Group], np.ndarray]


def weight_norm_scores(group: Group) -> np.ndarray:
    """L1 norm of every weight slice removed with each group unit, normalised per layer.

    The same definition as ``WeightNormAttributionMetric(...).run(group)`` (one implementation:
    :func:`torchpruner.attributions.methods.weight_norm.group_weight_norms`): each member's per-unit
    L1 norm divided by that member's mean over the group's units, summed over members.
    """
    return group_weight_norms(group).numpy()


def _check_fraction(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1) (NaN, bools and non-numbers refused, naming ``name``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r} ({type(value).__name__})")
    fraction = float(value)
    if not 0.0 <= fraction < 1.0:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1) (the fraction of units removed), got {value!r}")
    return fraction


def _check_count(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (floats and bools refused, naming ``name``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_scores(scores: ScoreFn | None) -> None:
    if scores is not None and not callable(scores):
        raise TypeError(
            f"scores must be a function group -> array of one score per unit (or None), got {type(scores).__name__}"
        )


def _layer_label(module: nn.Module, names: Mapping[int, str]) -> str:
    name = names.get(id(module))
    if name is not None:
        return f"'{name}'"
    text = repr(module).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _check_ratios(
    ratios: Mapping[nn.Module, float] | None, groups: Sequence[Group], names: Mapping[int, str]
) -> list[tuple[nn.Module, float]]:
    """Each ``ratios`` entry checked: a layer that is a source of one of ``groups``, a fraction in [0, 1)."""
    if ratios is None:
        return []
    if not isinstance(ratios, Mapping):
        raise TypeError(f"ratios must map layers (nn.Module) to fractions, got {type(ratios).__name__}")
    sources = [module for group in groups for module in group.source_modules]
    checked = []
    for module, value in ratios.items():
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"ratios keys must be layers (nn.Module) of the model, got {module!r} ({type(module).__name__})"
            )
        label = _layer_label(module, names)
        ratio = _check_fraction(f"ratios[{label}]", value)
        if all(module is not source for source in sources):
            raise ValueError(
                f"ratios names {label}, which is not a layer whose output units one of the groups holds: "
                f"it is ignored (ignored_layers), a model output (pass include_outputs=True), in no "
                f"prunable group, or a layer of another model"
            )
        checked.append((module, ratio))
    return checked


def _member_names(groups: Sequence[Group]) -> dict[int, str]:
    return {id(member.module): member.module_name for group in groups for member in group.members}


ROUNDINGS = ("floor", "nearest", "ceil")


def _check_rounding(rounding: Any) -> str:
    if not isinstance(rounding, str) or rounding not in ROUNDINGS:
        raise ValueError(
            f"rounding must be 'floor' (at most the fraction), 'nearest' or 'ceil' (at least the "
            f"fraction), got {rounding!r}"
        )
    return rounding


def _units_of(fraction: float, num_units: int, rounding: str = "floor", multiple: int = 1) -> int:
    """``fraction * num_units`` rounded to a multiple of ``multiple`` (down, to the nearest, halves
    up, or up), robust to binary floats (0.29 * 100 is 28.999999999999996)."""
    exact = fraction * num_units / multiple
    if rounding == "floor":
        steps = math.floor(exact + 1e-9)
    elif rounding == "nearest":
        steps = math.floor(exact + 0.5 + 1e-9)
    else:
        steps = math.ceil(exact - 1e-9)
    return int(steps) * multiple


def _as_scores(group: Group, scores: ScoreFn | None) -> np.ndarray:
    values = np.asarray(weight_norm_scores(group) if scores is None else scores(group), dtype=np.float64)
    if values.shape != (group.num_units,):
        raise ValueError(f"scores for group {group.index} must have shape ({group.num_units},), got {values.shape}")
    nan = np.flatnonzero(np.isnan(values))
    if nan.size:
        raise ValueError(
            f"scores for group {group.index} are NaN at units {nan[:10].tolist()}; the score function "
            f"must give every unit a number (higher = keep)"
        )
    return values


def _all_scores(groups: Sequence[Group], scores: ScoreFn | None) -> dict[Group, np.ndarray]:
    """Each group's checked scores. An attribution metric's own ``run`` is called once for all
    the groups, as ``run_all(groups)``: the same scores (to float rounding), and one pass over the
    data instead of one per group for the metrics that share a pass (Taylor, Sensitivity, APoZ)."""
    metric = getattr(scores, "__self__", None)
    if isinstance(metric, AttributionMetric) and getattr(scores, "__name__", None) == "run" and len(groups) > 1:
        logger.debug("scoring %d groups with one %s.run_all", len(groups), type(metric).__name__)
        computed = dict(zip(groups, metric.run_all(list(groups)).values()))
        return {g: _as_scores(g, computed.__getitem__) for g in groups}
    return {g: _as_scores(g, scores) for g in groups}


def _lowest(group: Group, values: np.ndarray, count: int) -> list[int]:
    """The ``count`` lowest-scored units of ``group`` (rounded down to what grouped convolutions
    allow: the same number from every cell of :meth:`Group.count_cells`)."""
    cells = group.count_cells()
    order = np.argsort(values, kind="stable")
    if cells is None:
        return sorted(int(u) for u in order[:count])
    num_cells = int(cells.max()) + 1
    per_cell = count // num_cells
    cell_in_order = cells[order]
    chosen: list[int] = []
    for cell in range(num_cells):
        members = order[cell_in_order == cell]  # the cell's units, lowest score first
        if per_cell >= len(members):
            return []  # a cell would be emptied: the grouped layout cannot lose this many
        chosen += members[:per_cell].tolist()
    return sorted(chosen)


def select_units(
    groups: Sequence[Group],
    fraction: float = 0.3,
    ratios: Mapping[nn.Module, float] | None = None,
    scores: ScoreFn | None = None,
    global_ranking: bool = False,
    min_units: int = 1,
    round_to: int = 1,
    rounding: str = "floor",
) -> dict[Group, list[int]]:
    """Choose the lowest-scored units of each group.

    Args:
        groups: the groups (from ``pruner.groups()``).
        fraction: fraction of each group's units to remove (the default for groups not in ``ratios``),
            in [0, 1).
        ratios: per-layer fractions in [0, 1), keyed by a layer whose output units the group holds (a
            source); a key that is the source of none of ``groups`` is refused.
        scores: ``scores(group) -> array (num_units,)``; higher = keep. Default: per-layer
            normalised weight L1 norms (:func:`weight_norm_scores`). An attribution metric's
            ``run`` fits here (``scores=metric.run``): it is then called once for all the
            groups, as ``metric.run_all(groups)`` (the same scores, one pass over the data for
            the metrics that share a pass). NaN scores are refused.
        global_ranking: rank all groups' units together after normalising each group's scores by
            their mean (per-layer normalisation), removing ``fraction`` of all units in total (at
            most: ``min_units`` and ``round_to`` are applied per group afterwards). Not with ``ratios``;
            the scores must be finite (each group is divided by its mean).
        min_units: never leave a group with fewer units (an int >= 0).
        round_to: remove a multiple of this many units per group (hardware-friendly widths; an int >= 1).
        rounding: how ``fraction * units`` becomes a count (of multiples of ``round_to``):
            ``"floor"`` (default: never more than the fraction; 0.3 of 3 attention heads is none),
            ``"nearest"`` (halves up: 0.3 of 3 heads is one) or ``"ceil"`` (at least the fraction).
            ``min_units`` still caps it. With ``global_ranking`` it rounds the total.
    """
    fraction = _check_fraction("fraction", fraction)
    min_units = _check_count("min_units", min_units, 0)
    round_to = _check_count("round_to", round_to, 1)
    rounding = _check_rounding(rounding)
    _check_scores(scores)
    if global_ranking and ratios:
        raise ValueError(
            "ratios= and global_ranking=True do not combine: a global ranking decides each "
            "group's share itself; use one or the other"
        )
    checked_ratios = _check_ratios(ratios, groups, _member_names(groups))
    chosen: dict[Group, list[int]] = {}
    per_group = _all_scores(groups, scores)

    def limit(group: Group, count: int) -> int:
        count = min(count, group.num_units - max(1, min_units))
        return max(0, (count // round_to) * round_to)

    if global_ranking:
        entries = []
        for group, values in per_group.items():
            infinite = np.flatnonzero(~np.isfinite(values))
            if infinite.size:
                raise ValueError(
                    f"scores for group {group.index} are infinite at units {infinite[:10].tolist()}; "
                    f"global_ranking=True divides each group's scores by their mean, which needs "
                    f"finite scores"
                )
            mean = np.abs(values).mean()
            normalised = values / mean if mean > 0 else values
            entries += [(float(v), group.index, u, group) for u, v in enumerate(normalised)]
        total = _units_of(fraction, len(entries), rounding)
        entries.sort(key=lambda e: (e[0], e[1], e[2]))
        counts: dict[Group, int] = {}
        for _value, _, unit, group in entries:
            if total <= 0:
                break
            if counts.get(group, 0) + 1 > limit(group, group.num_units):
                continue
            chosen.setdefault(group, []).append(unit)
            counts[group] = counts.get(group, 0) + 1
            total -= 1
        for group in list(chosen):
            keep_count = limit(group, len(chosen[group]))
            if group.count_cells() is None:
                chosen[group] = sorted(chosen[group][:keep_count]) if keep_count else []
            else:  # the same count from every conv group: re-chosen by score within each cell
                chosen[group] = _lowest(group, per_group[group], keep_count)
            if not chosen[group]:
                del chosen[group]
        return chosen
    for group, values in per_group.items():
        ratio = fraction
        for module, value in checked_ratios:
            if any(module is m for m in group.source_modules):
                ratio = value
                break
        count = limit(group, _units_of(ratio, group.num_units, rounding, round_to))
        units = _lowest(group, values, count) if count > 0 else []
        if units:
            chosen[group] = units
    return chosen


def prune_groups(
    pruner: Pruner,
    fraction: float = 0.3,
    ratios: Mapping[nn.Module, float] | None = None,
    scores: ScoreFn | None = None,
    global_ranking: bool = False,
    min_units: int = 1,
    round_to: int = 1,
    ignored_layers: Sequence[nn.Module] = (),
    include_outputs: bool = False,
    dry_run: bool = False,
    rounding: str = "floor",
) -> Plan:
    """Prune ``fraction`` of every prunable group of the pruner's model in one validated plan.

    Same arguments as :func:`select_units`, plus ``ignored_layers`` / ``include_outputs`` (see
    ``Pruner.groups``). Returns the :class:`~torchpruner.pruner.Plan` (applied unless ``dry_run``);
    model, optimizer state, gradients and Dropout rates are fixed in place. Every argument is
    checked before anything changes; a ``ratios`` key that is not a layer of the pruner's model is
    refused, naming it.
    """
    _check_fraction("fraction", fraction)
    _check_count("min_units", min_units, 0)
    _check_count("round_to", round_to, 1)
    _check_rounding(rounding)
    _check_scores(scores)
    names = {id(module): name for name, module in pruner.model.named_modules()}
    for module in ratios or {}:
        if isinstance(module, nn.Module) and id(module) not in names:
            raise ValueError(
                f"ratios names a layer that is not a layer of the pruner's model: "
                f"{_layer_label(module, names)}; key ratios by the layers of the model being pruned"
            )
    groups = pruner.groups(ignored_layers, include_outputs)
    _check_ratios(ratios, groups, names)  # named by the model: the layer may be in no group
    selection = select_units(groups, fraction, ratios, scores, global_ranking, min_units, round_to, rounding)
    plan = pruner.plan_groups(selection, f"prune {len(selection)} of {len(groups)} groups")
    if not dry_run and selection:
        plan.apply(pruner.model, pruner.optimizer)
    return plan


class IterativePruning:
    """Prune a little every ``every`` steps until ``target`` of every group is gone.

    Call :meth:`step` once per training step (after ``optimizer.step()``); at steps ``every``,
    ``2*every``, ... ``steps*every`` each group is cut to ``(1 - target * k / steps)`` of its
    original width (lowest scores first) with the live optimizer.

    Args:
        pruner: the :class:`~torchpruner.pruner.Pruner` (holds the model and the optimizer).
        target: fraction of each group's original units removed in the end, in [0, 1).
        steps: number of pruning events (an int >= 1).
        every: training steps between events (an int >= 1).
        scores, min_units, round_to, ignored_layers, rounding: as in :func:`prune_groups` (the
            rounding applies to each event's count of removed original units).

    A refused event (NaN scores, a plan the Pruner refuses) raises from :meth:`step` and leaves the
    model, the optimizer and the schedule's counters as they were.
    """

    def __init__(
        self,
        pruner: Pruner,
        target: float = 0.5,
        steps: int = 5,
        every: int = 100,
        scores: ScoreFn | None = None,
        min_units: int = 1,
        round_to: int = 1,
        ignored_layers: Sequence[nn.Module] = (),
        rounding: str = "floor",
    ) -> None:
        target = _check_fraction("target", target)
        steps = _check_count("steps", steps, 1)
        every = _check_count("every", every, 1)
        min_units = _check_count("min_units", min_units, 0)
        round_to = _check_count("round_to", round_to, 1)
        self.rounding = _check_rounding(rounding)
        _check_scores(scores)
        self.pruner, self.target, self.steps, self.every = pruner, target, steps, every
        self.scores, self.min_units, self.round_to, self.ignored_layers = scores, min_units, round_to, ignored_layers
        self.step_count = 0
        self.events = 0
        self.plans: list[Any] = []
        self._original: dict[str, int] = {}
        for group in pruner.groups(ignored_layers):
            self._original[self._key(group)] = group.num_units

    @staticmethod
    def _key(group: Group) -> str:
        sources = [m for m in group.members if m.direction in ("out", "param")]
        return sources[0].module_name + "/" + (sources[0].parameter or "") if sources else str(group.index)

    def step(self) -> Any | None:
        """Advance one training step; returns the applied plan at a pruning event, else None."""
        step_count = self.step_count + 1
        if self.events >= self.steps or step_count % self.every:
            self.step_count = step_count
            return None
        event = self.events + 1  # the counters move only once the event's plan has landed
        fraction = self.target * event / self.steps
        selection: dict[Group, list[int]] = {}
        for group in self.pruner.groups(self.ignored_layers):
            original = self._original.get(self._key(group))
            if original is None:
                continue
            removed = _units_of(fraction, original, self.rounding, self.round_to)
            wanted = max(self.min_units, 1, original - removed)  # a group keeps a unit, as in select_units
            count = group.num_units - wanted
            count = (count // self.round_to) * self.round_to if count > 0 else 0
            if count <= 0:
                continue
            values = _as_scores(group, self.scores)
            selection[group] = sorted(int(u) for u in np.argsort(values, kind="stable")[:count])
        plan = self.pruner.plan_groups(selection, f"iterative pruning event {event}/{self.steps}")
        if selection:
            plan.apply(self.pruner.model, self.pruner.optimizer)
        self.step_count, self.events = step_count, event
        self.plans.append(plan)
        logger.info("%s", plan.description)
        return plan
