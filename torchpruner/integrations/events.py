"""What a training-framework callback does at a pruning event, without the framework.

:class:`ScheduledPruning` holds the policy (which epochs or steps, which metric, what fraction of
every coupled group) and, when an event is due, prunes the model with the trainer's own optimizer:
one :func:`~torchpruner.schedule.prune_groups` plan over every group, validated before anything
changes, with every per-element optimizer state tensor sliced in place. The optimizer object, its
param groups and its LR scheduler stay the same; its momentum and moments keep the values of the
units that stay. Each event leaves a :class:`PruningRecord` (the plan, parameter and FLOP counts,
group widths) that the callbacks send to the trainer's logger.

Arguments are checked when the policy is built (a TypeError or ValueError names the argument), so
a wrong schedule fails before training starts, not at the first event.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn

from torchpruner._state import unwrap_model
from torchpruner.attributions import AttributionMetric
from torchpruner.graph.dependency import Group
from torchpruner.pruner import Plan, Pruner
from torchpruner.rules import DROPOUT_POLICIES
from torchpruner.schedule import _check_count, _check_fraction, prune_groups
from torchpruner.utils import count_flops, count_parameters

logger = logging.getLogger(__name__)

__all__ = ["PruningRecord", "ScheduledPruning", "unwrap_optimizer"]

Scores = AttributionMetric | Callable[[Group], np.ndarray]


@dataclass
class PruningRecord:
    """One pruning event.

    Attributes:
        epoch: the epoch (0-based) during or after which the event ran.
        step: optimizer steps taken before the event.
        plan: the applied :class:`~torchpruner.pruner.Plan` (``print(record.plan)`` lists every change).
        parameters_before, parameters: parameter elements before and after.
        flops_before, flops: FLOPs of one forward pass of the example input before and after
            (None when FLOP counting is off).
        removed_units: units removed, summed over the groups.
        widths: ``{source layer name: units left}`` for every group after the event.
    """

    epoch: int
    step: int
    plan: Plan
    parameters_before: int
    parameters: int
    flops_before: int | None
    flops: int | None
    removed_units: int
    widths: dict[str, int] = field(default_factory=dict)

    def metrics(self, prefix: str = "pruning/") -> dict[str, float]:
        """The numbers a logger takes: parameter and FLOP counts, units and parameters removed."""
        values: dict[str, float] = {
            "parameters": float(self.parameters),
            "removed_parameters": float(self.parameters_before - self.parameters),
            "removed_units": float(self.removed_units),
        }
        if self.flops is not None:
            values["flops"] = float(self.flops)
        return {prefix + key: value for key, value in values.items()}


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The ``torch.optim`` optimizer inside a framework's wrapper (accelerate's
    ``AcceleratedOptimizer.optimizer``, Lightning's ``LightningOptimizer._optimizer``)."""
    seen = 0
    while optimizer is not None and seen < 8:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return cast("torch.optim.Optimizer | None", optimizer)


def _check_moments(name: str, values: Iterable[int] | None) -> frozenset[int]:
    if values is None:
        return frozenset()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a collection of ints (0-based), got {values!r}")
    checked: set[int] = set()
    for value in values:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must hold ints >= 0, got {value!r}")
        checked.add(int(value))
    return frozenset(checked)


