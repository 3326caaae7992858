"""Soft pruning: persistent 0/1 masks on units, trained with, then turned into one real prune.

A mask zeroes, in place, every parameter slice that pruning the units would remove: the sources'
output rows and biases, the BatchNorm scales and shifts, the consumers' input columns (the slices
are those of the Pruner's own plan, so what is masked is exactly what is pruned). The masked model
therefore computes what the pruned model computes (eval and train mode; not with a LayerNorm /
GroupNorm over the pruned dim, whose statistics change: a warning says so), while every tensor
keeps its shape, so training can go on and the choice can still change::

    masker = Masker(model, input_size=(3, 32, 32))
    masker.mask(model.conv1, [0, 5])                       # explicit units of a layer (its whole group)
    masker.mask_by_rate(pruner.groups(), 0.3, scores=FPGMAttributionMetric(model, None, None))
    print(masker.zero_ratio())                             # per layer, the fraction of zero weights
    with masker.attach(optimizer):                         # re-zero after every optimizer.step()
        train(...)
    plan = masker.materialize(pruner)                      # one real prune, live optimizer

Without :meth:`Masker.attach` the masked weights may regrow during training (soft filter pruning:
mask again, by a criterion, to choose anew); :meth:`Masker.apply` zeroes them once more. The only
hooks are the optimizer step hooks of ``attach``; they live until :meth:`Masker.remove` or the end
of a ``with masker:`` block. :meth:`Masker.state_dict` / :meth:`Masker.load_state_dict` save and
restore the masks next to the model's own state dict (plain tensors, ``weights_only=True`` loads).

Masking a layer or a group again replaces its mask (an empty list unmasks it). Every argument is
checked before anything changes: a refused call leaves the model and the masks as they were.
"""

from __future__ import annotations

import logging
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from torchpruner.attributions import AttributionMetric
from torchpruner.attributions.groups import inexact_members, member_slices
from torchpruner.graph import unwrap_model
from torchpruner.graph.dependency import Group, get_dependency_graph
from torchpruner.pruner import Plan, Pruner
from torchpruner.rules import TensorSlice, get_slicing_rule, normalize_indices
from torchpruner.schedule import select_units

logger = logging.getLogger(__name__)

__all__ = ["Masker"]

Scores = Callable[[Group], np.ndarray] | AttributionMetric | None


@dataclass
class _Mask:
    """The masked units of one coupled group and the parameter masks they make (True = kept)."""

    key: str
    units: list[int]
    num_units: int
    keep: dict[str, torch.Tensor]


def group_key(group: Group) -> str:
    """A name for ``group`` that a copy of the model (or the model reloaded) gives the same group:
    its first source (``"conv1"``, ``"blocks.0.gain"`` for a bare parameter), with ``#p`` when the
    group starts at position p of that source (a source split into several groups)."""
    for member in member_slices(group):
        if member.direction in ("out", "param"):
            name = member.module_name + (f".{member.parameter}" if member.parameter else "")
            first = int(member.positions.min()) if len(member.positions) else 0
            return name if first == 0 else f"{name}#{first}"
    raise ValueError(f"group {group.index} has no layer that owns its units: it cannot be masked")


def _keep_masks(plan: Plan) -> dict[str, torch.Tensor]:
    """Every parameter slice of ``plan`` as a bool mask of the parameter's shape (True = kept)."""
    masks: dict[str, torch.Tensor] = {}
    for edit in plan.edits:
        if not isinstance(edit, TensorSlice) or not edit.is_parameter:
            continue
        keep = torch.zeros(edit.old_shape, dtype=torch.bool)
        index: list[Any] = [slice(None)] * len(edit.old_shape)
        if edit.group_keep is None:
            index[edit.axis] = edit.keep
            keep[tuple(index)] = True
        else:  # grouped layers: block j of dim 0 keeps group_keep[j] along the axis
            for block, block_keep in zip(keep.chunk(len(edit.group_keep), dim=0), edit.group_keep):
                index[edit.axis] = block_keep
                block[tuple(index)] = True
        masks[edit.qualified_name] = keep
    return masks


