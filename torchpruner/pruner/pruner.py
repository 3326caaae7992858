"""The Pruner: remove units of a layer and of the layers that consume them, in place.

Every prune is *plan, validate, act*: :meth:`Pruner.plan` lists every tensor slice, attribute
change and optimizer-state slice (``print(plan)`` is a dry run), checks the whole plan (indices,
data flow, grouped convolutions, tied or parametrized weights, optimizer type), and only
:meth:`Plan.apply` modifies the model, so a refused prune leaves model and optimizer bit-for-bit
as they were.

One engine plans every prune of a model that torch.fx can trace: the dependency analysis
(:mod:`torchpruner.graph.dependency`) finds the coupled group of the pruned units and every tensor
that loses them. With ``cascading_modules=None`` that group is the cascade; an explicit list is
*checked* against it (every listed module must be reached, every member with per-unit tensors must
be listed; the order of the list does not matter). Models fx cannot trace are followed module by
module on a forward-hook trace (:mod:`torchpruner.pruner.walk`), which refuses what it cannot prove;
such a plan is then checked on a copy of the model (it must still run, and its output keep its
shape unless ``include_outputs``: a model that cannot be deep-copied is refused) and on the model
(pushing the pruned units up and down must change the input of no unlisted module with tensors).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from torchpruner._state import collector_paused, input_shape, make_example_inputs, preserved_state, unwrap_model
from torchpruner.graph import CallSite, ModelGraph, get_graph
from torchpruner.graph.dependency import Group, get_dependency_graph
from torchpruner.rules import (
    DROPOUT_POLICIES,
    SlicingRule,
    UnitSelection,
    complement,
    get_slicing_rule,
    kept_units,
    kept_units_edit,
    normalize_indices,
    slice_tensor,
)

from .optimizer import check_optimizer
from .plan import Plan
from .planning import (
    check_group_selection,
    check_listed_cascade,
    check_rule_fits,
    describe_selection,
    finish_plan,
    group_edits,
    module_selection,
    out_keep_after_in,
    output_units_refusal,
    removed_out,
    rule_edits,
    with_whole_conv_groups,
)
from .walk import Flow, follow_modules

logger = logging.getLogger(__name__)

__all__ = ["Pruner"]


class Pruner:
    """Prune units of a model in place, with the live optimizer.

    Args:
        model: the model (``torch.compile`` wrappers are unwrapped; ``nn.DataParallel`` / DDP are
            refused: prune ``model.module`` and wrap again).
        input_size: input shape without the batch dim, used to trace the model for shape probing.
        device: device of the generated example input (defaults to the model's).
        optimizer: optimizer whose per-element state follows the pruned parameters (SGD, Adam,
            AdamW, Adamax, NAdam, RAdam, RMSprop, Adagrad, Adadelta, ASGD, Rprop, or registered
            with :func:`register_per_element_optimizer`), or None.
        example_inputs: instead of ``input_size``: a tensor, tuple or dict of example inputs.
        dropout_policy: how a Dropout rate changes when ``k`` of ``n`` units before it go:
            ``"linear"`` (default, ``p * (1 - k/n)``, the 2020 TorchPruner rule), ``"sqrt"``
            (``p * sqrt((n - k)/n)``, Han et al. 2015) or ``"keep"``.
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        example_inputs: Any = None,
        dropout_policy: str = "linear",
    ) -> None:
        self.model = unwrap_model(model)
        check_optimizer(optimizer)
        if dropout_policy not in DROPOUT_POLICIES:
            raise ValueError(f"dropout_policy must be one of {sorted(DROPOUT_POLICIES)}, got {dropout_policy!r}")
        self.input_size = input_shape(input_size) if input_size is not None else None
        self.example_inputs = example_inputs
        self.device = device
        self.optimizer = optimizer
        self.dropout_policy = dropout_policy

    # -- public API -----------------------------------------------------------------------

    def graph(self) -> ModelGraph:
        """The traced graph of the model (cached by the tracer; rebuilt after a prune)."""
        if self.input_size is None and self.example_inputs is None:
            raise ValueError("the Pruner needs input_size= or example_inputs= to follow the data flow of the model")
        return get_graph(self.model, *self._example_inputs())

    def plan(
        self,
        module: nn.Module,
        indices: Any,
        cascading_modules: Sequence[nn.Module] | None = None,
        *,
        include_outputs: bool = False,
    ) -> Plan:
        """Plan the removal of output units ``indices`` of ``module`` and their consumers; changes nothing.

        Args:
            module: the layer whose output units go (Linear, Conv*, ConvTranspose*, Embedding, or a
                type with a registered slicing rule).
            indices: unit indices along the layer's unit axis (a list, numpy array or int tensor).
            cascading_modules: the modules after ``module`` that read the pruned units (BatchNorm,
                Dropout, the next Linear/Conv, ...), in any order. None: discover them from the graph.
            include_outputs: allow removing units that are outputs of the model itself (a
                classifier's classes: the remaining outputs are renumbered). Off by default.

        Returns:
            a :class:`Plan`; ``str(plan)`` lists every change.

        Raises:
            ValueError / TypeError: naming the module and the problem (see the module docstring).
        """
        name = self._name_of(module)
        rule = self._rule_of(module, name)
        if rule.passes_units_through:
            raise ValueError(
                f"'{name}' ({type(module).__name__}) passes its input units through; prune the "
                f"layer that produces them and list '{name}' in cascading_modules"
            )
        num_units = rule.out_units(module)
        if num_units is None:
            raise TypeError(f"'{name}' ({type(module).__name__}) has no output units to prune")
        check_rule_fits(rule, module, name)
        remove = normalize_indices(indices, num_units, name)
        description = f"remove {len(remove)} of {num_units} output units of '{name}' ({type(module).__name__})"
        if len(remove) == 0:
            return Plan(description=description + " (nothing to do)")
        cascade = None if cascading_modules is None else self._check_cascade(cascading_modules, module, name)
        graph = self.graph()
        if cascade is not None:
            graph = self._graph_with_sites(graph, [module] + cascade)
        if graph.method == "hooks" and cascade is not None:
            return self._plan_on_hooks_trace(
                graph, module, name, rule, remove, num_units, cascade, description, include_outputs
            )
        selection = module_selection(get_dependency_graph(graph), module, remove, include_outputs=include_outputs)
        edits = group_edits(selection, self.dropout_policy)
        if cascade is not None:  # an explicit list is checked against the group; unlisted Dropouts keep their p
            left_alone = {id(m) for m in check_listed_cascade(selection, module, cascade, self._name_of)}
            edits = [edit for edit in edits if id(edit.module) not in left_alone]
        return finish_plan(self.model, self.optimizer, f"{description}: {describe_selection(selection)}", edits)

    def prune_model(
        self,
        module: nn.Module,
        indices: Any,
        cascading_modules: Sequence[nn.Module] | None = None,
        *,
        include_outputs: bool = False,
    ) -> Plan:
        """Remove output units ``indices`` of ``module``, slice the cascading modules, fix the optimizer.

        Same arguments as :meth:`plan`; returns the applied plan.
        """
        plan = self.plan(module, indices, cascading_modules, include_outputs=include_outputs)
        plan.apply(self.model, self.optimizer)
        return plan

    def prune_module(
        self, module: nn.Module, indices: Any, direction: str = "out", original_len: int | None = None
    ) -> Plan:
        """Slice one module's parameters for units ``indices`` of its output or input (no cascade).

        Args:
            module: any module with a slicing rule.
            indices: unit indices.
            direction: ``"out"`` (its output units) or ``"in"`` (its input units).
            original_len: the number of units before pruning; required for Dropout (which has no
                unit count of its own), checked against the module otherwise.
        """
        if direction not in ("out", "in"):
            raise ValueError(f"direction must be 'out' or 'in', got {direction!r}")
        name = self._name_of(module)
        rule = self._rule_of(module, name)
        count = rule.out_units(module) if direction == "out" else rule.in_units(module)
        if count is None:
            if original_len is None:
                raise ValueError(f"'{name}' ({type(module).__name__}) has no unit count of its own: pass original_len=")
            count = int(original_len)
        elif original_len is not None and int(original_len) != count:
            raise ValueError(f"original_len={original_len} but '{name}' has {count} {direction}put units")
        remove = normalize_indices(indices, count, name)
        description = f"remove {len(remove)} of {count} {direction}put units of '{name}' ({type(module).__name__})"
        if len(remove) == 0:
            return Plan(description=description + " (nothing to do)")
        selection = UnitSelection.from_remove(remove, count, dropout_policy=self.dropout_policy)
        edits = rule_edits(rule, module, name, selection, direction)
        if direction == "out":
            edits += kept_units_edit(module, rule, selection.keep, None)
        else:
            edits += kept_units_edit(module, rule, out_keep_after_in(rule, module, name, selection), selection.keep)
        plan = finish_plan(self.model, self.optimizer, description, edits)
        plan.apply(self.model, self.optimizer)
        return plan

    def prune_parameter(self, module: nn.Module, parameter_name: str, indices: Any, axis: int = 0) -> Plan:
        """Slice one parameter (or buffer) of ``module``: remove ``indices`` along ``axis``.

        Its gradient and optimizer state follow; module attributes are *not* updated (that is
        what :meth:`prune_module` is for).
        """
        name = self._name_of(module)
        tensor = module._parameters.get(parameter_name, module._buffers.get(parameter_name))
        if tensor is None:
            raise ValueError(f"'{name}' ({type(module).__name__}) has no parameter or buffer named {parameter_name!r}")
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis must be an int, got {axis!r} ({type(axis).__name__})")
        axis = int(axis)
        if not -tensor.dim() <= axis < tensor.dim():
            raise ValueError(f"axis {axis} is out of range for '{name}.{parameter_name}' of shape {list(tensor.shape)}")
        axis = axis % tensor.dim()
        count = int(tensor.shape[axis])
        remove = normalize_indices(indices, count, f"{name}.{parameter_name}")
        description = f"remove {len(remove)} of {count} entries on axis {axis} of '{name}.{parameter_name}'"
        if len(remove) == 0:
            return Plan(description=description + " (nothing to do)")
        edits = slice_tensor(module, parameter_name, axis, complement(remove, count))
        plan = finish_plan(self.model, self.optimizer, description, edits)
        plan.apply(self.model, self.optimizer)
        return plan

    def groups(self, ignored_layers: Sequence[nn.Module] = (), include_outputs: bool = False) -> list[Group]:
        """The coupled groups of the model that can be pruned, each once (see
        :mod:`torchpruner.graph.dependency`): ``group.num_units``, ``group.members``,
        ``print(group)``. Classifier outputs are left out unless ``include_outputs=True``.

        Groups that hold a layer's units but cannot be pruned are left out too, with a
        :class:`~torchpruner.graph.dependency.RefusedGroupsWarning` (once per traced graph) giving
        their count and the first reasons; :meth:`refused_groups` lists them all."""
        dependencies = get_dependency_graph(self.graph())
        dependencies.warn_refused(ignored_layers)
        return dependencies.groups(ignored_layers=ignored_layers, include_outputs=include_outputs)

    def refused_groups(self, ignored_layers: Sequence[nn.Module] = ()) -> list[Group]:
        """The groups that hold units of a layer but cannot be pruned: ``group.refusal`` names the
        op that cannot be followed and its call site, ``group.refusal_site`` is that call site.
        Groups reaching the model output (see ``include_outputs``) are not refusals."""
        return get_dependency_graph(self.graph()).refused_groups(ignored_layers)

    @collector_paused()
    def plan_groups(self, selection: dict[Group, Any], description: str | None = None) -> Plan:
        """Plan the removal of ``{group: units}`` (units index ``range(group.num_units)``); changes nothing."""
        if not isinstance(selection, Mapping):
            raise TypeError(
                f"selection must be a dict {{group: units}} of groups from pruner.groups(), got a "
                f"{type(selection).__name__}"
            )
        checked: dict[Group, list[int]] = {}
        for group, units in selection.items():
            _check_is_group(group)
            remove = normalize_indices(units, group.num_units, f"group {group.index}", allow_all=True, argument="units")
            if len(remove):
                checked[group] = remove.tolist()
        if not checked:
            return Plan(description=(description or "remove nothing") + " (nothing to do)")
        check_group_selection(self.model, checked)
        expanded = with_whole_conv_groups(next(iter(checked))._dep, checked)  # grouped convs losing whole groups
        if expanded != checked:  # the same selection needs no second check (the check changes nothing)
            check_group_selection(self.model, expanded)
        checked = expanded
        text = describe_selection(checked)
        edits = group_edits(checked, self.dropout_policy)
        return finish_plan(
            self.model, self.optimizer, f"{description}: {text}" if description else f"remove {text}", edits
        )

    def prune_group(self, group: Group, units: Any) -> Plan:
        """Remove ``units`` (indices into ``range(group.num_units)``) of a group from ``groups()``."""
        _check_is_group(group)
        plan = self.plan_groups({group: units})
        plan.apply(self.model, self.optimizer)
        return plan

    def kept_units(self, module: nn.Module, direction: str = "out") -> list[int] | None:
        """Original ids of the units ``module`` still holds; see :func:`torchpruner.rules.kept_units`."""
        self._name_of(module)
        return kept_units(module, direction)

    # -- internals ------------------------------------------------------------------------

    def _example_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return make_example_inputs(self.model, self.input_size, self.example_inputs, self.device)

    def _graph_with_sites(self, graph: ModelGraph, modules: Sequence[nn.Module]) -> ModelGraph:
        """fx traces *through* some modules (subclasses of torch.nn layers defined elsewhere); when
        one of ``modules`` has no call site of its own, use a forward-hook trace, where every leaf
        module is a call site."""
        if graph.method != "fx" or all(graph.has_sites(m) for m in modules):
            return graph
        missing = [self._name_of(m) for m in modules if not graph.has_sites(m)]
        logger.info("modules %s are traced through by torch.fx; following the data flow with forward hooks", missing)
        args, kwargs = self._example_inputs()
        return ModelGraph(self.model, args, kwargs, method="hooks")

    def _plan_on_hooks_trace(
        self,
        graph: ModelGraph,
        module: nn.Module,
        name: str,
        rule: SlicingRule,
        remove: torch.Tensor,
        num_units: int,
        cascade: list[nn.Module],
        description: str,
        include_outputs: bool,
    ) -> Plan:
        consumers = follow_modules(
            graph,
            module,
            remove,
            num_units,
            cascade,
            self.dropout_policy,
            lambda site, flow, guessed: self._verify_flatten(module, site, flow, guessed),
        )
        source_selection = UnitSelection.from_remove(remove, num_units, dropout_policy=self.dropout_policy)
        edits = rule_edits(rule, module, name, source_selection, "out")
        edits += kept_units_edit(module, rule, source_selection.keep, None)
        for consumer, selection in consumers:
            consumer_name = self._name_of(consumer)
            consumer_rule = self._rule_of(consumer, consumer_name)
            edits += rule_edits(consumer_rule, consumer, consumer_name, selection, "in")
            edits += kept_units_edit(
                consumer,
                consumer_rule,
                out_keep_after_in(consumer_rule, consumer, consumer_name, selection),
                selection.keep,
            )
        listed = ", ".join(f"'{self._name_of(m)}'" for m, _ in consumers)
        if listed:
            description += f"; slice {listed}"
        plan = finish_plan(self.model, self.optimizer, description, edits)
        site = graph.sites_of(module)[0]
        assert site.unit_axis is not None and site.shape is not None  # the walk starts only at such a site
        source_flow = Flow(remove, num_units, site.unit_axis, tuple(site.shape))
        self._check_runs_after(plan, module, name, include_outputs)
        self._check_reaches_only_listed(module, name, source_flow, consumers)
        return plan

    def _verify_flatten(
        self, source: nn.Module, site: CallSite, source_flow: Flow, guessed: torch.Tensor | None
    ) -> None:
        """Check a guessed mapping of the pruned units into ``site``'s input on the model.

        The pruned units are perturbed at ``source``'s output: the consumer's inputs that change
        must all be among the guessed positions (an activation can hide a change, never create
        one), and some must change. Otherwise the data between the two layers is rearranged by code
        the hooks trace cannot see (a permute before a flatten...), and the prune is refused.
        ``guessed`` None: no mapping follows from the unit counts; the refusal says whether the
        consumer reads the pruned units at all.
        """
        source_name, consumer = self._name_of(source), site.module_name
        hidden = (
            f"torch.fx could not trace the model, and '{site.label}' reads the units of '{source_name}' "
            f"through operations the fallback trace cannot see"
        )
        changed = self._inputs_changed_by(source, site, source_flow)
        if changed is None:
            raise ValueError(f"{hidden}; the mapping cannot be verified, so the prune is refused")
        if not changed.any():
            raise ValueError(
                f"'{consumer}' in cascading_modules: its input does not depend on the pruned units of "
                f"'{source_name}' (not reached from it in the data flow)"
            )
        if guessed is None:
            raise ValueError(
                f"'{consumer}' reads the pruned units of '{source_name}' (changing them changes its input), but "
                f"through operations torch.fx could not trace that combine units: its {changed.numel()} inputs do "
                f"not follow from the {source_flow.num_units} units of '{source_name}' one by one (a chunk or "
                f"split whose parts are combined, as in a GLU, couples unit i with another unit); make the model "
                f"traceable by torch.fx, or prune a layer whose units reach '{consumer}' unit by unit"
            )
        per_unit = len(guessed) // max(len(source_flow.remove), 1)
        if changed.numel() != source_flow.num_units * per_unit:
            raise ValueError(f"{hidden}; the mapping cannot be verified, so the prune is refused")
        allowed = torch.zeros_like(changed)
        allowed[guessed] = True
        if (changed & ~allowed).any():
            raise ValueError(
                f"{hidden}, and they are not a channel-major flatten of the pruned units (e.g. a permute "
                f"before the flatten, or a chunk whose parts are combined); pass a model torch.fx can "
                f"trace, or prune it in a way that keeps the unit order"
            )

    def _inputs_changed_by(self, source: nn.Module, site: CallSite, source_flow: Flow) -> torch.Tensor | None:
        """Which (flattened, per example) inputs of ``site``'s module change when the pruned units of
        ``source`` are pushed up and down on the example input; None when it is not called."""
        if site.module is None:
            return None
        return self._probe(source, source_flow, [site.module]).get(id(site.module))

    def _probe(
        self, source: nn.Module, flow: Flow, watched: Sequence[nn.Module], frozen: Sequence[nn.Module] = ()
    ) -> dict[int, torch.Tensor]:
        """Run the model three times on the example input: as it is, then with the pruned units of
        ``source`` pushed up, then down (an activation can hide one direction, not both), with the
        outputs of ``frozen`` modules held at their first-run values. Returns, per watched module
        (by id) that is called the same way each time, which of its flattened per-example first
        inputs changed."""
        args, kwargs = self._example_inputs()
        seen: dict[int, list[torch.Tensor]] = {id(m): [] for m in watched}
        held: dict[int, list[Any]] = {id(m): [] for m in frozen}
        run: dict[str, Any] = {"sign": 0.0, "call": {}}

        def grab(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() > 0:
                seen[id(module)].append(inputs[0].detach().reshape(inputs[0].shape[0], -1).clone())

        def hold(module: nn.Module, _inputs: tuple[Any, ...], output: Any) -> Any:
            calls = held[id(module)]
            if run["sign"] == 0.0:
                calls.append(output)
                return None
            index = run["call"].get(id(module), 0)
            run["call"][id(module)] = index + 1
            return calls[index] if index < len(calls) else None

        def perturb(_module: nn.Module, _inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            if run["sign"] == 0.0 or not isinstance(output, torch.Tensor):
                return None
            index: list[Any] = [slice(None)] * output.dim()
            index[flow.axis] = flow.remove.to(output.device)
            output = output.clone()
            output[tuple(index)] += run["sign"] * (1.0 + output[tuple(index)].abs())
            return output

        handles = [m.register_forward_pre_hook(grab) for m in watched]
        handles += [m.register_forward_hook(hold) for m in frozen]
        handles.append(source.register_forward_hook(perturb))
        try:
            with preserved_state(self.model), torch.no_grad():
                rng = torch.get_rng_state()
                for sign in (0.0, 1.0, -1.0):
                    run["sign"], run["call"] = sign, {}
                    torch.set_rng_state(rng)  # the same random draws in every run
                    self.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        changes: dict[int, torch.Tensor] = {}
        for key, tensors in seen.items():
            calls = len(tensors) // 3
            if calls == 0 or len(tensors) != 3 * calls or any(t.shape != tensors[0].shape for t in tensors):
                continue
            changed = torch.zeros(tensors[0].shape[1], dtype=torch.bool)
            for perturbed in (tensors[calls : 2 * calls], tensors[2 * calls :]):
                for before, after in zip(tensors[:calls], perturbed):
                    changed |= (before != after).any(dim=0).cpu()
            changes[key] = changed
        return changes

    def _check_reaches_only_listed(
        self, source: nn.Module, source_name: str, flow: Flow, consumers: list[tuple[nn.Module, UnitSelection]]
    ) -> None:
        """The hooks trace cannot see code between modules: check on the model that the pruned
        units reach no module with tensors other than the listed ones. The listed consumers' outputs
        are held fixed (they absorb the units); any other module holding parameters or buffers whose
        input then changes with the pruned units reads them unseen, and the plan is refused."""
        sliced = {id(m) for owner in [source] + [m for m, _ in consumers] for m in owner.modules()}
        frozen = [
            m
            for m, selection in consumers
            if removed_out(self._rule_of(m, self._name_of(m)), m, self._name_of(m), selection) is None
        ]
        watched = []
        for module in self.model.modules():
            if id(module) in sliced or any(True for _ in module.children()):
                continue
            if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
                continue  # nothing of its own to slice; the modules it feeds are watched
            watched.append(module)
        changes = self._probe(source, flow, watched, frozen)
        for module in watched:
            changed = changes.get(id(module))
            if changed is not None and changed.any():
                name = self._name_of(module)
                raise ValueError(
                    f"'{name}' ({type(module).__name__}) reads the pruned units of '{source_name}' "
                    f"through operations the forward-hook trace cannot see (torch.fx could not trace "
                    f"{type(self.model).__name__}), and it is not in cascading_modules; list it if it "
                    f"reads them unit by unit, or make the model traceable by torch.fx"
                )

    def _check_runs_after(self, plan: Plan, source: nn.Module, source_name: str, include_outputs: bool) -> None:
        """A forward-hook trace cannot see merges (``x + f(x)``, ``torch.cat``) or reshapes, so the
        data flow it gives may be wrong: apply the plan to a copy and refuse it if the copy no
        longer runs on the example input, or if its output shape changes (the pruned units are
        outputs of the model) without ``include_outputs``. A model that cannot be copied cannot
        be checked, and its plan is refused."""
        model_type = type(self.model).__name__
        try:
            trial = copy.deepcopy(self.model)
        except Exception as exc:
            raise ValueError(
                f"the plan to prune '{source_name}' cannot be verified: torch.fx could not trace {model_type}, so "
                f"the data flow comes from forward hooks, which do not see merges (x + f(x), torch.cat) or reshapes; "
                f"such a plan is checked on a copy of the model, and {model_type} cannot be deep-copied "
                f"({type(exc).__name__}: {exc}). Make the model traceable by torch.fx, or deep-copyable (keep open "
                f"files, locks and other resources outside the module, or give it a __deepcopy__)"
            ) from None
        args, kwargs = make_example_inputs(trial, self.input_size, self.example_inputs, self.device)
        with preserved_state(trial), torch.no_grad():
            shapes_before = _output_shapes(trial(*args, **kwargs))
        plan.apply(trial)
        try:
            with preserved_state(trial), torch.no_grad():
                shapes_after = _output_shapes(trial(*args, **kwargs))
        except Exception as exc:
            raise ValueError(
                f"pruning '{source_name}' as planned breaks the model: {type(exc).__name__}: {exc}. torch.fx "
                f"could not trace {model_type}, and the forward-hook trace does not see merges "
                f"(x + f(x), torch.cat) or reshapes that the pruned units flow into; prune a layer whose units "
                f"reach only the listed modules, or make the model traceable by torch.fx"
            ) from None
        if shapes_after != shapes_before and not include_outputs:
            raise ValueError(
                output_units_refusal(
                    source_name, source, f"the output shape goes from {shapes_before} to {shapes_after}"
                )
            )

    def _name_of(self, module: nn.Module) -> str:
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
        named: Iterator[tuple[str, nn.Module]] = self.model.named_modules(remove_duplicate=False)
        for name, candidate in named:
            if candidate is module:
                return name
        raise ValueError(
            f"{type(module).__name__} module {_short_repr(module)} is not part of the model {type(self.model).__name__}"
        )

    def _rule_of(self, module: nn.Module, name: str) -> SlicingRule:
        rule = get_slicing_rule(module)
        if rule is None:
            raise TypeError(
                f"'{name}' ({type(module).__name__}) has no slicing rule; register one with "
                f"torchpruner.register_slicing_rule({type(module).__name__})"
            )
        return rule

    def _check_cascade(self, cascading_modules: Any, source: nn.Module, source_name: str) -> list[nn.Module]:
        if isinstance(cascading_modules, nn.Module):
            cascading_modules = [cascading_modules]
        cascade: list[nn.Module] = []
        for module in cascading_modules:
            name = self._name_of(module)
            if module is source:
                raise ValueError(f"'{name}' is the pruned layer; it cannot also be a cascading module")
            self._rule_of(module, name)
            if not any(module is m for m in cascade):
                cascade.append(module)
        return cascade


def _output_shapes(output: Any) -> list[tuple[int, ...]]:
    """The shapes of every tensor in a model output (nested tuples, lists, dicts)."""
    if isinstance(output, torch.Tensor):
        return [tuple(output.shape)]
    if isinstance(output, Mapping):
        return [shape for value in output.values() for shape in _output_shapes(value)]
    if isinstance(output, (tuple, list)):
        return [shape for value in output for shape in _output_shapes(value)]
    return []


def _check_is_group(group: Any) -> None:
    if not isinstance(group, Group):
        raise TypeError(
            f"group must be a Group from pruner.groups(), got {_short_value(group)} ({type(group).__name__})"
        )


def _short_value(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def _short_repr(module: nn.Module) -> str:
    text = repr(module).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."
