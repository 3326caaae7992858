"""Planning functions: from a selection of units to the validated edits of a :class:`Plan`.

Pure functions of (model, graph analysis, selection) that return edits; the :class:`Pruner` is a
thin holder of model, optimizer and policy that calls them. Three entry points:

- :func:`group_edits`: the edits that remove ``{group: units}`` from every member of each coupled
  group (the one engine: discovery, explicit cascades in fx mode, ``prune_group``);
- :func:`module_selection`: the group units removed with some output units of a layer, refusing
  what the analysis refuses;
- :func:`check_listed_cascade`: an explicit ``cascading_modules`` list checked against the group
  the analysis finds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any, cast

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod

from torchpruner.graph.dependency import DependencyError, DependencyGraph, Group, tensor_shapes
from torchpruner.rules import (
    KEPT_UNITS_ATTRIBUTE,
    AttributeChange,
    Edit,
    GroupedSliceError,
    SlicingRule,
    TensorSlice,
    UnitSelection,
    complement,
    get_slicing_rule,
    kept_units_edit,
    param_record_key,
    shape_attributes_edit,
    slice_tensor,
    unaccounted_tensors_message,
)

from .optimizer import describe_optimizer_surgery, plan_optimizer_surgery
from .plan import Plan, merge_edits, parameter_slices

logger = logging.getLogger(__name__)

__all__ = [
    "rule_edits",
    "removed_out",
    "group_edits",
    "module_selection",
    "with_whole_conv_groups",
    "output_units_refusal",
    "check_group_selection",
    "check_listed_cascade",
    "check_rule_fits",
    "describe_selection",
    "finish_plan",
]

Selection = Mapping[Group, Sequence[int]]


def rule_edits(rule: SlicingRule, module: nn.Module, name: str, selection: UnitSelection, direction: str) -> list[Edit]:
    """The rule's edits for one side of ``module``; errors name the module."""
    check_rule_fits(rule, module, name)
    try:
        return rule.prune_out(module, selection) if direction == "out" else rule.prune_in(module, selection)
    except GroupedSliceError as exc:
        raise ValueError(f"'{name}': {exc}") from None
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"'{name}' ({type(module).__name__}): {exc}") from None


def removed_out(rule: SlicingRule, module: nn.Module, name: str, selection: UnitSelection) -> torch.Tensor | None:
    """Output units of ``module`` that go when ``selection`` leaves its input (None: none)."""
    try:
        return rule.removed_out_after_in(module, selection)
    except GroupedSliceError as exc:
        raise ValueError(f"'{name}': {exc}") from None


def out_keep_after_in(rule: SlicingRule, module: nn.Module, name: str, selection: UnitSelection) -> torch.Tensor | None:
    """Output units ``module`` keeps when ``selection`` leaves its input (None: output unchanged)."""
    out_removed = removed_out(rule, module, name, selection)
    out_count = rule.out_units(module)
    if out_removed is None or out_count is None:
        return None
    return complement(out_removed, out_count)


