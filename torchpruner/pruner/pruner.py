"""The Pruner: remove units of a layer and of the layers that consume them, in place.

Every prune is *plan, validate, act*: :meth:`Pruner.plan` lists every tensor slice, attribute
change and optimizer-state slice (``print(plan)`` is a dry run), checks the whole plan (indices,
data flow, grouped convolutions, tied or parametrized weights, optimizer type), and only
:meth:`Plan.apply` modifies the model, so a refused prune leaves model and optimizer bit-for-bit
as they were.

The data flow comes from the one tracer (:mod:`torchpruner.graph`): starting at the call site(s)
of the pruned layer, the pruned units are followed through element-wise ops, pooling and flatten
(one channel of a ``[N, C, H, W]`` map becomes ``H*W`` contiguous inputs of the next Linear) up to
the layers that consume them. Every module listed in ``cascading_modules`` must be reached that way
(the order of the list does not matter), and every layer with per-unit tensors that is reached
must be listed.
"""

from __future__ import annotations

import importlib
import logging
import operator
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from torchpruner.graph import CallSite, ModelGraph, get_graph, make_example_inputs, unwrap_model

from .optimizer import check_optimizer, describe_optimizer_surgery, plan_optimizer_surgery
from .plan import KEPT_UNITS_ATTRIBUTE, AttributeChange, Edit, Plan, TensorSlice, resolve_model
from .rules import DROPOUT_POLICIES, GroupedSliceError, SlicingRule, UnitSelection, get_slicing_rule, slice_tensor

logger = logging.getLogger(__name__)

__all__ = ["Pruner", "kept_units", "discover_cascading_modules", "normalize_indices"]


# --------------------------------------------------------------------------------------------
# Hook point for automatic discovery of cascading modules (the dependency issue)
# --------------------------------------------------------------------------------------------

def discover_cascading_modules(graph: ModelGraph, module: nn.Module) -> List[nn.Module]:
    """The modules that must be sliced with ``module`` (``cascading_modules=None``).

    Delegates to ``torchpruner.graph.dependency.discover(graph, module)`` once it exists.
    """
    try:
        dependency = importlib.import_module("torchpruner.graph.dependency")  # the dependency issue
    except ModuleNotFoundError as exc:
        if exc.name != "torchpruner.graph.dependency":
            raise
        dependency = None
    discover = getattr(dependency, "discover", None) if dependency is not None else None
    if discover is None:
        raise NotImplementedError(
            f"automatic discovery of cascading modules is not available yet: pass the layers that consume "
            f"the pruned units of '{graph.module_name(module)}' explicitly, e.g. "
            f"prune_model(module, indices, cascading_modules=[bn, next_conv])")
    return list(discover(graph, module))


# --------------------------------------------------------------------------------------------
# Index validation
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Bookkeeping: original unit ids a layer still holds
# --------------------------------------------------------------------------------------------

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


def _slices_of(plan: Plan) -> Dict[Tuple[str, str, int], tuple]:
    """Every tensor slice of a plan as ``{(module, tensor, axis): kept ids}`` in one canonical form, so
    plans built differently can be compared: a grouped slice along axis 0 becomes flat ids, one
    along another axis a tuple of per-block ids (a single block when every block keeps the same)."""
    slices = {}
    for edit in plan.edits:
        if not isinstance(edit, TensorSlice):
            continue
        if edit.group_keep is None:
            kept: tuple = (tuple(edit.keep.tolist()),)
        elif edit.axis == 0:
            size = edit.old_shape[0] // len(edit.group_keep)
            kept = (tuple(b * size + i for b, block in enumerate(edit.group_keep) for i in block.tolist()),)
        else:
            blocks = [tuple(block.tolist()) for block in edit.group_keep]
            kept = (blocks[0],) if all(block == blocks[0] for block in blocks) else tuple(blocks)
        slices[(edit.module_name, edit.tensor_name, edit.axis)] = kept
    return slices