def _check_rates(rates: Any) -> tuple[float, Mapping[nn.Module, float] | None]:
    """``rate_dist_per_layer`` as ``(fraction, ratios)`` for :func:`select_units`."""
    if isinstance(rates, Mapping):
        return 0.0, rates
    if isinstance(rates, bool) or not isinstance(rates, numbers.Real):
        raise TypeError(
            f"rate_dist_per_layer must be a fraction in [0, 1) for every layer or a dict "
            f"{{layer: fraction}}, got {rates!r} ({type(rates).__name__})"
        )
    return float(rates), None


class Masker:
    """Persistent 0/1 masks on the units of a model's layers or coupled groups.

    Args:
        model: the model (``torch.compile`` wrappers are unwrapped).
        input_size, example_inputs, device: as for :class:`~torchpruner.pruner.Pruner`; needed to
            mask a layer by its output units (the data flow tells which group they belong to).
            Masking groups from ``pruner.groups()`` needs neither.
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: Sequence[int] | None = None,
        *,
        example_inputs: Any = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = unwrap_model(model)
        self._planner = Pruner(self.model, input_size, device, example_inputs=example_inputs)
        self._masks: dict[str, _Mask] = {}
        self._handles: list[RemovableHandle] = []

    # -- choosing ----------------------------------------------------------------------------

    def mask(self, target: nn.Module | Group, units: Any) -> None:
        """Mask ``units`` of ``target`` and zero them now.

        Args:
            target: a layer of the model (``units`` are its output units; the whole coupled group
                they belong to is masked, as :meth:`Pruner.prune_model` would prune it) or a group
                from ``pruner.groups()`` (``units`` index ``range(group.num_units)``).
            units: the units (a list, array or int tensor); replaces the target's earlier mask, an
                empty list unmasks it.

        Raises:
            ValueError / TypeError: naming the problem (bad units, every unit of a group, a layer
                of another model, a group of another model); nothing changes.
        """
        self._commit(self._masks_of(self._selection_of(target, units)))

    def mask_by_rate(
        self,
        groups: Sequence[Group],
        rate_dist_per_layer: float | Mapping[nn.Module, float],
        scores: Scores = None,
        *,
        global_ranking: bool = False,
        min_units: int = 1,
        round_to: int = 1,
    ) -> dict[Group, list[int]]:
        """Mask the lowest-scored units of every group: ``rate_dist_per_layer`` of them.

        Args:
            groups: the groups (``pruner.groups()``); each one's mask is replaced (a group that
                loses no unit is unmasked).
            rate_dist_per_layer: one fraction in [0, 1) for every group, or ``{layer: fraction}``
                keyed by a source layer of a group (groups not named: nothing masked).
            scores: the criterion: an attribution metric (its ``run(group)`` is called, e.g.
                ``FPGMAttributionMetric(model, None, None)``) or ``scores(group) -> array``;
                None: per-layer normalised L1 weight norms. Higher = keep.
            global_ranking, min_units, round_to: as in :func:`torchpruner.schedule.select_units`.

        Returns:
            the masked ``{group: units}``.
        """
        fraction, ratios = _check_rates(rate_dist_per_layer)
        score_fn = scores.run if isinstance(scores, AttributionMetric) else scores
        selection = select_units(groups, fraction, ratios, score_fn, global_ranking, min_units, round_to)
        self._commit(self._masks_of({group: selection.get(group, []) for group in groups}))
        return selection

    def layer_by_layer(
        self,
        groups: Sequence[Group],
        rate_dist_per_layer: float | Mapping[nn.Module, float],
        scores: Scores = None,
        **options: Any,
    ) -> Iterator[tuple[Group, list[int]]]:
        """Mask one group at a time (the seed's ``pre_layer`` schedule): each iteration scores
        the next group on the model as it is then (train in between) and masks it; yields
        ``(group, units)`` for every group that loses units. Options as for :meth:`mask_by_rate`."""
        for group in groups:
            units = self.mask_by_rate([group], rate_dist_per_layer, scores, **options).get(group)
            if units:
                yield group, units

    def _selection_of(self, target: Any, units: Any) -> dict[Group, Any]:
        if isinstance(target, Group):
            return {target: units}
        if not isinstance(target, nn.Module):
            raise TypeError(
                f"mask a layer (nn.Module) of the model or a group from pruner.groups(), got {type(target).__name__}"
            )
        if self._planner.input_size is None and self._planner.example_inputs is None:
            raise ValueError(
                "masking a layer follows the data flow of the model: create the Masker with "
                "input_size= or example_inputs=, or mask a group from pruner.groups()"
            )
        self._planner.plan(target, units)  # checks the layer and the units, naming them; changes nothing
        name = next(n for n, m in self.model.named_modules() if m is target)
        rule = get_slicing_rule(target)
        num_units = rule.out_units(target) if rule is not None else None
        assert num_units is not None  # plan() above refuses a layer without a rule or output units
        remove = normalize_indices(units, num_units, name)
        dependencies = get_dependency_graph(self._planner.graph())
        if len(remove) == 0:
            return {group: [] for group in dependencies.groups_of(target)}
        return dependencies.select(target, remove.tolist())

    def _masks_of(self, selection: Mapping[Group, Any]) -> list[tuple[str, _Mask | None]]:
        """Plan every group's mask (nothing changes yet): ``[(key, mask or None to unmask)]``."""
        planned: list[tuple[str, _Mask | None]] = []
        for group, units in selection.items():
            if not isinstance(group, Group):
                raise TypeError(f"expected a group from pruner.groups(), got {type(group).__name__}")
            plan = self._planner.plan_groups({group: units}, "mask")
            key = group_key(group)
            if plan.is_empty:
                planned.append((key, None))
                continue
            removed = normalize_indices(units, group.num_units, f"group {group.index}").tolist()
            inexact = inexact_members(group)
            if inexact:
                warnings.warn(
                    f"masking units of group {group.index} ({key}) is not exactly pruning them: pruning "
                    f"also changes {'; '.join(inexact[:3])}",
                    UserWarning,
                    stacklevel=4,
                )
            planned.append((key, _Mask(key, removed, group.num_units, _keep_masks(plan))))
        return planned

    def _commit(self, planned: list[tuple[str, _Mask | None]]) -> None:
        for key, mask in planned:
            if mask is None:
                self._masks.pop(key, None)
            else:
                self._masks[key] = mask
        self.apply()

    # -- acting ------------------------------------------------------------------------------

    @property
    def masked_units(self) -> dict[str, list[int]]:
        """``{group key: masked units}`` (the key names the group's first source layer)."""
        return {key: list(mask.units) for key, mask in self._masks.items()}

    def keep_masks(self) -> dict[str, torch.Tensor]:
        """``{parameter name: bool mask}`` (True = kept), all masks combined."""
        combined: dict[str, torch.Tensor] = {}
        for mask in self._masks.values():
            for name, keep in mask.keep.items():
                combined[name] = combined[name] & keep if name in combined else keep.clone()
        return combined

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every masked parameter slice again (in place: each Parameter object stays)."""
        parameters = dict(self.model.named_parameters())
        for name, keep in self.keep_masks().items():
            parameter = parameters.get(name)
            if parameter is None or tuple(parameter.shape) != tuple(keep.shape):
                found = None if parameter is None else list(parameter.shape)
                raise ValueError(
                    f"the masks do not match the model any more: '{name}' has shape {found}, the mask "
                    f"{list(keep.shape)} (was the model pruned by other means?)"
                )
            parameter.masked_fill_(~keep.to(parameter.device), 0)

    def attach(self, optimizer: torch.optim.Optimizer) -> Masker:
        """Re-apply the masks after every ``optimizer.step()`` (an optimizer step post-hook, until
        :meth:`remove`); returns the masker, so ``with masker.attach(optimizer): ...`` works."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._handles.append(optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs: self.apply()))
        return self

    def remove(self) -> None:
        """Remove every hook the masker installed; the masks (and the zeroed weights) stay."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> Masker:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def zero_ratio(self) -> dict[str, float]:
        """Per layer (every module that owns parameters), the fraction of its parameter elements
        that are exactly zero: the masked ones, and any others."""
        ratios = {}
        for name, module in self.model.named_modules():
            tensors = [p for p in module.parameters(recurse=False)]
            total = sum(p.numel() for p in tensors)
            if total:
                ratios[name or type(module).__name__] = sum(int((p.detach() == 0).sum()) for p in tensors) / total
        return ratios

    def materialize(self, pruner: Pruner) -> Plan:
        """Prune every masked unit for real, in one plan through ``pruner`` (its optimizer's state
        is sliced with the parameters), and clear the masks. Hooks from :meth:`attach` stay (they
        apply whatever is masked next). Returns the applied plan.

        Raises:
            ValueError / TypeError: the pruner holds another model, or the model no longer has the
                masked groups; nothing changes.
        """
        if not isinstance(pruner, Pruner):
            raise TypeError(f"materialize needs the Pruner of the masked model, got {type(pruner).__name__}")
        if unwrap_model(pruner.model) is not self.model:
            raise ValueError("the pruner holds another model than the masker; create it on the masked model")
        if not self._masks:
            return pruner.plan_groups({}, "materialize the soft masks")
        groups: dict[str, Group] = {}
        for group in get_dependency_graph(pruner.graph()).all_groups:
            try:
                groups.setdefault(group_key(group), group)
            except ValueError:
                continue
        selection: dict[Group, list[int]] = {}
        for key, mask in self._masks.items():
            found = groups.get(key)
            if found is None or found.num_units != mask.num_units:
                raise ValueError(
                    f"the model has no group of {mask.num_units} units starting at '{key}' any more; "
                    "the masks were made for the model as it was (mask it again)"
                )
            selection[found] = mask.units
        plan = pruner.plan_groups(selection, f"materialize {len(selection)} soft mask(s)")
        plan.apply(pruner.model, pruner.optimizer)
        self._masks.clear()
        return plan

    # -- saving ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The masks as plain data: ``{"masks": {key: {"units", "num_units", "keep": {param: bool}}}}``."""
        return {
            "masks": {
                key: {
                    "units": torch.tensor(mask.units, dtype=torch.long),
                    "num_units": mask.num_units,
                    "keep": {name: keep.clone() for name, keep in mask.keep.items()},
                }
                for key, mask in self._masks.items()
            }
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks saved by :meth:`state_dict` (checked against the model first; the weights
        are not touched: load the model's state dict too, or call :meth:`apply`)."""
        if not isinstance(state, Mapping) or not isinstance(state.get("masks"), Mapping):
            raise TypeError("expected the dict of Masker.state_dict() (with a 'masks' entry)")
        shapes = {name: tuple(p.shape) for name, p in self.model.named_parameters()}
        masks = {}
        for key, entry in state["masks"].items():
            try:
                units = [int(u) for u in entry["units"]]
                num_units = int(entry["num_units"])
                keep = {
                    str(name): torch.as_tensor(value, dtype=torch.bool).cpu() for name, value in entry["keep"].items()
                }
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"the saved mask '{key}' is not one of Masker.state_dict(): {error}") from None
            for name, value in keep.items():
                if shapes.get(name) != tuple(value.shape):
                    raise ValueError(
                        f"the saved mask '{key}' is for a parameter '{name}' of shape {list(value.shape)}; "
                        f"the model's is {list(shapes[name]) if name in shapes else None}"
                    )
            masks[str(key)] = _Mask(str(key), units, num_units, keep)
        self._masks = masks