def group_edits(selection: Selection, dropout_policy: str) -> list[Edit]:
    """The edits (tensor slices, attribute changes, kept-unit records) that remove ``selection``."""
    dep = next(iter(selection))._dep if selection else None
    if dep is None:
        return []
    edits: list[Edit] = []
    kept: dict[int, list[Any]] = {}  # module id -> [module, rule, out_keep, in_keep]
    param_kept: dict[int, tuple[nn.Module, dict[str, list[int]]]] = {}  # bare parameters' kept ids
    per_call: dict[int, nn.Module] = {}  # parameter-free modules with one role per call site (Dropout)
    removals = dep.removals(selection)
    covered = _outputs_cut_with_inputs(removals, dropout_policy)
    for role, positions in removals:
        space = role.space
        if role.per_call:
            per_call.setdefault(id(role.module), role.module)
            continue
        remove = torch.as_tensor(positions, dtype=torch.long)
        if role.direction == "param":
            assert role.parameter is not None and role.axis is not None  # every "param" role names its tensor
            keep = complement(remove, space.size)
            edits += slice_tensor(role.module, role.parameter, role.axis, keep)
            # recorded like a layer's kept units, so a pruned checkpoint can replay the slice
            key = param_record_key(role.parameter, role.axis)
            current = (getattr(role.module, KEPT_UNITS_ATTRIBUTE, None) or {}).get(key, list(range(space.size)))
            param_kept.setdefault(id(role.module), (role.module, {}))[1][key] = [current[i] for i in keep.tolist()]
            continue
        module = role.module
        rule = get_slicing_rule(module)
        if rule is None:
            raise DependencyError(f"'{role.module_name}' ({type(module).__name__}) has no slicing rule")
        unit_selection = UnitSelection.from_remove(
            remove, space.size, axis=space.axis, ndim=space.ndim, dropout_policy=dropout_policy
        )
        record = kept.setdefault(id(module), [module, rule, None, None])
        cut = covered.get(id(module))
        if role.direction == "out" and cut is not None and torch.equal(cut, remove):
            record[2] = unit_selection.keep  # the input side's edits (whole conv groups) remove them
            continue
        edits += rule_edits(rule, module, role.module_name, unit_selection, role.direction)
        if role.direction == "out":
            record[2] = unit_selection.keep
        else:
            record[3] = unit_selection.keep
            out_keep = out_keep_after_in(rule, module, role.module_name, unit_selection)
            if out_keep is not None and dep.graph.has_sites(module):  # else fx traced its ops instead
                _check_output_follows(dep, selection, module, role.module_name, out_keep)
                record[2] = out_keep
    for module in per_call.values():
        edits += _per_call_edits(dep, selection, module, dropout_policy)
    shape_changes = dep.shape_attribute_edits(selection)
    edits += shape_changes + shape_attributes_edit(shape_changes)
    for module, rule, out_keep, in_keep in kept.values():
        edits += kept_units_edit(module, rule, out_keep, in_keep)
    for module, records in param_kept.values():
        record_edit = next(
            (
                e
                for e in edits
                if isinstance(e, AttributeChange) and e.module is module and e.attribute == KEPT_UNITS_ATTRIBUTE
            ),
            None,
        )
        if record_edit is not None:
            record_edit.new = {**record_edit.new, **records}
        else:
            old = getattr(module, KEPT_UNITS_ATTRIBUTE, None)
            edits.append(
                AttributeChange(module=module, attribute=KEPT_UNITS_ATTRIBUTE, old=old, new={**(old or {}), **records})
            )
    return edits


def _outputs_cut_with_inputs(removals: list[tuple[Any, Any]], dropout_policy: str) -> dict[int, torch.Tensor]:
    """``{module id: output units}`` that layers drop because whole groups of their input go (a
    grouped convolution losing whole conv groups: its ``groups`` shrinks)."""
    cut: dict[int, torch.Tensor] = {}
    for role, positions in removals:
        if role.direction != "in" or role.per_call:
            continue
        out_removed = _outputs_removed_with_inputs(role, positions, dropout_policy)
        if out_removed is not None:
            cut[id(role.module)] = torch.as_tensor(out_removed, dtype=torch.long).sort().values
    return cut


def _outputs_removed_with_inputs(role: Any, positions: Any, dropout_policy: str = "linear") -> Any:
    """The output units ``role.module``'s rule removes when its input loses ``positions`` (a
    grouped convolution losing whole conv groups), or None."""
    rule = get_slicing_rule(role.module)
    if rule is None:
        return None
    space = role.space
    unit_selection = UnitSelection.from_remove(
        torch.as_tensor(positions, dtype=torch.long),
        space.size,
        axis=space.axis,
        ndim=space.ndim,
        dropout_policy=dropout_policy,
    )
    return removed_out(rule, role.module, role.module_name, unit_selection)


