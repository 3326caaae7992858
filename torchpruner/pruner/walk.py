"""Following pruned units module by module where torch.fx cannot trace the model.

With an fx trace, every prune is planned by the one dependency analysis
(:mod:`torchpruner.graph.dependency`). A model fx cannot trace (data-dependent control flow) only
has a forward-hook trace: its call sites are leaf modules, and functional ops, merges and
reshapes between them are invisible. :func:`follow_modules` walks that trace from the pruned
layer and accepts only what it can prove per unit from the modules' own rules: a module that
passes units through (BatchNorm, activations, Dropout, pooling), an ``nn.Flatten`` (channel-major:
unit ``c`` owns a contiguous block), and the listed consumers. Anything else is refused. A listed
consumer whose input comes from invisible code is accepted only when ``verify`` (which perturbs
the pruned units on the real model) shows that it reads a channel-major flatten of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from torchpruner._ops import MOVEMENT_MODULES
from torchpruner.graph import CallSite, ModelGraph
from torchpruner.rules import GroupedSliceError, UnitSelection, get_slicing_rule, unaccounted_tensors_message

__all__ = ["Flow", "follow_modules"]


@dataclass
class Flow:
    """Where the pruned units sit in one call site's output."""

    remove: torch.Tensor
    num_units: int
    axis: int
    shape: tuple[int, ...]

    def flattened(self, block: int, shape: tuple[int, ...]) -> Flow:
        """The same units after a channel-major flatten: unit ``c`` becomes ``block`` inputs."""
        remove = (self.remove[:, None] * block + torch.arange(block)[None, :]).flatten()
        return Flow(remove, self.num_units * block, self.axis, shape)


#: verify(consumer site, flow at the source, guessed removed inputs) raises ValueError when wrong;
#: with no guess (the unit counts do not match) it always raises, saying whether the units arrive
Verify = Callable[[CallSite, Flow, torch.Tensor | None], None]


def follow_modules(
    graph: ModelGraph,
    source: nn.Module,
    remove: torch.Tensor,
    num_units: int,
    cascade: Sequence[nn.Module],
    dropout_policy: str,
    verify: Verify,
) -> list[tuple[nn.Module, UnitSelection]]:
    """Each listed module with the input units it loses, in data-flow order (hooks trace only)."""
    source_name = graph.module_name(source)
    source_sites = graph.sites_of(source)
    flows: dict[int, Flow] = {}
    for site in source_sites:
        if site.shape is None or site.unit_axis is None or site.shape[site.unit_axis] != num_units:
            raise ValueError(
                f"'{source_name}' output shape {site.shape} does not hold its {num_units} units "
                f"on the expected axis {site.unit_axis}"
            )
        flows[id(site)] = Flow(remove, num_units, site.unit_axis, tuple(site.shape))
    source_flow = flows[id(source_sites[0])]
    listed_ids = {id(m) for m in cascade}
    selections: dict[int, tuple[nn.Module, UnitSelection]] = {}
    first_index = min(s.index for s in source_sites)
    for site in graph.sites:
        if site.index <= first_index or id(site) in flows or site.kind != "module":
            continue
        incoming = [s for s in site.inputs if id(s) in flows]
        listed = id(site.module) in listed_ids
        if not incoming:
            if not listed:
                continue
            flow = _invisible_input(site, source_flow, verify)
        else:
            foreign = [s for s in site.inputs if s.kind != "attr" and id(s) not in flows]
            if foreign or len(incoming) > 1:
                raise ValueError(
                    f"the pruned units of '{source_name}' flow into '{site.label}', which merges them "
                    f"with other tensors; prune the coupled layers together (cascading_modules=None "
                    f"with a model torch.fx can trace)"
                )
            flow = flows[id(incoming[0])]
        if site.module is source:
            raise ValueError(
                f"'{source_name}' reads its own pruned units (a module applied twice in a chain); not supported"
            )
        out = _through_module(site, flow, source_name, listed, selections, dropout_policy)
        if out is not None:
            flows[id(site)] = out
    missing = [m for m in cascade if id(m) not in selections]
    if missing:
        names = ", ".join(f"'{graph.module_name(m)}'" for m in missing)
        raise ValueError(
            f"{names} in cascading_modules: its input does not depend on the pruned units of "
            f"'{source_name}' (not reached from it in the data flow)"
        )
    order = {id(m): min(s.index for s in graph.sites_of(m)) for m, _ in selections.values()}
    return sorted(selections.values(), key=lambda item: order[id(item[0])])