def _kept_units_edit(module: nn.Module, rule: SlicingRule, out_keep: Optional[torch.Tensor],
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


def _complement(remove: torch.Tensor, num_units: int) -> torch.Tensor:
    mask = torch.ones(num_units, dtype=torch.bool)
    mask[remove] = False
    return mask.nonzero().flatten()


# --------------------------------------------------------------------------------------------
# Following pruned units through the traced data flow
# --------------------------------------------------------------------------------------------

@dataclass
class _Flow:
    """Where the pruned units sit in one call site's output."""

    remove: torch.Tensor
    num_units: int
    axis: int
    shape: Tuple[int, ...]


_RESHAPE_METHODS = {"view", "reshape"}
_RESHAPE_FUNCTIONS = {torch.reshape}
_PERMUTE_TARGETS = {"permute", "transpose", "swapaxes", torch.permute, torch.transpose, torch.swapaxes}


def _literal_ints(args: Any) -> List[int]:
    out: List[int] = []
    if isinstance(args, bool):
        return out
    if isinstance(args, int):
        return [args]
    if isinstance(args, (tuple, list)):
        for a in args:
            out += _literal_ints(a)
    return out


# ops that act along the dims they are given: (position of the dims argument after the input, keyword)
_ALONG_DIMS: Dict[Any, Tuple[int, str]] = {}
for _target, _position, _keyword in (
        ("flip", 0, "dims"), (torch.flip, 0, "dims"), ("roll", 1, "dims"), (torch.roll, 1, "dims"),
        ("narrow", 0, "dim"), (torch.narrow, 0, "dim"), ("index_select", 0, "dim"), (torch.index_select, 0, "dim"),
        ("gather", 0, "dim"), (torch.gather, 0, "dim"), ("take_along_dim", 1, "dim"), (torch.take_along_dim, 1, "dim"),
        ("cumsum", 0, "dim"), (torch.cumsum, 0, "dim"), ("cumprod", 0, "dim"), (torch.cumprod, 0, "dim"),
        ("softmax", 0, "dim"), (torch.softmax, 0, "dim"), (torch.nn.functional.softmax, 0, "dim"),
        ("log_softmax", 0, "dim"), (torch.log_softmax, 0, "dim"), (torch.nn.functional.log_softmax, 0, "dim"),
        (torch.nn.functional.normalize, 1, "dim"),
        *[(r, 0, "dim") for r in ("sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "std", "var",
                                  "prod", "norm", "logsumexp", "nansum", "nanmean", "median", "all", "any")],
        *[(getattr(torch, r), 0, "dim") for r in ("sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin",
                                                  "std", "var", "prod", "norm", "logsumexp", "nansum", "nanmean",
                                                  "median", "all", "any")]):
    _ALONG_DIMS[_target] = (_position, _keyword)
# reductions whose dims default to "all of them"
_ALL_DIMS_BY_DEFAULT = {t for t in _ALONG_DIMS if (t if isinstance(t, str) else getattr(t, "__name__", "")) in (
    "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "std", "var", "prod", "norm", "nansum",
    "nanmean", "median", "all", "any")}


def _acts_across_units(site: CallSite, axis: int, ndim: int) -> Optional[str]:
    """Why ``site`` mixes or reorders the units on ``axis`` (None when it does not, as far as known).

    Shapes alone cannot tell ``x.flip(1)`` or ``x[:, perm]`` from an element-wise op, nor
    ``x.sum(1)`` from a spatial reduction when sizes coincide: read the op's arguments.
    """
    node = site.node
    if node is None or site.kind not in ("function", "method"):
        return None
    if site.target is operator.getitem:
        index = node.args[1] if len(node.args) > 1 else None
        index = index if isinstance(index, tuple) else (index,)
        full = slice(None, None, None)
        if any(i is None for i in index):
            return "indexing that inserts dims" if index.index(None) <= axis else None
        if Ellipsis in index:
            cut = index.index(Ellipsis)
            before, after = index[:cut], index[cut + 1:]
            if axis < len(before):
                return None if before[axis] == full else "indexing on the unit axis"
            offset = axis - (ndim - len(after))
            return None if offset < 0 or after[offset] == full else "indexing on the unit axis"
        if axis < len(index) and index[axis] != full:
            return "indexing on the unit axis"
        if any(not isinstance(i, (slice, int)) for i in index[:axis]):
            return "advanced indexing before the unit axis"
        return None
    spec = _ALONG_DIMS.get(site.target)
    if spec is None:
        return None
    position, keyword = spec
    rest = list(node.args[1:])
    dims = node.kwargs.get(keyword, rest[position] if position < len(rest) else None)
    if dims is None:
        return f"{_describe_target(site)} over every dim" if site.target in _ALL_DIMS_BY_DEFAULT else None
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    try:
        if any(int(d) % ndim == axis for d in dims):
            return f"{_describe_target(site)} along the unit axis {axis}"
    except (TypeError, ValueError):
        return f"{_describe_target(site)} along dims {dims} the pruner cannot read"
    return None


def _follow_site(flow: _Flow, site: CallSite, source_name: str) -> Optional[_Flow]:
    """Where the units of ``flow`` are in ``site``'s output (``site`` reads them unchanged per unit)."""
    if site.shape is None:
        return None
    in_shape, out_shape, a = tuple(flow.shape), tuple(site.shape), flow.axis
    problem = (f"the pruned units of '{source_name}' flow into '{site.label}' ({_describe_target(site)}, shape "
               f"{list(in_shape)} -> {list(out_shape)})")
    if site.kind in ("function", "method") and site.target in _PERMUTE_TARGETS and site.node is not None:
        args = list(site.node.args[1:])
        try:
            if site.target in ("permute", torch.permute):
                dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
                new_axis = [int(d) % len(in_shape) for d in dims].index(a)
            else:
                d0, d1 = int(args[0]) % len(in_shape), int(args[1]) % len(in_shape)
                new_axis = d1 if a == d0 else d0 if a == d1 else a
        except (TypeError, ValueError, IndexError):
            raise ValueError(problem + ", a permutation the pruner cannot follow") from None
        return _Flow(flow.remove, flow.num_units, new_axis, out_shape)
    if site.kind in ("function", "method") and (site.target in _RESHAPE_METHODS or site.target in _RESHAPE_FUNCTIONS):
        literal = [v for v in _literal_ints(site.node.args[1:] if site.node is not None else ()) if v > 1]
        unit_dims = {out_shape[i] for i in range(len(out_shape)) if i >= a}
        if any(v in unit_dims for v in literal) and len(out_shape) > a and out_shape[a] in literal:
            raise ValueError(problem + f", a reshape with hard-coded sizes {literal}: it would break after "
                             f"pruning; use x.flatten(1) or x.view(x.size(0), -1)")
    across = _acts_across_units(site, a, len(in_shape))
    if across is not None:
        raise ValueError(problem + f", {across}: it mixes or reorders the units; prune another layer "
                         f"or let the pruner find the cascade (cascading_modules=None)")
    if len(out_shape) > a and out_shape[:a + 1] == in_shape[:a + 1]:
        return _Flow(flow.remove, flow.num_units, a, out_shape)  # element-wise, pooling, trailing reduction
    if len(out_shape) > a and out_shape[:a] == in_shape[:a]:
        # flatten of dims a..a+m-1 (channel-major: unit c owns a contiguous block)
        product = 1
        for m in range(a, len(in_shape)):
            product *= in_shape[m]
            if product == out_shape[a] and out_shape[a + 1:] == in_shape[m + 1:]:
                block = product // in_shape[a]
                remove = (flow.remove[:, None] * block + torch.arange(block)[None, :]).flatten()
                return _Flow(remove, flow.num_units * block, a, out_shape)
            if product > out_shape[a]:
                break
    raise ValueError(problem + ", a reshape the pruner cannot follow; prune another layer or register a "
                     "slicing rule for a module doing this")


def _describe_target(site: CallSite) -> str:
    if site.kind == "module":
        return type(site.module).__name__
    target = site.target
    return getattr(target, "__name__", str(target))


def _data_inputs(site: CallSite) -> List[CallSite]:
    return [s for s in site.inputs if s.kind != "attr"]


# --------------------------------------------------------------------------------------------
# The Pruner
# --------------------------------------------------------------------------------------------

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

    def __init__(self, model: nn.Module, input_size: Optional[Sequence[int]] = None,
                 device: Optional[torch.device | str] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                 *, example_inputs: Any = None, dropout_policy: str = "linear") -> None:
        self.model = unwrap_model(model)
        check_optimizer(optimizer)
        if dropout_policy not in DROPOUT_POLICIES:
            raise ValueError(f"dropout_policy must be one of {sorted(DROPOUT_POLICIES)}, got {dropout_policy!r}")
        self.input_size = tuple(input_size) if input_size is not None else None
        self.example_inputs = example_inputs
        self.device = device
        self.optimizer = optimizer
        self.dropout_policy = dropout_policy

    # -- public API -----------------------------------------------------------------------

    def _graph_with_sites(self, graph: ModelGraph, modules: Sequence[nn.Module]) -> ModelGraph:
        """fx traces *through* user-defined modules; when one of ``modules`` has no call site of
        its own, use a forward-hook trace, where every leaf module is a call site."""
        if graph.method != "fx" or all(id(m) in graph._by_module for m in modules):
            return graph
        missing = [self._name_of(m) for m in modules if id(m) not in graph._by_module]
        logger.info("modules %s are traced through by torch.fx; following the data flow with forward hooks", missing)
        args, kwargs = make_example_inputs(self.model, self.input_size, self.example_inputs, self.device)
        return ModelGraph(self.model, args, kwargs, method="hooks")

    def graph(self) -> ModelGraph:
        """The traced graph of the model (cached by the tracer; rebuilt after a prune)."""
        if self.input_size is None and self.example_inputs is None:
            raise ValueError("the Pruner needs input_size= or example_inputs= to follow the data flow of the model")
        args, kwargs = make_example_inputs(self.model, self.input_size, self.example_inputs, self.device)
        return get_graph(self.model, args, kwargs)

    def plan(self, module: nn.Module, indices: Any, cascading_modules: Optional[Sequence[nn.Module]] = None) -> Plan:
        """Plan the removal of output units ``indices`` of ``module`` and their consumers; changes nothing.

        Args:
            module: the layer whose output units go (Linear, Conv*, ConvTranspose*, Embedding, or a
                type with a registered slicing rule).
            indices: unit indices along the layer's unit axis (a list, numpy array or int tensor).
            cascading_modules: the modules after ``module`` that read the pruned units (BatchNorm,
                Dropout, the next Linear/Conv, ...), in any order. None: discover them from the graph.

        Returns:
            a :class:`Plan`; ``str(plan)`` lists every change.

        Raises:
            ValueError / TypeError: naming the module and the problem (see the module docstring).
        """
        name = self._name_of(module)
        rule = self._rule_of(module, name)
        if rule.passes_units_through:
            raise ValueError(f"'{name}' ({type(module).__name__}) passes its input units through; prune the "
                             f"layer that produces them and list '{name}' in cascading_modules")
        num_units = rule.out_units(module)
        if num_units is None:
            raise TypeError(f"'{name}' ({type(module).__name__}) has no output units to prune")
        remove = normalize_indices(indices, num_units, name)
        description = f"remove {len(remove)} of {num_units} output units of '{name}' ({type(module).__name__})"
        if len(remove) == 0:
            return Plan(description=description + " (nothing to do)")
        if cascading_modules is None:
            # automatic discovery (dependency issue): the whole coupled group of the pruned units
            from torchpruner.graph.dependency import plan_prune
            return plan_prune(self, module, remove)
        graph = self.graph()
        cascade = self._check_cascade(cascading_modules, module, name)
        graph = self._graph_with_sites(graph, [module] + cascade)
        consumers = self._follow(graph, module, name, remove, num_units, cascade)

        source_selection = UnitSelection.from_remove(remove, num_units, dropout_policy=self.dropout_policy)
        edits = self._rule_edits(rule, module, name, source_selection, "out")
        edits += _kept_units_edit(module, rule, source_selection.keep, None)
        for consumer, selection in consumers:
            consumer_rule = get_slicing_rule(consumer)
            consumer_name = self._name_of(consumer)
            edits += self._rule_edits(consumer_rule, consumer, consumer_name, selection, "in")
            out_removed = self._removed_out(consumer_rule, consumer, consumer_name, selection)
            out_keep = None
            if out_removed is not None:
                out_count = consumer_rule.out_units(consumer)
                out_keep = _complement(out_removed, out_count) if out_count is not None else None
            edits += _kept_units_edit(consumer, consumer_rule, out_keep, selection.keep)
        listed = ", ".join(f"'{self._name_of(m)}'" for m, _ in consumers)
        if listed:
            description += f"; slice {listed}"
        plan = self._finish(description, edits)
        if graph.method == "hooks":
            self._check_runs_after(plan, name)
        else:
            self._cross_check(plan, module, name, remove)
        return plan

    def _cross_check(self, plan: Plan, module: nn.Module, name: str, remove: torch.Tensor) -> None:
        """The explicit-cascade walk and the dependency analysis are two readings of one graph: where
        the analysis can plan the same prune, every tensor slice of the two plans must agree, or the
        prune is refused (one of them is wrong, and a wrong slice is a silently wrong model)."""
        from torchpruner.graph.dependency import plan_prune

        try:
            reference = plan_prune(self, module, remove)
        except (ValueError, TypeError, NotImplementedError):
            return  # the analysis refuses this prune (a coupled group, an op it cannot follow)
        mine, theirs = _slices_of(plan), _slices_of(reference)
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                which = "only the explicit cascade" if key not in theirs else (
                    "only the graph analysis" if key not in mine else "the two differently")
                raise ValueError(f"pruning '{name}' with the given cascading_modules: '{key[0]}.{key[1]}' is sliced "
                                 f"by {which} (explicit walk vs dependency analysis); refusing a prune the two "
                                 f"readings of the graph disagree on (prune with cascading_modules=None, and "
                                 f"please report this model)")

    def _check_runs_after(self, plan: Plan, source_name: str) -> None:
        """A forward-hook trace cannot see merges (``x + f(x)``, ``torch.cat``) or reshapes, so the
        data flow it gives may be wrong: apply the plan to a copy and refuse it if the copy no
        longer runs on the example input."""
        import copy

        from torchpruner.graph import preserved_state

        try:
            trial = copy.deepcopy(self.model)
        except Exception as exc:  # models that cannot be copied: the plan stays unchecked
            logger.warning("could not copy %s to check the plan (%s); a merge the hooks trace cannot see "
                           "would break the model", type(self.model).__name__, exc)
            return
        plan.apply(trial)
        args, kwargs = make_example_inputs(trial, self.input_size, self.example_inputs, self.device)
        try:
            with preserved_state(trial), torch.no_grad():
                trial(*args, **kwargs)
        except Exception as exc:
            raise ValueError(
                f"pruning '{source_name}' as planned breaks the model: {type(exc).__name__}: {exc}. torch.fx "
                f"could not trace {type(self.model).__name__}, and the forward-hook trace does not see merges "
                f"(x + f(x), torch.cat) or reshapes that the pruned units flow into; prune a layer whose units "
                f"reach only the listed modules, or make the model traceable by torch.fx") from None

    def prune_model(self, module: nn.Module, indices: Any,
                    cascading_modules: Optional[Sequence[nn.Module]] = None) -> Plan:
        """Remove output units ``indices`` of ``module``, slice the cascading modules, fix the optimizer.

        Same arguments as :meth:`plan`; returns the applied plan.
        """
        plan = self.plan(module, indices, cascading_modules)
        plan.apply(self.model, self.optimizer)
        return plan

    def prune_module(self, module: nn.Module, indices: Any, direction: str = "out",
                     original_len: Optional[int] = None) -> Plan:
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
        edits = self._rule_edits(rule, module, name, selection, direction)
        if direction == "out":
            edits += _kept_units_edit(module, rule, selection.keep, None)
        else:
            out_removed = self._removed_out(rule, module, name, selection)
            out_count = rule.out_units(module)
            out_keep = _complement(out_removed, out_count) if out_removed is not None and out_count is not None else None
            edits += _kept_units_edit(module, rule, out_keep, selection.keep)
        plan = self._finish(description, edits)
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
        if not -tensor.dim() <= axis < tensor.dim():
            raise ValueError(f"axis {axis} is out of range for '{name}.{parameter_name}' of shape {list(tensor.shape)}")
        axis = axis % tensor.dim()
        count = int(tensor.shape[axis])
        remove = normalize_indices(indices, count, f"{name}.{parameter_name}")
        description = f"remove {len(remove)} of {count} entries on axis {axis} of '{name}.{parameter_name}'"
        if len(remove) == 0:
            return Plan(description=description + " (nothing to do)")
        edits = slice_tensor(module, parameter_name, axis, _complement(remove, count))
        plan = self._finish(description, edits)
        plan.apply(self.model, self.optimizer)
        return plan

    def groups(self, ignored_layers: Sequence[nn.Module] = (), include_outputs: bool = False) -> list:
        """The coupled groups of the model that can be pruned, each once (see
        :mod:`torchpruner.graph.dependency`): ``group.num_units``, ``group.members``,
        ``print(group)``. Classifier outputs are left out unless ``include_outputs=True``."""
        from torchpruner.graph.prune_groups import pruner_groups  # dependency issue
        return pruner_groups(self, ignored_layers, include_outputs)

    def prune_group(self, group: Any, units: Any) -> Plan:
        """Remove ``units`` (indices into ``range(group.num_units)``) of a group from ``groups()``."""
        from torchpruner.graph.dependency import plan_group  # dependency issue
        plan = plan_group(self, {group: [int(u) for u in units]})
        plan.apply(self.model, self.optimizer)
        return plan

    def kept_units(self, module: nn.Module, direction: str = "out") -> Optional[List[int]]:
        """Original ids of the units ``module`` still holds; see :func:`kept_units`."""
        self._name_of(module)
        return kept_units(module, direction)

    # -- planning internals ---------------------------------------------------------------

    def _name_of(self, module: nn.Module) -> str:
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
        for name, candidate in self.model.named_modules(remove_duplicate=False):
            if candidate is module:
                return name
        raise ValueError(f"{type(module).__name__} module {_short_repr(module)} is not part of the model "
                         f"{type(self.model).__name__}")

    def _rule_of(self, module: nn.Module, name: str) -> SlicingRule:
        rule = get_slicing_rule(module)
        if rule is None:
            raise TypeError(f"'{name}' ({type(module).__name__}) has no slicing rule; register one with "
                            f"torchpruner.pruner.register_slicing_rule({type(module).__name__})")
        return rule

    def _rule_edits(self, rule: SlicingRule, module: nn.Module, name: str, selection: UnitSelection,
                    direction: str) -> List[Edit]:
        _check_not_parametrized(module, name)
        try:
            return rule.prune_out(module, selection) if direction == "out" else rule.prune_in(module, selection)
        except GroupedSliceError as exc:
            raise ValueError(f"'{name}': {exc}") from None
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"'{name}' ({type(module).__name__}): {exc}") from None

    def _removed_out(self, rule: SlicingRule, module: nn.Module, name: str,
                     selection: UnitSelection) -> Optional[torch.Tensor]:
        try:
            return rule.removed_out_after_in(module, selection)
        except GroupedSliceError as exc:
            raise ValueError(f"'{name}': {exc}") from None

    def _check_cascade(self, cascading_modules: Any, source: nn.Module, source_name: str) -> List[nn.Module]:
        if isinstance(cascading_modules, nn.Module):
            cascading_modules = [cascading_modules]
        cascade: List[nn.Module] = []
        for module in cascading_modules:
            name = self._name_of(module)
            if module is source:
                raise ValueError(f"'{name}' is the pruned layer; it cannot also be a cascading module")
            self._rule_of(module, name)
            if not any(module is m for m in cascade):
                cascade.append(module)
        return cascade

    def _follow(self, graph: ModelGraph, source: nn.Module, source_name: str, remove: torch.Tensor,
                num_units: int, cascade: List[nn.Module]) -> List[Tuple[nn.Module, UnitSelection]]:
        """Walk the data flow from ``source``; return each cascading module with its input selection."""
        flows: Dict[int, _Flow] = {}
        for site in graph.sites_of(source):
            if site.shape is None or site.unit_axis is None or site.shape[site.unit_axis] != num_units:
                raise ValueError(f"'{source_name}' output shape {site.shape} does not hold its {num_units} units "
                                 f"on the expected axis {site.unit_axis}")
            flows[id(site)] = _Flow(remove, num_units, site.unit_axis, tuple(site.shape))
        last_flow: Optional[_Flow] = flows[id(graph.sites_of(source)[-1])]
        cascade_ids = {id(m) for m in cascade}
        selections: Dict[int, Tuple[nn.Module, UnitSelection]] = {}
        first_index = min(s.index for s in graph.sites_of(source))
        for site in graph.sites:
            if site.index <= first_index or id(site) in flows:
                continue
            incoming = [s for s in site.inputs if id(s) in flows]
            listed = site.kind == "module" and id(site.module) in cascade_ids
            if not incoming:
                if listed and graph.method == "hooks" and last_flow is not None:
                    incoming_flow = self._hooks_guess(last_flow, site, source_name, source,
                                                      flows[id(graph.sites_of(source)[0])])
                else:
                    continue
            else:
                data_inputs = _data_inputs(site)
                foreign = [s for s in data_inputs if id(s) not in flows]
                incoming_flows = [flows[id(s)] for s in incoming]
                same = all(torch.equal(f.remove, incoming_flows[0].remove) and f.axis == incoming_flows[0].axis
                           for f in incoming_flows)
                if foreign or not same:
                    raise ValueError(
                        f"the pruned units of '{source_name}' flow into '{site.label}' ({_describe_target(site)}), "
                        f"which merges them with other tensors; coupled layers must be pruned together "
                        f"(pruner groups, next issue)")
                incoming_flow = incoming_flows[0]
            if site.kind == "module" and site.module is source:
                raise ValueError(f"'{source_name}' reads its own pruned units (a module applied twice in a chain); "
                                 f"not supported")
            if site.kind == "module":
                out_flow = self._through_module(site, incoming_flow, source_name, listed, selections)
            else:
                out_flow = _follow_site(incoming_flow, site, source_name)
            if out_flow is not None:
                flows[id(site)] = out_flow
                last_flow = out_flow
        missing = [m for m in cascade if id(m) not in selections]
        if missing:
            names = ", ".join(f"'{self._name_of(m)}'" for m in missing)
            raise ValueError(f"{names} in cascading_modules: the input does not depend on the pruned units of "
                             f"'{source_name}' (not reached from it in the data flow)")
        # data-flow order
        order = {id(m): min(s.index for s in graph.sites_of(m)) for m, _ in selections.values()}
        return sorted(selections.values(), key=lambda item: order[id(item[0])])

    def _hooks_guess(self, flow: _Flow, site: CallSite, source_name: str, source: nn.Module,
                     source_flow: _Flow) -> _Flow:
        """hooks-mode graphs miss functional reshapes: assume a channel-major flatten when the counts say
        so, and verify it on the model (:meth:`_verify_flatten`) before trusting it."""
        rule = get_slicing_rule(site.module)
        in_units = rule.in_units(site.module) if rule is not None else None
        if in_units is None or in_units == flow.num_units:
            return flow
        if in_units % flow.num_units == 0:
            block = in_units // flow.num_units
            remove = (flow.remove[:, None] * block + torch.arange(block)[None, :]).flatten()
            self._verify_flatten(source, source_flow, flow, site, remove, source_name)
            logger.info("hooks-mode trace: '%s' reads the units of '%s' flattened channel-major (%d inputs per "
                        "unit; checked on the model)", site.label, source_name, block)
            return _Flow(remove, in_units, flow.axis, (flow.shape[0], in_units))
        raise ValueError(f"'{site.label}' reads {in_units} units, which do not follow from the {flow.num_units} "
                         f"pruned-layer units of '{source_name}'")

    def _verify_flatten(self, source: nn.Module, source_flow: _Flow, flow: _Flow, site: CallSite,
                        guessed: torch.Tensor, source_name: str) -> None:
        """Check a guessed flatten mapping by perturbing the pruned units at ``source``'s output.

        The consumer's inputs that change must all be among the guessed positions (an activation can
        hide a change, never create one), and some must change. Otherwise the data between the two
        layers is rearranged by code the hooks trace cannot see (a permute before a flatten...), and
        the prune is refused rather than guessed.
        """
        why = (f"torch.fx could not trace the model, and '{site.label}' reads the units of '{source_name}' through "
               f"operations the fallback trace cannot see")
        if not (torch.equal(flow.remove, source_flow.remove) and flow.num_units == source_flow.num_units):
            raise ValueError(f"{why}; the mapping cannot be verified, so the prune is refused")
        from torchpruner.graph import preserved_state

        args, kwargs = make_example_inputs(self.model, self.input_size, self.example_inputs, self.device)
        seen: List[torch.Tensor] = []
        sign = {"value": 0.0}

        def grab(_module: nn.Module, inputs: tuple) -> None:
            seen.append(inputs[0].detach().reshape(inputs[0].shape[0], -1).clone())

        def perturb(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
            if sign["value"] == 0.0 or not isinstance(output, torch.Tensor):
                return None
            index: List[Any] = [slice(None)] * output.dim()
            index[source_flow.axis] = source_flow.remove.to(output.device)
            output = output.clone()
            output[tuple(index)] += sign["value"] * (1.0 + output[tuple(index)].abs())
            return output

        handles = [site.module.register_forward_pre_hook(grab), source.register_forward_hook(perturb)]
        try:
            with preserved_state(self.model), torch.no_grad():
                for value in (0.0, 1.0, -1.0):
                    sign["value"] = value
                    self.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        calls = len(seen) // 3
        if calls == 0 or seen[0].shape[1] != flow.num_units * (len(guessed) // max(len(flow.remove), 1)):
            raise ValueError(f"{why}; the mapping cannot be verified, so the prune is refused")
        baseline = seen[:calls]
        changed = torch.zeros(seen[0].shape[1], dtype=torch.bool)
        for run in (seen[calls:2 * calls], seen[2 * calls:]):
            for before, after in zip(baseline, run):
                changed |= (before != after).any(dim=0).cpu()
        allowed = torch.zeros_like(changed)
        allowed[guessed] = True
        if not changed.any() or (changed & ~allowed).any():
            raise ValueError(f"{why}, and they are not a channel-major flatten of the pruned units (e.g. a permute "
                             f"before the flatten); pass a model torch.fx can trace, or prune it in a way "
                             f"that keeps the unit order")

    def _through_module(self, site: CallSite, flow: _Flow, source_name: str, listed: bool,
                        selections: Dict[int, Tuple[nn.Module, UnitSelection]]) -> Optional[_Flow]:
        module = site.module
        name = site.module_name
        rule = get_slicing_rule(module)
        if not listed:
            if rule is None:
                raise ValueError(f"the pruned units of '{source_name}' flow into '{name}' ({type(module).__name__}), "
                                 f"which has no slicing rule; register one with register_slicing_rule")
            if rule.passes_units_through and not rule.has_unit_state:
                if isinstance(module, nn.modules.dropout._DropoutNd):
                    logger.info("Dropout '%s' follows the pruned units of '%s' but is not in cascading_modules; "
                                "its p stays %s", name, source_name, module.p)
                return _follow_site(flow, site, source_name)
            raise ValueError(f"'{name}' ({type(module).__name__}) reads the pruned units of '{source_name}' "
                             f"but is not in cascading_modules")
        ndim = len(flow.shape)
        if rule.input_unit_axis is not None and rule.input_unit_axis % ndim != flow.axis:
            raise ValueError(f"'{name}' ({type(module).__name__}) reads its units on axis "
                             f"{rule.input_unit_axis % ndim} of its {ndim}-d input, but the pruned units of "
                             f"'{source_name}' are on axis {flow.axis}: its input does not depend on them unit by unit")
        in_units = rule.in_units(module)
        if in_units is not None and in_units != flow.num_units:
            raise ValueError(f"'{name}' ({type(module).__name__}) reads {in_units} units but {flow.num_units} "
                             f"arrive from '{source_name}' ({list(flow.shape)}, axis {flow.axis}): its input does not "
                             f"depend on the pruned units")
        selection = UnitSelection.from_remove(flow.remove, flow.num_units, axis=flow.axis, ndim=ndim,
                                              dropout_policy=self.dropout_policy)
        previous = selections.get(id(module))
        if previous is not None:
            if not torch.equal(previous[1].remove, selection.remove):
                raise ValueError(f"'{name}' is called more than once with different pruned units")
        else:
            selections[id(module)] = (module, selection)
        removed_out = self._removed_out(rule, module, name, selection)
        if removed_out is None or site.shape is None:
            return None
        out_count = rule.out_units(module)
        if torch.equal(removed_out, selection.remove) and out_count in (None, flow.num_units):
            return _follow_site(flow, site, source_name)  # same units out (BN, Dropout, Flatten, pooling...)
        out_shape = tuple(site.shape)
        if len(out_shape) != ndim:
            raise ValueError(f"'{name}' changes the rank of its input; cannot follow the pruned units through it")
        return _Flow(removed_out, out_count if out_count is not None else flow.num_units, flow.axis, out_shape)

    def _finish(self, description: str, edits: List[Edit]) -> Plan:
        """Name every edit, validate the plan against the model and the optimizer."""
        names = {id(m): n for n, m in reversed(list(self.model.named_modules(remove_duplicate=False)))}
        owners: Dict[int, set] = {}
        param_names: Dict[int, List[str]] = {}
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            for pname, param in module._parameters.items():
                if param is not None:
                    owners.setdefault(id(param), set()).add(id(module))
                    param_names.setdefault(id(param), []).append(f"{module_name}.{pname}" if module_name else pname)
        checked = set()
        for edit in edits:
            edit.module_name = names[id(edit.module)]
            if id(edit.module) not in checked:
                _check_not_parametrized(edit.module, edit.module_name)
                checked.add(id(edit.module))
            if isinstance(edit, TensorSlice) and edit.is_parameter:
                param = edit.module._parameters[edit.tensor_name]
                if len(owners.get(id(param), ())) > 1:
                    others = [n for n in param_names[id(param)] if n != edit.qualified_name]
                    raise ValueError(f"'{edit.qualified_name}' is tied to {others} (the same Parameter in several "
                                     f"modules); pruning tied weights is not supported")
        plan = Plan(description=description, edits=edits)
        parameter_slices = [(e, e.module._parameters[e.tensor_name]) for e in edits
                            if isinstance(e, TensorSlice) and e.is_parameter]
        plan.optimizer_slices = describe_optimizer_surgery(plan_optimizer_surgery(self.optimizer, parameter_slices))
        logger.debug("%s", plan)
        return plan


def _check_not_parametrized(module: nn.Module, name: str) -> None:
    """Refuse weights computed by parametrizations, weight_norm/spectral_norm or pruning masks."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.prune import BasePruningMethod

    if parametrize.is_parametrized(module):
        raise ValueError(f"'{name}' ({type(module).__name__}) has parametrized tensors "
                         f"({sorted(module.parametrizations.keys())}); remove the parametrizations first "
                         f"(torch.nn.utils.parametrize.remove_parametrizations)")
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, BasePruningMethod):
            raise ValueError(f"'{name}' ({type(module).__name__}) carries a torch.nn.utils.prune mask "
                             f"({hook._tensor_name}_orig / {hook._tensor_name}_mask); call "
                             f"torch.nn.utils.prune.remove(module, {hook._tensor_name!r}) first")
        if type(hook).__name__ in ("WeightNorm", "SpectralNorm"):
            raise ValueError(f"'{name}' ({type(module).__name__}) uses {type(hook).__name__} "
                             f"(weight computed from {getattr(hook, 'name', 'weight')}_*); remove it first")
    if any(p.endswith("_orig") for p in module._parameters):
        raise ValueError(f"'{name}' ({type(module).__name__}) has a masked parameter "
                         f"({[p for p in module._parameters if p.endswith('_orig')]}); remove the mask first")


def _short_repr(module: nn.Module) -> str:
    text = repr(module).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."