def with_whole_conv_groups(dep: DependencyGraph, selection: Selection) -> dict[Group, list[int]]:
    """``selection`` and, for every grouped convolution that loses whole conv groups of its input,
    the group units of that convolution's output channels in those conv groups (which go with
    them: its ``groups`` shrinks), until nothing more follows. A depthwise convolution's outputs
    are already linked to its inputs; equal counts per conv group change nothing downstream."""
    result: dict[Group, list[int]] = {group: sorted(set(int(u) for u in units)) for group, units in selection.items()}
    while True:
        added = False
        for role, positions in dep.removals(result):
            module = role.module
            if (
                role.direction != "in"
                or role.per_call
                or not isinstance(module, nn.modules.conv._ConvNd)
                or module.groups in (1, module.in_channels)
                or len(dep.graph.sites_of(module)) != 1
            ):
                continue
            out_removed = _outputs_removed_with_inputs(role, positions)
            if out_removed is None:
                continue
            for group, units in dep.select(module, out_removed.tolist()).items():
                merged = sorted(set(result.get(group, [])) | set(units))
                if merged != result.get(group):
                    result[group] = merged
                    added = True
        if not added:
            return result


def _call_site_fractions(dep: DependencyGraph, selection: Selection, module: nn.Module) -> list[tuple[int, int]]:
    """``(removed, units)`` at every call site of a parameter-free module such as a shared Dropout."""
    return [(len(positions), role.space.size) for role, positions in dep.call_site_removals(module, selection)]


def _per_call_edits(dep: DependencyGraph, selection: Selection, module: nn.Module, dropout_policy: str) -> list[Edit]:
    """A Dropout's ``p`` (its only state) changes only when every call site loses the same fraction
    of its units; a Dropout shared by layers that lose different fractions keeps its ``p``."""
    calls = dep.call_site_removals(module, selection)
    name = dep.graph.module_name(module)
    if len({Fraction(len(positions), role.space.size) for role, positions in calls}) != 1:
        logger.info("'%s' keeps p: its call sites lose different fractions of their units", name)
        return []
    role, positions = calls[0]
    rule = get_slicing_rule(module)
    if rule is None:
        raise DependencyError(f"'{name}' ({type(module).__name__}) has no slicing rule")
    unit_selection = UnitSelection.from_remove(
        torch.as_tensor(positions, dtype=torch.long),
        role.space.size,
        axis=role.space.axis,
        ndim=role.space.ndim,
        dropout_policy=dropout_policy,
    )
    return rule_edits(rule, module, name, unit_selection, "in")


def _check_output_follows(
    dep: DependencyGraph, selection: Selection, module: nn.Module, name: str, out_keep: torch.Tensor
) -> None:
    """A layer that loses output units because its input lost some (a depthwise convolution, or
    whole input groups of a grouped one) is only safe when the analysis removes exactly those output
    units downstream too (they are linked in the group)."""
    space = dep._output_space(module)
    removed = set(dep.removed_positions(space, selection).tolist())
    expected = set(range(space.size)) - set(out_keep.tolist())
    if removed != expected:
        raise DependencyError(
            f"'{name}' ({type(module).__name__}, groups={getattr(module, 'groups', 1)}) would lose "
            f"whole conv groups, and with them output channels {sorted(expected)[:10]} that the "
            f"layers after it still read; prune the same number of units in every conv group"
        )


def describe_selection(selection: Selection) -> str:
    parts = []
    shared: dict[int, nn.Module] = {}
    for group, units in selection.items():
        names = ", ".join(str(m) for m in group.members)
        parts.append(f"{len(units)} of {group.num_units} units of group {group.index} [{names}]")
        for role in group._roles:
            if role.per_call:
                shared.setdefault(id(role.module), role.module)
    for module in shared.values():  # say why a shared Dropout keeps its p
        dep = next(iter(selection))._dep
        fractions = _call_site_fractions(dep, selection, module)
        if len({Fraction(k, n) for k, n in fractions}) > 1:
            shown = ", ".join(f"{k}/{n}" for k, n in fractions)
            parts.append(
                f"'{dep.graph.module_name(module)}' keeps p={module.p:g}: its {len(fractions)} call sites "
                f"lose different fractions of their units ({shown})"
            )
    return "; ".join(parts)