class ScheduledPruning:
    """Prune ``fraction`` of every coupled group at chosen epochs or steps.

    Args:
        fraction: fraction of each group's current units removed at every event, in [0, 1).
        metric: how units are scored: an attribution metric built on the model that is pruned
            (``TaylorAttributionMetric(model, val_loader, F.cross_entropy)``; its ``run(group)``
            scores each group), a function ``group -> one score per unit``, or None for the
            per-layer normalised weight norm. Higher = keep.
        epochs: prune at the end of these epochs (0-based).
        steps: prune after these optimizer steps (``steps=[100]``: after the 100th step).
        input_size: input shape without the batch dim, to trace the model (or ``example_inputs``).
        example_inputs: a tensor, tuple or dict of inputs for the trace.
        model: the module to prune; None: the module the trainer trains. A metric must be built
            on this module.
        ignored_layers, global_ranking, min_units, round_to: as in
            :func:`~torchpruner.schedule.prune_groups`.
        dropout_policy: as in :class:`~torchpruner.pruner.Pruner`.
        count_flops: count FLOPs before and after each event (one extra forward pass each).

    Raises:
        TypeError / ValueError: naming the argument, when the policy is built.
    """

    def __init__(
        self,
        fraction: float = 0.3,
        *,
        metric: Scores | None = None,
        epochs: Iterable[int] | None = None,
        steps: Iterable[int] | None = None,
        input_size: Sequence[int] | None = None,
        example_inputs: Any = None,
        model: nn.Module | None = None,
        ignored_layers: Sequence[nn.Module] = (),
        global_ranking: bool = False,
        min_units: int = 1,
        round_to: int = 1,
        dropout_policy: str = "linear",
        count_flops: bool = True,
    ) -> None:
        self.fraction = _check_fraction("fraction", fraction)
        self.epochs = _check_moments("epochs", epochs)
        self.steps = _check_moments("steps", steps)
        if not self.epochs and not self.steps:
            raise ValueError("give epochs=[...] or steps=[...] (when to prune); both are empty")
        if metric is not None and not callable(metric) and not isinstance(metric, AttributionMetric):
            raise TypeError(
                f"metric must be an attribution metric, a function group -> scores or None, got {type(metric).__name__}"
            )
        if input_size is None and example_inputs is None:
            raise ValueError(
                "give input_size= (the input shape without the batch dim) or example_inputs=, "
                "so that the model can be traced to find its coupled groups"
            )
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (the module to prune) or None, got {type(model).__name__}")
        if dropout_policy not in DROPOUT_POLICIES:
            raise ValueError(f"dropout_policy must be one of {sorted(DROPOUT_POLICIES)}, got {dropout_policy!r}")
        self.min_units = _check_count("min_units", min_units, 0)
        self.round_to = _check_count("round_to", round_to, 1)
        self.metric = metric
        self.input_size = input_size
        self.example_inputs = example_inputs
        self.model = model
        self.ignored_layers = tuple(ignored_layers)
        self.global_ranking = bool(global_ranking)
        self.dropout_policy = dropout_policy
        self.count_flops = bool(count_flops)
        self.records: list[PruningRecord] = []
        self._done_steps: set[int] = set()
        self._done_epochs: set[int] = set()

    # -- when ------------------------------------------------------------------------------

    def due_at_step(self, step: int) -> bool:
        """An event is due after optimizer step ``step`` (each listed step fires once)."""
        return step in self.steps and step not in self._done_steps

    def due_at_epoch(self, epoch: int) -> bool:
        """An event is due at the end of epoch ``epoch`` (each listed epoch fires once)."""
        return epoch in self.epochs and epoch not in self._done_epochs

    # -- what ------------------------------------------------------------------------------

    def target(self, trained: nn.Module) -> nn.Module:
        """The module that is pruned: ``model`` if given, else the trained module."""
        return unwrap_model(self.model if self.model is not None else trained)

    def prune(self, trained: nn.Module, optimizer: Any, *, epoch: int, step: int, at_step: bool) -> PruningRecord:
        """Score and prune now, with ``optimizer`` (a wrapper is unwrapped) kept live.

        Raises:
            ValueError: the metric was built on another model, the model is not part of the
                trained module, or the Pruner refuses the plan (nothing changed then).
        """
        model = self.target(trained)
        if self.model is not None and all(m is not model for m in unwrap_model(trained).modules()):
            raise ValueError(
                f"model= ({type(model).__name__}) is not part of the module being trained "
                f"({type(trained).__name__}); pass one of its submodules"
            )
        optimizer = unwrap_optimizer(optimizer)
        scores = self._scores(model)
        pruner = Pruner(
            model,
            self.input_size,
            optimizer=optimizer,
            example_inputs=self.example_inputs,
            dropout_policy=self.dropout_policy,
        )
        parameters_before = count_parameters(model)
        flops_before = self._flops(model)
        widths_before = group_widths(pruner.groups(self.ignored_layers))
        plan = prune_groups(
            pruner,
            self.fraction,
            scores=scores,
            global_ranking=self.global_ranking,
            min_units=self.min_units,
            round_to=self.round_to,
            ignored_layers=self.ignored_layers,
        )
        (self._done_steps if at_step else self._done_epochs).add(step if at_step else epoch)
        widths = group_widths(pruner.groups(self.ignored_layers))
        removed = sum(width - widths.get(name, 0) for name, width in widths_before.items())
        record = PruningRecord(
            epoch=epoch,
            step=step,
            plan=plan,
            parameters_before=parameters_before,
            parameters=count_parameters(model),
            flops_before=flops_before,
            flops=self._flops(model),
            removed_units=removed,
            widths=widths,
        )
        self.records.append(record)
        logger.info(
            "pruned at epoch %d, step %d: %s; parameters %d -> %d",
            epoch,
            step,
            plan.description,
            parameters_before,
            record.parameters,
        )
        logger.debug("%s", plan)
        return record

    def _scores(self, model: nn.Module) -> Callable[[Group], np.ndarray] | None:
        if isinstance(self.metric, AttributionMetric):
            scored = unwrap_model(self.metric.model)
            if scored is not model:
                raise ValueError(
                    f"the metric scores {type(scored).__name__}, but the module pruned is "
                    f"{type(model).__name__}: build the metric on the module that is pruned "
                    "(or pass that module as model=)"
                )
            return self.metric.run
        return self.metric

    def _flops(self, model: nn.Module) -> int | None:
        if not self.count_flops:
            return None
        if self.example_inputs is not None:
            return int(count_flops(model, example_inputs=self.example_inputs))
        return int(count_flops(model, input_size=self.input_size))


def group_widths(groups: Sequence[Group]) -> dict[str, int]:
    """``{name of the group's first source layer: units}`` for every group."""
    widths: dict[str, int] = {}
    for group in groups:
        sources = [m for m in group.members if m.direction in ("out", "param")]
        name = (
            sources[0].module_name + ("." + sources[0].parameter if sources[0].parameter else "")
            if sources
            else f"group {group.index}"
        )
        widths[name] = group.num_units
    return widths