def _invisible_input(site: CallSite, source_flow: Flow, verify: Verify) -> Flow:
    """A listed consumer fed by code the hooks trace cannot see: the same units, or a
    channel-major flatten of them verified on the model; anything else is refused."""
    module = site.module
    assert module is not None  # a module call site (the walk visits no other kind)
    rule = get_slicing_rule(module)
    in_units = rule.in_units(module) if rule is not None else None
    if in_units is None or in_units == source_flow.num_units:
        guessed = source_flow.remove
        flow = source_flow
    elif in_units % source_flow.num_units == 0:
        flow = source_flow.flattened(in_units // source_flow.num_units, (source_flow.shape[0], in_units))
        guessed = flow.remove
    else:
        verify(site, source_flow, None)  # explains whether the consumer reads the pruned units at all
        raise ValueError(
            f"'{site.label}' reads {in_units} units, which do not follow from the "
            f"{source_flow.num_units} pruned-layer units"
        )
    verify(site, source_flow, guessed)
    return flow


def _through_module(
    site: CallSite,
    flow: Flow,
    source_name: str,
    listed: bool,
    selections: dict[int, tuple[nn.Module, UnitSelection]],
    dropout_policy: str,
) -> Flow | None:
    module, name = site.module, site.module_name
    assert module is not None and name is not None  # a module call site (the walk visits no other kind)
    rule = get_slicing_rule(module)
    if rule is None:
        raise ValueError(
            f"the pruned units of '{source_name}' flow into '{name}' ({type(module).__name__}), "
            f"which has no slicing rule; register one with register_slicing_rule"
        )
    if not listed:
        if rule.passes_units_through and not rule.has_unit_state:
            unaccounted = unaccounted_tensors_message(rule, module, name)
            if unaccounted is not None:
                raise ValueError(unaccounted)
            return _same_units(flow, site, source_name)
        raise ValueError(
            f"'{name}' ({type(module).__name__}) shares the pruned units of '{source_name}' "
            f"but is not in cascading_modules; list it, or let the pruner find the cascade "
            f"(cascading_modules=None)"
        )
    ndim = len(flow.shape)
    if rule.input_unit_axis is not None and rule.input_unit_axis % ndim != flow.axis:
        raise ValueError(
            f"'{name}' ({type(module).__name__}) reads its units on axis "
            f"{rule.input_unit_axis % ndim} of its {ndim}-d input, but the pruned units of "
            f"'{source_name}' are on axis {flow.axis}: its input does not depend on them unit by unit"
        )
    in_units = rule.in_units(module)
    if in_units is not None and in_units != flow.num_units:
        raise ValueError(
            f"'{name}' ({type(module).__name__}) reads {in_units} units but {flow.num_units} "
            f"arrive from '{source_name}' ({list(flow.shape)}, axis {flow.axis}): its input does not "
            f"depend on the pruned units"
        )
    selection = UnitSelection.from_remove(
        flow.remove, flow.num_units, axis=flow.axis, ndim=ndim, dropout_policy=dropout_policy
    )
    previous = selections.get(id(module))
    if previous is not None and not torch.equal(previous[1].remove, selection.remove):
        raise ValueError(f"'{name}' is called more than once with different pruned units")
    selections.setdefault(id(module), (module, selection))
    try:
        removed_out = rule.removed_out_after_in(module, selection)
    except GroupedSliceError as exc:
        raise ValueError(f"'{name}': {exc}") from None
    if removed_out is None or site.shape is None:
        return None
    out_count = rule.out_units(module)
    if torch.equal(removed_out, selection.remove) and out_count in (None, flow.num_units):
        return _same_units(flow, site, source_name)  # BatchNorm, Dropout, depthwise convolution...
    if len(site.shape) != ndim:
        raise ValueError(f"'{name}' changes the rank of its input; cannot follow the pruned units through it")
    return Flow(removed_out, out_count if out_count is not None else flow.num_units, flow.axis, tuple(site.shape))


def _same_units(flow: Flow, site: CallSite, source_name: str) -> Flow | None:
    """The units of ``flow`` in the output of a module that keeps them (an ``nn.Flatten`` moves them
    into channel-major blocks)."""
    if site.shape is None:
        return None
    in_shape, out_shape, a = tuple(flow.shape), tuple(site.shape), flow.axis
    if len(out_shape) > a and out_shape[: a + 1] == in_shape[: a + 1]:
        return Flow(flow.remove, flow.num_units, a, out_shape)  # element-wise, pooling
    if isinstance(site.module, MOVEMENT_MODULES) and len(out_shape) > a and out_shape[:a] == in_shape[:a]:
        product = 1
        for m in range(a, len(in_shape)):
            product *= in_shape[m]
            if product == out_shape[a] and out_shape[a + 1 :] == in_shape[m + 1 :]:
                return flow.flattened(product // in_shape[a], out_shape)
            if product > out_shape[a]:
                break
    raise ValueError(
        f"the pruned units of '{source_name}' flow into '{site.label}' ({type(site.module).__name__}, "
        f"shape {list(in_shape)} -> {list(out_shape)}), which the pruner cannot follow unit by unit"
    )