def module_selection(
    dep: DependencyGraph, module: nn.Module, remove: torch.Tensor, call_index: int = 0, include_outputs: bool = False
) -> dict[Group, list[int]]:
    """The group units removed with output units ``remove`` of ``module``; refuses (DependencyError)
    a group the analysis cannot prune and a removal that would empty a group, and (ValueError)
    units that are outputs of the model unless ``include_outputs``."""
    name = dep.graph.module_name(module)
    selection = with_whole_conv_groups(dep, dep.select(module, remove.tolist(), call_index))
    for group, units in selection.items():
        if group.refusal is not None:
            raise DependencyError(f"cannot prune '{name}' ({type(module).__name__}): {group.refusal}")
        if len(units) >= group.num_units:
            raise DependencyError(f"cannot prune every unit of '{name}' (group {group.index} would be empty)")
        if group.output_reason is not None and not include_outputs:
            raise ValueError(output_units_refusal(name, module, group.output_reason))
    return selection


def output_units_refusal(name: str, module: nn.Module, why: str) -> str:
    """The message refusing to remove units that are outputs of the model itself."""
    return (
        f"the output units of '{name}' ({type(module).__name__}) are outputs of the model ({why}): removing "
        f"them renumbers the model's outputs (the classes of a classifier), and the targets no longer match; "
        f"pass include_outputs=True to prune them anyway"
    )


def check_group_selection(model: nn.Module, selection: Selection) -> None:
    """Refuse groups of another model, stale groups (the model was pruned since) and bad units."""
    dep = next(iter(selection))._dep
    if dep.model is not model:
        raise ValueError(
            f"the group belongs to another model ({type(dep.model).__name__} object at "
            f"{id(dep.model):#x}); compute the groups on this model with pruner.groups()"
        )
    if tensor_shapes(dep.model) != dep.tensor_shapes or not dep.graph.is_current():
        raise ValueError(
            "the group is stale: the model was pruned or a layer of it replaced since it was "
            "computed; compute the groups again with pruner.groups()"
        )
    for group, units in selection.items():
        if group._dep is not dep:
            raise ValueError("the groups come from different analyses; compute the groups again with pruner.groups()")
        if len(set(units)) >= group.num_units:
            raise ValueError(f"cannot remove every unit of group {group.index}")


def check_listed_cascade(
    selection: Selection, source: nn.Module, cascade: Sequence[nn.Module], name_of: Callable[[nn.Module], str]
) -> list[nn.Module]:
    """Check an explicit ``cascading_modules`` list against the groups the analysis found.

    Every listed module must be sliced by the prune, and every member with per-unit tensors must
    be listed (as must every other layer whose outputs share the units). Members without per-unit
    tensors (Dropout, activations) may be left out; they are returned, and the plan leaves them
    as they are (a Dropout keeps its ``p``).
    """
    members: dict[int, nn.Module] = {}
    for group in selection:
        for member in group.members:
            if member.module is not source:
                members.setdefault(id(member.module), member.module)
    listed = {id(m) for m in cascade}
    unreached = [m for m in cascade if id(m) not in members and not any(g.reads(m) for g in selection)]
    if unreached:
        names = ", ".join(f"'{name_of(m)}'" for m in unreached)
        raise ValueError(
            f"{names} in cascading_modules: its input does not depend on the pruned units of "
            f"'{name_of(source)}' (not reached from it in the data flow)"
        )
    left_alone = []
    for module in members.values():
        if id(module) in listed:
            continue
        rule = get_slicing_rule(module)
        if rule is not None and rule.passes_units_through and not rule.has_unit_state:
            logger.info(
                "'%s' follows the pruned units of '%s' but is not in cascading_modules; it is left as it is",
                name_of(module),
                name_of(source),
            )
            left_alone.append(module)
            continue
        raise ValueError(
            f"'{name_of(module)}' ({type(module).__name__}) shares the pruned units of "
            f"'{name_of(source)}' but is not in cascading_modules; list it, or let the pruner find "
            f"the cascade (cascading_modules=None)"
        )
    return left_alone


def finish_plan(model: nn.Module, optimizer: torch.optim.Optimizer | None, description: str, edits: list[Edit]) -> Plan:
    """Name every edit, validate the plan against the model and the optimizer."""
    names = {id(m): n for n, m in reversed(list(model.named_modules(remove_duplicate=False)))}
    owners: dict[int, set[int]] = {}
    param_names: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), set()).add(id(module))
                param_names.setdefault(id(param), []).append(f"{module_name}.{pname}" if module_name else pname)
    checked = set()
    bound: list[tuple[Edit, nn.Module]] = []
    for edit in edits:
        module = edit.module
        assert module is not None  # planning edits hold their module until the plan is finished
        edit.module_name = names[id(module)]
        if id(module) not in checked:
            check_not_parametrized(module, edit.module_name)
            checked.add(id(module))
        bound.append((edit, module))
        if isinstance(edit, TensorSlice) and edit.is_parameter:
            param = module._parameters[edit.tensor_name]
            if len(owners.get(id(param), ())) > 1:
                others = [n for n in param_names[id(param)] if n != edit.qualified_name]
                raise ValueError(
                    f"'{edit.qualified_name}' is tied to {others} (the same Parameter in several "
                    f"modules); pruning tied weights is not supported"
                )
    plan = Plan(description=description, edits=merge_edits(edits))
    module_of = {id(edit): module for edit, module in bound}  # merging keeps a subset of the same edits
    merged = [(edit, module_of[id(edit)]) for edit in plan.edits]
    plan.optimizer_slices = describe_optimizer_surgery(plan_optimizer_surgery(optimizer, parameter_slices(merged)))
    logger.debug("%s", plan)
    return plan


def check_rule_fits(rule: SlicingRule, module: nn.Module, name: str) -> None:
    """Refuse a module its rule cannot prune correctly: parametrized or masked weights, or
    parameters and buffers the rule does not account for (a subclass with a per-unit gate)."""
    check_not_parametrized(module, name)
    message = unaccounted_tensors_message(rule, module, name)
    if message is not None:
        raise ValueError(message)


def check_not_parametrized(module: nn.Module, name: str) -> None:
    """Refuse weights computed by parametrizations, weight_norm/spectral_norm or pruning masks."""
    if parametrize.is_parametrized(module):
        raise ValueError(
            f"'{name}' ({type(module).__name__}) has parametrized tensors "
            f"({sorted(cast(nn.ModuleDict, module.parametrizations).keys())}); remove the parametrizations first "
            f"(torch.nn.utils.parametrize.remove_parametrizations)"
        )
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, BasePruningMethod):
            raise ValueError(
                f"'{name}' ({type(module).__name__}) carries a torch.nn.utils.prune mask "
                f"({hook._tensor_name}_orig / {hook._tensor_name}_mask); call "
                f"torch.nn.utils.prune.remove(module, {hook._tensor_name!r}) first"
            )
        if type(hook).__name__ in ("WeightNorm", "SpectralNorm"):
            raise ValueError(
                f"'{name}' ({type(module).__name__}) uses {type(hook).__name__} "
                f"(weight computed from {getattr(hook, 'name', 'weight')}_*); remove it first"
            )
    if any(p.endswith("_orig") for p in module._parameters):
        raise ValueError(
            f"'{name}' ({type(module).__name__}) has a masked parameter "
            f"({[p for p in module._parameters if p.endswith('_orig')]}); remove the mask first"
        )
