"""Automatic dependency discovery: which tensors lose which units when a layer is pruned.

Pruning output channel ``c`` of a convolution removes more than one weight row: the BatchNorm
after it loses channel ``c``, the next convolution loses input column ``c``, and if the channel
feeds a residual addition, every other tensor added to it must lose the same channel, and so must
every consumer of the sum. This module finds all of that in the traced graph
(:class:`~torchpruner.graph.ModelGraph`, fx mode).

Model
-----
Every tensor in the forward pass that carries units gets *slots*, one per position along its unit
axis. Ops connect slots that must disappear together:

- element-wise ops, BatchNorm, activations, Dropout, pooling, mean/sum over other dims connect
  slot ``i`` of their input(s) with slot ``i`` of their output (broadcast operands of size 1 are
  free; a residual addition therefore connects both operands);
- concatenation along the unit axis shifts by the branch offset;
- reshapes, flattens, permutes, indexing and expands are *followed empirically*: the op is run on
  a tensor of slot ids, then again with two slots removed; if the second result is not the first
  one with those slots removed (a hard-coded ``x.view(-1, 16*5*5)``, a channel shuffle) the op is
  refused. ``flatten`` into a Linear thereby maps channel ``c`` to its ``H*W`` inputs;
- a piece of the unit axis (an item of ``split``/``chunk``, ``x[:, a:b]``) maps each of its units
  back to the source. Equal pieces (``chunk(n)``, sizes computed from the tensor) need the same
  number of units removed from every piece (a group whose units sit in some pieces only is
  refused); with positions written in the code (``split(16)``, ``x[:, :16]``) the units up to the
  piece's end are pinned (their groups refused) and the units after it stay free;
- a functional call standing for its layer (``F.linear``/``F.conv*``/``F.batch_norm``/
  ``F.layer_norm``/``F.group_norm`` on a module's own tensors inside its forward: a subclass fx
  traces into, such as timm's ``Linear`` or ``BatchNormAct2d``) is that layer's call, sliced once by
  its rule; the settings it reads (``groups``, ``num_groups``, ``normalized_shape``) must come from
  the layer's attributes;
- depthwise convolutions pass channels through; grouped convolutions force equal pruning in every
  group; GroupNorm whole groups; ``nn.MultiheadAttention`` equal pruning in every head;
- ``max``/``topk``/``sort``-like pairs are followed at their items (``[0]``/``.values``,
  ``[1]``/``.indices``) unless they run along the unit axis; tensor attributes that are views
  (``.mT``, ``.T``, ``.real``, ``.data``) like movement ops; any other attribute read that carries
  units is refused, never ignored;
- ``F.layer_norm`` over the units: the ``normalized_shape`` it reads is updated with the weights
  (the calling module's attribute, found by tracing it again with the attribute changed), or the
  op is refused when the shape is a literal in the code.

A module with weights called several times loses the same units at every call (its calls are
linked). A parameter-free module (a shared Dropout, ReLU, Identity) is one op per call site and
couples nothing; a shared Dropout's ``p`` changes only when every call site loses the same fraction.

A connected set of slots is one *unit*; units that share a tensor form a coupled *group*. Modules
own slots in three ways: ``out`` (Conv/Linear/Embedding output units: the group's *sources*),
``in`` (a consumer's weight columns, or a channel-wise layer such as BatchNorm) and bare
parameters read through ``get_attr`` (class tokens, position embeddings, layer scales).

A group is refused (with the op and the call site in the message) when one of its tensors is a
model input, flows into an op that cannot be followed, or is a model output (soft: allowed when
the caller asks to prune classifier outputs).
"""

from __future__ import annotations

import logging
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from torchpruner._ops import (DIM_WISE_FUNCTIONS, DIM_WISE_METHODS, DIM_WISE_MODULES, ELEMENTWISE_FUNCTIONS,
                              ELEMENTWISE_METHODS, FUNCTIONAL_LAYERS, MOVEMENT_FUNCTIONS, MOVEMENT_METHODS, MOVEMENT_MODULES,
                              PASS_THROUGH_MODULES, REDUCTION_FUNCTIONS, REDUCTION_METHODS, SHAPE_QUERY_ATTRIBUTES,
                              SHAPE_QUERY_FUNCTIONS, SHAPE_QUERY_METHODS, SPATIAL_FUNCTIONS, SPATIAL_MODULES,
                              TENSOR_VIEW_ATTRIBUTES, TUPLE_DIM_FUNCTIONS, TUPLE_DIM_OPS)
from torchpruner.rules import AttributeChange, get_slicing_rule

from .trace import CallSite, ModelGraph, _LeafTracer

logger = logging.getLogger(__name__)

__all__ = ["DependencyGraph", "Group", "Member", "DependencyError", "RefusedGroupsWarning", "get_dependency_graph",
           "zeroing_functions"]


class DependencyError(ValueError):
    """A prune that the traced graph cannot support (names the op and the call site)."""


def _is_torchvision(module: nn.Module, name: str) -> bool:
    return type(module).__module__.startswith("torchvision") and type(module).__name__ == name


class RefusedGroupsWarning(UserWarning):
    """Some groups of the model hold a layer's units but cannot be pruned (an op the analysis
    cannot follow): they are left out of ``groups()``; ``pruner.refused_groups()`` lists them."""


class _CannotFollow(Exception):
    """Raised inside the analysis when an op cannot be followed."""


# --------------------------------------------------------------------------------------------
# Slots
# --------------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Space:
    """The slots of one tensor: positions ``start .. start + size - 1`` along ``axis``."""

    node: fx.Node
    site: Optional[CallSite]
    start: int
    size: int
    axis: int
    shape: Tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def slots(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size)


@dataclass(eq=False)
class _Role:
    """A module (or a bare parameter) whose tensors are sliced when units of ``space`` go."""

    space: _Space
    direction: str                     # "out", "in" or "param"
    module: nn.Module
    module_name: str
    parameter: Optional[str] = None    # for "param": the tensor's attribute name on ``module``
    axis: Optional[int] = None         # for "param": the sliced axis
    per_call: bool = False             # a parameter-free module (Dropout): each call site is its own op


@dataclass(eq=False)
class _ShapeAttribute:
    """A module attribute holding the size of ``space``'s unit axis (the ``normalized_shape`` that a
    functional ``F.layer_norm`` reads): updated when units of ``space`` go."""

    space: _Space
    module: nn.Module
    module_name: str
    attribute: str
    index: int | None                  # position in the tuple; None for a plain int


@dataclass
class Member:
    """One module (or bare parameter) of a coupled group, as printed by ``str(group)``.

    Attributes:
        module_name: qualified name (for a bare parameter: its owner's name).
        module: the module.
        direction: ``"out"`` (its output units go: a source of the group), ``"in"`` (its input
            units / channel-wise parameters go) or ``"param"`` (a bare parameter is sliced).
        parameter: for ``"param"``: the parameter's attribute name.
        num_units: units on the sliced side before pruning.
        units_per_group_unit: how many of those a single group unit removes (``H*W`` after a
            flatten, ``groups`` for a grouped convolution's input...).
    """

    module_name: str
    module: nn.Module
    direction: str
    parameter: Optional[str]
    num_units: int
    units_per_group_unit: int

    def __str__(self) -> str:
        what = f"{self.module_name}.{self.parameter}" if self.parameter else self.module_name
        per = f", {self.units_per_group_unit} per unit" if self.units_per_group_unit != 1 else ""
        return f"{self.direction:<5} {what} ({type(self.module).__name__}, {self.num_units} units{per})"


class Group:
    """A coupled group: units that can only be removed together from all of its tensors.

    Attributes:
        index: position in :meth:`DependencyGraph.groups`.
        num_units: number of group units; unit ``u`` is ordered by the first source's channels.
        members: the modules and parameters that are sliced (see :class:`Member`).
        refusal: None when the group can be pruned, else the reason (names the op and call site).
        refusal_site: the call site of the op that refused the group (None when unknown).
        output_reason: set when the group reaches a model output (classifier outputs): prunable
            only when asked (``include_outputs=True``).
    """

    def __init__(self, dep: "DependencyGraph", index: int, unit_labels: np.ndarray) -> None:
        self._dep = dep
        self.index = index
        self._unit_labels = unit_labels      # global unit label of group unit u
        self._spaces: List[_Space] = []
        self._roles: List[_Role] = []
        self.refusal: Optional[str] = None
        self.refusal_site: Optional[CallSite] = None
        self.output_reason: Optional[str] = None
        self.members: List[Member] = []

    # -- description ---------------------------------------------------------------------

    @property
    def num_units(self) -> int:
        return len(self._unit_labels)

    @property
    def source_roles(self) -> List[_Role]:
        return [r for r in self._roles if r.direction in ("out", "param")]

    @property
    def sources(self) -> List[CallSite]:
        """Call sites whose output units are owned by a pruned layer (Conv/Linear/Embedding
        outputs, bare parameters): zeroing their channels there removes the group's units."""
        return [r.space.site for r in self._roles if r.direction in ("out", "param") and r.space.site is not None]

    @property
    def modules(self) -> List[nn.Module]:
        seen: List[nn.Module] = []
        for member in self.members:
            if all(member.module is not m for m in seen):
                seen.append(member.module)
        return seen

    @property
    def source_modules(self) -> List[nn.Module]:
        return [r.module for r in self._roles if r.direction == "out"]

    def prunable(self, include_outputs: bool = False) -> bool:
        return (self.refusal is None and (include_outputs or self.output_reason is None)
                and bool(self.source_roles) and self.num_units > 1)

    def why_not_prunable(self, include_outputs: bool = False) -> Optional[str]:
        if self.refusal is not None:
            return self.refusal
        if self.output_reason is not None and not include_outputs:
            return self.output_reason + " (pass include_outputs=True to prune it)"
        if not self.source_roles:
            return "no layer owns these units (they come from a model input or a fixed tensor)"
        if self.num_units <= 1:
            return "a single unit cannot be pruned"
        return None

    def __contains__(self, module: nn.Module) -> bool:
        return any(m.module is module for m in self.members)

    def __repr__(self) -> str:
        first = self.members[0].module_name if self.members else "?"
        return f"Group({self.index}, {self.num_units} units, {len(self.members)} members, first={first!r})"

    def __str__(self) -> str:
        state = "prunable" if self.prunable() else f"not prunable: {self.why_not_prunable()}"
        lines = [f"Group {self.index}: {self.num_units} units, {len(self.members)} members ({state})"]
        lines += [f"  {member}" for member in self.members]
        return "\n".join(lines)

    # -- unit bookkeeping -----------------------------------------------------------------

    def _unit_of(self, space: _Space) -> np.ndarray:
        """Group-unit index of every slot of ``space`` (-1 for slots of other groups)."""
        labels = self._dep._labels[space.start:space.start + space.size]
        return np.where(self._dep._group_of_label[labels] == self.index, self._dep._unit_index[labels], -1)

    def positions(self, space: _Space, units: Iterable[int]) -> np.ndarray:
        """Positions along ``space``'s unit axis removed with the given group units."""
        units = np.asarray(sorted(set(int(u) for u in units)), dtype=np.int64)
        unit_of = self._unit_of(space)
        return np.nonzero(np.isin(unit_of, units))[0]

    def mask_points(self) -> List[Tuple[CallSite, Callable[[Sequence[int]], Tuple[int, np.ndarray]]]]:
        """Where zeroing is *exactly* pruning: the tensors that the group's consumers read.

        Returns ``[(call_site, positions_fn)]``; ``positions_fn(units) -> (axis, positions)``.
        Zeroing those positions at those call sites (eval mode) gives the pruned model's output
        unless the group contains LayerNorm/GroupNorm over the pruned axis (their statistics change).
        """
        points = []
        seen: Set[int] = set()
        for role in self._roles:
            if role.direction != "in" or role.space.site is None or id(role.space) in seen:
                continue
            if self._dep._passes_through(role):
                continue
            seen.add(id(role.space))
            space = role.space
            points.append((space.site, (lambda units, space=space: (space.axis, self.positions(space, units)))))
        return points

    def source_points(self) -> List[Tuple[CallSite, Callable[[Sequence[int]], Tuple[int, np.ndarray]]]]:
        """The group's sources (layer outputs feeding the shared units), as
        ``[(call_site, positions_fn)]``; for attribution metrics that score a group unit by
        zeroing it at every source."""
        points = []
        for role in self._roles:
            if role.direction in ("out", "param") and role.space.site is not None:
                space = role.space
                points.append((space.site, (lambda units, space=space: (space.axis, self.positions(space, units)))))
        return points

    def count_cells(self) -> Optional[np.ndarray]:
        """Cell of every group unit under the grouped-convolution count constraints, or None.

        A grouped convolution (``1 < groups < in_channels``) that reads or writes the group's units
        needs the same number of them removed from each of its conv groups. Units in one cell share
        their conv group in every such convolution: removing the same number from every cell
        satisfies all of them (see :func:`torchpruner.schedule.select_units`).
        """
        keys = np.zeros(self.num_units, dtype=np.int64)
        constrained = False
        for space, groups in self._dep._count_constraints:
            unit_of = self._unit_of(space)
            inside = unit_of >= 0
            if not inside.any():
                continue
            constrained = True
            block = np.arange(space.size) // (space.size // groups)
            keys[unit_of[inside]] = keys[unit_of[inside]] * groups + block[inside]
        if not constrained:
            return None
        return np.unique(keys, return_inverse=True)[1].reshape(-1)

    def reads(self, module: nn.Module) -> bool:
        """True when some call of ``module`` reads a tensor that holds units of this group (also for
        modules with nothing to slice: activations, pooling)."""
        graph = self._dep.graph
        if not graph.has_sites(module):
            return False
        for site in graph.sites_of(module):
            for node in _flatten_nodes((site.node.args, site.node.kwargs)):
                space = self._dep._spaces.get(node)
                if space is not None and (self._unit_of(space) >= 0).any():
                    return True
        return False

    def entry_points(self) -> List[Tuple[CallSite, Callable[[Sequence[int]], Tuple[int, np.ndarray]]]]:
        """Where the group's units enter the shared stream, in the format of :meth:`mask_points`.

        For every source (a layer output, a bare ``[1, ...]`` parameter such as a position
        embedding), the tensor reached by following it through per-unit ops (BatchNorm,
        activations, Dropout, pooling, reshapes, depthwise convolutions, element-wise ops with one
        operand carrying these units) up to, not including, the first merge (an addition of two
        tensors with these units, a concatenation), consumer or fan-out; and every other operand
        of a merge that comes from outside the stream (an attention output). Zeroing there is
        pruning, and the points are not chained: a residual stream's block outputs are not entry
        points, so scaling a unit at every entry point counts it once per source.
        """
        dep = self._dep
        additive = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
        additive_methods = {"add", "add_", "sub", "sub_"}

        def carries(node: Any) -> bool:
            space = dep._spaces.get(node) if isinstance(node, fx.Node) else None
            return space is not None and bool((self._unit_of(space) >= 0).any())

        def token_like(node: fx.Node) -> bool:  # a bare parameter that broadcasts over the batch
            shape = dep._shape(node)
            return node.op == "get_attr" and shape is not None and len(shape) >= 2 and shape[0] == 1

        def carrying_inputs(node: fx.Node) -> List[fx.Node]:
            return [n for n in node.all_input_nodes if carries(n)]

        def is_merge(node: fx.Node) -> bool:
            inputs = carrying_inputs(node)
            if (node.op == "call_function" and node.target in (torch.cat, torch.concat)) or \
                    (node.op == "call_method" and node.target == "cat"):
                return bool(inputs)
            if (node.op == "call_function" and node.target in additive) or \
                    (node.op == "call_method" and node.target in additive_methods):
                # a position embedding added to the stream enters it; a per-channel shift does not
                return len([n for n in inputs if n.op != "get_attr" or token_like(n)]) >= 2
            return len([n for n in inputs if n.op != "get_attr"]) >= 2

        def per_unit(node: fx.Node) -> bool:
            """``node`` reads these units from one tensor and keeps them unit by unit."""
            if not carries(node) or is_merge(node) or len([n for n in carrying_inputs(node) if n.op != "get_attr"]) != 1:
                return False
            if node.op == "call_module":
                module = dep._traced_modules[node.target]
                if isinstance(module, nn.modules.conv._ConvNd):
                    return module.groups == module.in_channels and module.groups > 1
                return isinstance(module, (nn.modules.batchnorm._NormBase, nn.PReLU, nn.modules.dropout._DropoutNd)
                                  + PASS_THROUGH_MODULES + SPATIAL_MODULES + MOVEMENT_MODULES)
            functions = ELEMENTWISE_FUNCTIONS | SPATIAL_FUNCTIONS | MOVEMENT_FUNCTIONS | REDUCTION_FUNCTIONS | {F.batch_norm}
            if node.op == "call_function":
                return node.target in functions
            return node.op == "call_method" and node.target in ELEMENTWISE_METHODS | MOVEMENT_METHODS | REDUCTION_METHODS

        def real_users(node: fx.Node) -> List[fx.Node]:
            return [u for u in node.users if not dep._is_shape_query(u)]

        entries: Dict[fx.Node, None] = {}
        on_chains: Set[fx.Node] = set()
        for role in self.source_roles:
            node = role.space.node
            if role.direction == "param" and not token_like(node):
                continue  # a per-channel scale or shift: part of the chain of the tensor it acts on
            on_chains.add(node)
            while True:
                users = real_users(node)
                if len(users) != 1 or not per_unit(users[0]):
                    break
                node = users[0]
                on_chains.add(node)
            entries[node] = None
        for space in self._spaces:
            merge = space.node
            if merge.op not in ("call_function", "call_method") or not is_merge(merge):
                continue
            for operand in carrying_inputs(merge):
                if operand.op == "get_attr" and not token_like(operand):
                    continue
                node = operand
                while node not in on_chains and not is_merge(node) and per_unit(node):
                    (node,) = [n for n in carrying_inputs(node) if n.op != "get_attr"]
                if node not in on_chains and not is_merge(node):
                    entries[operand] = None  # enters from outside the stream (an attention output)
        points = []
        for node in entries:
            site, space = dep._site_by_node.get(node), dep._spaces[node]
            if site is not None:
                points.append((site, (lambda units, space=space: (space.axis, self.positions(space, units)))))
        return points

    def units_for(self, module: nn.Module, indices: Sequence[int], call_index: int = 0) -> List[int]:
        """Group units removed when ``indices`` of ``module``'s output units go.

        Raises:
            DependencyError: when ``indices`` are not a whole number of group units (a grouped
                convolution needs equal pruning in every group, GroupNorm whole groups...).
        """
        space = self._dep._output_space(module, call_index)
        unit_of = self._unit_of(space)
        indices = np.asarray(sorted(set(int(i) for i in indices)), dtype=np.int64)
        units = sorted(set(int(u) for u in unit_of[indices]))
        needed = self.positions(space, units)
        if len(needed) != len(indices) or not np.array_equal(needed, indices):
            extra = sorted(set(needed.tolist()) - set(indices.tolist()))
            name = self._dep.graph.module_name(module)
            raise DependencyError(
                f"cannot prune units {indices.tolist()[:20]} of '{name}' alone: they are coupled with its units "
                f"{extra[:20]}{'...' if len(extra) > 20 else ''} (grouped convolution / GroupNorm / attention heads / "
                f"pieces of a split or chunk that meet again require equal pruning in every group); add them to the "
                f"indices")
        return units

    def unit_channels(self, module: nn.Module, call_index: int = 0) -> List[np.ndarray]:
        """For each group unit, the output positions of ``module`` it covers."""
        space = self._dep._output_space(module, call_index)
        unit_of = self._unit_of(space)
        return [np.nonzero(unit_of == u)[0] for u in range(self.num_units)]

    def removals(self, units: Sequence[int]) -> List[Tuple[_Role, np.ndarray]]:
        """``[(role, removed positions)]`` for every member, deduplicated per module and side."""
        return self._dep.removals({self: units})

    def member_units(self) -> List[Tuple[_Role, np.ndarray]]:
        """``[(role, unit_of)]`` for every member, deduplicated per module, side and parameter as in
        :meth:`removals`: ``unit_of[p]`` is the group unit removed with position ``p`` of the
        member's sliced axis, -1 where the position belongs to another group."""
        merged: Dict[Tuple[int, str, Optional[str]], Tuple[_Role, np.ndarray]] = {}
        for role in self._roles:
            key = (id(role.module), role.direction, role.parameter)
            unit_of = self._unit_of(role.space)
            if key in merged:  # several calls of one module are linked: same positions
                first = merged[key][1]
                if first.shape == unit_of.shape:
                    merged[key] = (merged[key][0], np.where(first >= 0, first, unit_of))
                continue
            merged[key] = (role, unit_of)
        return [entry for entry in merged.values() if (entry[1] >= 0).any()]


# --------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------

def zeroing_functions(selection: Mapping["Group", Sequence[int]]) -> Dict[CallSite, Callable[[torch.Tensor], torch.Tensor]]:
    """``{call_site: fn}`` that zeroes the selected units of each group at its mask points.

    For ``graph.intercept(...)`` on the graph the groups were computed on: the forward it yields
    is the model with those units masked where their consumers read them, which in eval mode equals
    the pruned model (except with a LayerNorm/GroupNorm over the pruned axis). ``fn`` returns a new
    tensor, so in-place ops downstream and autograd are safe.
    """
    entries: Dict[CallSite, List[Tuple[int, torch.Tensor]]] = {}
    for group, units in selection.items():
        for site, positions_fn in group.mask_points():
            axis, positions = positions_fn(units)
            if len(positions):
                entries.setdefault(site, []).append((axis, torch.as_tensor(positions, dtype=torch.long)))

    def zero(cuts: List[Tuple[int, torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(z: torch.Tensor) -> torch.Tensor:
            z = z.clone()
            for axis, positions in cuts:
                index: List[Any] = [slice(None)] * z.dim()
                index[axis] = positions.to(z.device)
                z[tuple(index)] = 0
            return z
        return fn

    return {site: zero(cuts) for site, cuts in entries.items()}


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label the connected components of an undirected graph on ``n`` nodes with edges ``a[i]-b[i]``.

    Vectorised union: every edge hooks the larger representative onto the smaller, then pointer
    jumping flattens the trees; repeated until no edge joins two representatives. Labels are
    0..k-1, numbered by each component's smallest node.
    """
    labels = np.arange(n, dtype=np.int64)
    if len(a) == 0:
        return labels
    while True:
        low = np.minimum(labels[a], labels[b])
        hooked = labels.copy()
        np.minimum.at(hooked, labels[a], low)
        np.minimum.at(hooked, labels[b], low)
        while True:  # pointer jumping: every node points at its representative
            jumped = hooked[hooked]
            if np.array_equal(jumped, hooked):
                break
            hooked = jumped
        if np.array_equal(hooked, labels):
            break
        labels = hooked
    return np.unique(labels, return_inverse=True)[1].reshape(-1)


class DependencyGraph:
    """Coupled groups of a traced model. Built once per :class:`ModelGraph` (see
    :func:`get_dependency_graph`).

    Args:
        graph: the traced model (must be in fx mode: the hooks fallback cannot see merges).
    """

    def __init__(self, graph: ModelGraph) -> None:
        if graph.method != "fx" or graph.traced is None:
            raise DependencyError(
                f"automatic dependency discovery needs torch.fx tracing, which failed on {graph.fx_failure}; "
                f"pass cascading_modules explicitly")
        self.graph = graph
        self.model = graph.model
        self.tensor_shapes = tensor_shapes(self.model)   # a prune makes these groups stale
        self._site_by_node: Dict[fx.Node, CallSite] = graph._site_by_node
        self._spaces: Dict[fx.Node, _Space] = {}
        self._space_list: List[_Space] = []
        self._num_slots = 0
        self._edges: List[Tuple[np.ndarray, np.ndarray]] = []
        self._blocked: Dict[int, Tuple[str, bool, Optional[fx.Node]]] = {}   # id(space) -> (reason, hard, op)
        self._visiting: Optional[fx.Node] = None
        self._warned = False
        self._guessed: set[int] = set()   # spaces whose unit axis is a guess (after an op that could not be followed)
        self._roles: List[_Role] = []
        self._pending_attr_blocks: Dict[fx.Node, str] = {}
        self._first_role_space: Dict[Tuple[int, str], _Space] = {}
        self._shape_attributes: list[_ShapeAttribute] = []
        self._count_constraints: List[Tuple[_Space, int]] = []   # (space, conv groups): equal counts per block
        self._equal_pieces: list[_Space] = []   # tensors split into equal pieces (positions linked across pieces)
        self._modules = dict(self.model.named_modules(remove_duplicate=False))
        self._traced_modules = dict(graph.traced.named_modules())
        for node in graph.traced.graph.nodes:
            self._visiting = node   # the op a refusal is recorded at
            try:
                self._visit(node)
            except _CannotFollow as exc:
                self._block_node(node, str(exc))
            except Exception as exc:  # arguments the analysis cannot read (a traced shape as an argument...)
                self._block_node(node, f"cannot follow the units through {self._label(node)} "
                                       f"({type(exc).__name__}: {str(exc)[:120]})")
        self._visiting = None
        self._build_groups()

    # -- slots ------------------------------------------------------------------------------

    def _shape(self, node: Any) -> Optional[Tuple[int, ...]]:
        site = self._site_by_node.get(node) if isinstance(node, fx.Node) else None
        return tuple(site.shape) if site is not None and site.shape is not None else None

    def _dtype(self, node: fx.Node) -> Optional[torch.dtype]:
        site = self._site_by_node.get(node)
        return site.dtype if site is not None else None

    def _alloc(self, node: fx.Node, axis: int, shape: Optional[Tuple[int, ...]] = None) -> _Space:
        shape = shape if shape is not None else self._shape(node)
        assert shape is not None
        axis = axis % len(shape)
        space = _Space(node=node, site=self._site_by_node.get(node), start=self._num_slots,
                       size=int(shape[axis]), axis=axis, shape=tuple(shape))
        self._num_slots += space.size
        self._spaces[node] = space
        self._space_list.append(space)
        if node in self._pending_attr_blocks:
            self._block(space, self._pending_attr_blocks.pop(node))
        return space

    def _link(self, a: _Space, a_pos: np.ndarray, b: _Space, b_pos: np.ndarray) -> None:
        if id(a) in self._guessed:
            self._guessed.add(id(b))   # its unit axis follows a guess
        self._edges.append((a.start + np.asarray(a_pos, dtype=np.int64), b.start + np.asarray(b_pos, dtype=np.int64)))

    def _link_same(self, a: _Space, b: _Space) -> None:
        if a.size != b.size:
            raise _CannotFollow(f"internal: linking {a.size} with {b.size} units")
        self._link(a, np.arange(a.size), b, np.arange(b.size))

    def _block(self, space: _Space, reason: str, hard: bool = True) -> None:
        old = self._blocked.get(id(space))
        if old is None or (hard and not old[1]):
            self._blocked[id(space)] = (reason, hard, self._visiting or space.node)

    def _label(self, node: fx.Node) -> str:
        site = self._site_by_node.get(node)
        if site is not None and site.kind == "module":
            return f"'{site.label}' ({type(site.module).__name__})"
        if site is not None and site.module is not None:   # a functional call standing for its layer
            call = f", call {site.call_index}" if site.call_index else ""
            return f"'{site.module_name}' ({type(site.module).__name__}, {node.target.__name__}{call})"
        target = node.target
        op = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
        return f"{op} at call site '{node.name}'"

    def _block_node(self, node: fx.Node, reason: str) -> None:
        """Block every slotted input of ``node`` (and its output): the op cannot be followed."""
        for arg in self._slotted_inputs(node, attrs=True):
            if arg in self._spaces:
                self._block(self._spaces[arg], reason)
            elif arg.op == "get_attr":
                self._pending_attr_blocks.setdefault(arg, reason)
        shape = self._shape(node)
        if shape is not None and len(shape) >= 1 and node not in self._spaces:
            # the blocked output still needs a sensible unit axis, so it does not poison its users
            site = self._site_by_node.get(node)
            axis = site.unit_axis if site is not None and site.unit_axis is not None else len(shape) - 1
            if node.op == "call_function" and node.target is operator.getitem \
                    and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_module":
                source = self._slotted_inputs(node)
                module = self._traced_modules.get(node.args[0].target)
                if isinstance(module, nn.MultiheadAttention) or not source:
                    axis = len(shape) - 1
            for arg in self._slotted_inputs(node):
                space = self._spaces.get(arg)
                if space is not None and space.ndim == len(shape) and space.node.op != "placeholder":
                    axis = space.axis
                    break
            blocked = self._alloc(node, axis)
            self._guessed.add(id(blocked))
            self._block(blocked, reason)
        elif node in self._spaces:
            self._block(self._spaces[node], reason)

    def _slotted_inputs(self, node: fx.Node, attrs: bool = False) -> List[fx.Node]:
        """Input nodes with slots (through tuple producers such as split); attrs: bare params too."""
        found: List[fx.Node] = []
        for arg in node.all_input_nodes:
            if arg in self._spaces or (attrs and arg.op == "get_attr"):
                found.append(arg)
            elif self._shape(arg) is None and arg.op in ("call_function", "call_method", "call_module") \
                    and not self._is_shape_query(arg):   # x.size(0), x.ndim: no units
                for inner in arg.all_input_nodes:
                    if inner in self._spaces or (attrs and inner.op == "get_attr"):
                        found.append(inner)
        return list(dict.fromkeys(found))

    def _space_of(self, node: Any, axis: Optional[int] = None) -> Optional[_Space]:
        """The slots of ``node``; bare parameters get slots on first use (along ``axis``)."""
        if not isinstance(node, fx.Node):
            return None
        space = self._spaces.get(node)
        if space is not None:
            return space
        if node.op == "get_attr":
            shape = self._shape(node)
            if shape is None or len(shape) == 0:
                return None
            return self._alloc(node, len(shape) - 1 if axis is None else axis)
        return None

    # -- visiting nodes -----------------------------------------------------------------------

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            shape, dtype = self._shape(node), self._dtype(node)
            if shape is not None and len(shape) >= 2 and dtype is not None and dtype.is_floating_point:
                site = self._site_by_node.get(node)
                self._block(self._alloc(node, site.unit_axis if site.unit_axis is not None else 1),
                            f"the units come from the model input '{node.target}'")
            return
        if node.op == "get_attr":
            return  # slots on first use
        if node.op == "output":
            for arg in _flatten_nodes(node.args):
                space = self._space_of(arg)
                if space is not None:
                    self._block(space, f"the units reach the model output ({self._label(arg)})", hard=False)
            return
        slotted = self._slotted_inputs(node, attrs=True)
        shape = self._shape(node)
        if node.op in ("call_function", "call_method") and shape is not None:
            self._check_shape_sources(node)
        if node.op == "call_module":
            module = self._traced_modules[node.target]
            self._visit_module(node, module, slotted)
            return
        site = self._site_by_node.get(node)
        if node.op == "call_function" and site is not None and site.module is not None:
            self._visit_layer_call(node, site)
            return
        target = node.target
        is_fn, is_method = node.op == "call_function", node.op == "call_method"
        if is_fn and target is getattr:
            self._visit_getattr(node, slotted)
            return
        if (is_fn and target in SHAPE_QUERY_FUNCTIONS) or (is_method and target in SHAPE_QUERY_METHODS):
            return
        if shape is None and self._tuple_op(node) is not None:
            self._check_pair_users(node)   # followed at the items that are read
            return
        if shape is None:
            # tuples of split/chunk are followed at their getitem; any other op that takes the units
            # and returns no tensor (torch.sort's (values, indices)...) cannot be followed
            movement = (is_fn and target in MOVEMENT_FUNCTIONS) or (is_method and target in MOVEMENT_METHODS)
            if not movement and [n for n in slotted if n.op != "get_attr"]:
                raise _CannotFollow(f"cannot follow the units through {self._label(node)}: it does not return "
                                    f"one tensor")
            return
        if is_fn and target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and node.args[0].op == "call_module" and self._shape(node.args[0]) is None:
            self._visit_module_item(node)
            return
        if is_fn and target is operator.getitem and self._tuple_op(node.args[0]) is not None:
            self._pair_item(node, node.args[1])
            return
        if not [n for n in slotted if n.op != "get_attr"]:
            if not slotted:
                # a tensor created without any tensor input (torch.zeros(...)): fixed size
                site = self._site_by_node.get(node)
                if site is not None and site.unit_axis is not None:
                    self._block(self._alloc(node, site.unit_axis),
                                f"tensor of fixed size created by {self._label(node)}")
                return
        if (is_fn and target in ELEMENTWISE_FUNCTIONS) or (is_method and target in ELEMENTWISE_METHODS):
            self._elementwise(node)
        elif (is_fn and target in (torch.cat, torch.concat)) or (is_method and target == "cat"):
            self._concat(node)
        elif is_fn and target is torch.stack:
            self._stack(node)
        elif (is_fn and target in REDUCTION_FUNCTIONS) or (is_method and target in REDUCTION_METHODS):
            self._reduction(node)
        elif (is_fn and target in DIM_WISE_FUNCTIONS) or (is_method and target in DIM_WISE_METHODS):
            self._dim_wise(node, node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None))
        elif is_fn and target in SPATIAL_FUNCTIONS:
            self._spatial(node)
        elif is_fn and target in (F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm):
            self._functional_norm(node)
        elif (is_fn and target in MOVEMENT_FUNCTIONS) or (is_method and target in MOVEMENT_METHODS):
            self._movement(node)
        else:
            raise _CannotFollow(f"cannot follow the units through {self._label(node)}: "
                                f"unsupported op")

    def _check_shape_sources(self, node: fx.Node) -> None:
        """``node`` computes an argument from the size of another tensor (``B, N, C = x.shape`` then
        ``attn_out.reshape(B, N, C)``): when that size is the unit count of a tensor with units, a
        prune changes the argument (checked by computing it with two units of that tensor removed),
        so that tensor's units are refused here, naming the op."""
        sources: list[fx.Node] = []
        stack = list(node.all_input_nodes)
        seen: set[fx.Node] = set()
        while stack:
            arg = stack.pop()
            if arg in seen:
                continue
            seen.add(arg)
            if self._shape(arg) is not None:
                continue   # a tensor operand, not shape arithmetic
            if self._is_shape_query(arg) or (arg.op == "call_function" and arg.target is getattr):
                tensor = arg.args[0]
                if isinstance(tensor, fx.Node) and self._shape(tensor) is not None:
                    sources.append(tensor)
                continue
            stack.extend(arg.all_input_nodes)
        args = (node.args, dict(node.kwargs))
        operands = {n for n in node.all_input_nodes if self._shape(n) is not None}
        for tensor in dict.fromkeys(sources):
            if tensor in operands:
                continue   # the op's own input: followed (and checked) with the op itself
            space = self._spaces.get(tensor)
            if space is None or space.size < 3:
                continue
            try:
                before = self._evaluate_value(args, {tensor: _slot_ids(space.shape, space.axis, np.arange(space.size))})
                removed = np.setdiff1d(np.arange(space.size), [0, space.size // 2])
                after = self._evaluate_value(args, {tensor: _slot_ids(space.shape, space.axis, removed)})
            except Exception:  # noqa: BLE001 - the shape code fails on fewer units: it depends on them
                before, after = None, ()
            if _shape_values(before) != _shape_values(after):
                self._block(space, f"{self._label(node)} computes an argument from the number of units of "
                                   f"{self._label(tensor)} (e.g. B, N, C = x.shape reused for another tensor); a prune "
                                   f"would change it")

    def _is_shape_query(self, node: fx.Node) -> bool:
        """``node`` reads a size or a property of a tensor, not its values (``x.size(0)``, ``x.shape``)."""
        if node.op == "call_function" and node.target is getattr:
            return self._shape(node) is None and node.args[1] in SHAPE_QUERY_ATTRIBUTES
        return (node.op == "call_function" and node.target in SHAPE_QUERY_FUNCTIONS) or \
            (node.op == "call_method" and node.target in SHAPE_QUERY_METHODS)

    # -- attribute reads and (values, indices) pairs ----------------------------------------

    def _tuple_op(self, node: Any) -> str | None:
        """The name of ``node``'s op when it returns a (values, indices)-like pair, else None."""
        if not isinstance(node, fx.Node) or self._shape(node) is not None:
            return None
        if node.op == "call_function":
            return TUPLE_DIM_FUNCTIONS.get(node.target) if callable(node.target) else None
        if node.op == "call_method" and node.target in TUPLE_DIM_OPS:
            return node.target
        return None

    def _check_pair_users(self, node: fx.Node) -> None:
        """A pair is followed at its items; refuse it when it is read any other way."""
        fields = TUPLE_DIM_OPS[self._tuple_op(node)][2]
        for user in node.users:
            if user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1, -1, -2):
                continue
            if user.op == "call_function" and user.target is getattr and user.args[1] in fields:
                continue
            if [n for n in self._slotted_inputs(node) if n.op != "get_attr"]:
                raise _CannotFollow(f"cannot follow the units through {self._label(node)}: its result is read "
                                    f"as a whole by {self._label(user)}")

    def _pair_item(self, node: fx.Node, index: Any) -> None:
        """Item ``index`` (``[0]``/``.values``, ``[1]``/``.indices``) of a pair-returning op along one
        dim: the units pass unless the op runs along the unit axis."""
        source = node.args[0]
        name = self._tuple_op(source)
        position, default, fields = TUPLE_DIM_OPS[name]
        if index not in (0, 1, -1, -2):
            raise _CannotFollow(f"cannot follow the units through item {index!r} of {self._label(source)}")
        _, space = self._input_space(source)
        dim = self._dim_arg(source, position, "dim", default)
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise _CannotFollow(f"cannot read the dim of {self._label(source)}")
        dim %= space.ndim
        if dim == space.axis:
            raise _CannotFollow(f"{self._label(source)} runs along the unit axis {space.axis} (dim={dim}): "
                                f"its {fields[index % 2]} mix the units")
        out_shape = self._shape(node)
        if len(out_shape) == space.ndim:
            axis = space.axis
        elif len(out_shape) == space.ndim - 1:
            axis = space.axis - (1 if dim < space.axis else 0)
        else:
            raise _CannotFollow(f"cannot follow the units through {self._label(source)}")
        if out_shape[axis] != space.size:
            raise _CannotFollow(f"cannot follow the units through {self._label(source)}")
        self._link_same(space, self._alloc(node, axis))

    def _visit_getattr(self, node: fx.Node, slotted: list[fx.Node]) -> None:
        """``x.<name>``: a pair's item, a view of the tensor (``.mT``, ``.data``), a shape query
        (``.shape``), or refused: an attribute read is never ignored while it carries units."""
        source, name = node.args[0], node.args[1]
        label = f"the attribute '.{name}' at call site '{node.name}'"
        pair = self._tuple_op(source)
        if pair is not None:
            fields = TUPLE_DIM_OPS[pair][2]
            if name not in fields:
                raise _CannotFollow(f"cannot follow the units through {label} of {self._label(source)}")
            self._pair_item(node, fields.index(name))
            return
        if name in SHAPE_QUERY_ATTRIBUTES:
            return
        carries_units = bool([n for n in slotted if n.op != "get_attr"])
        if self._shape(node) is None:
            if carries_units:
                raise _CannotFollow(f"cannot follow the units through {label}: it is not a tensor")
            return
        if not slotted:
            return
        if name in TENSOR_VIEW_ATTRIBUTES:
            self._movement(node)
            return
        raise _CannotFollow(f"cannot follow the units through {label}: unknown tensor attribute")

    def _input_space(self, node: fx.Node) -> Tuple[fx.Node, _Space]:
        data = [n for n in self._slotted_inputs(node) if n.op != "get_attr"]
        if len(data) != 1:
            raise _CannotFollow(f"{self._label(node)} reads {len(data)} tensors with units; expected one")
        return data[0], self._spaces[data[0]]

    # -- element-wise, concat, reductions ----------------------------------------------------

    def _elementwise(self, node: fx.Node) -> None:
        shape = self._shape(node)
        nd = len(shape)
        operands = [n for n in _flatten_nodes((node.args, node.kwargs)) if self._shape(n) is not None]
        # the output's unit axis: from the first operand with real (non-attr) slots
        out_axis = None
        for n in operands:
            if n in self._spaces and n.op != "get_attr":
                space = self._spaces[n]
                out_axis = space.axis + (nd - space.ndim)
                if space.shape[space.axis] == shape[out_axis]:
                    break
        if out_axis is None:
            for n in operands:
                if n.op == "get_attr":
                    space = self._space_of(n)
                    if space is not None:
                        out_axis = space.axis + (nd - space.ndim)
                        break
        if out_axis is None or out_axis < 0:
            raise _CannotFollow(f"cannot align the units of the operands of {self._label(node)}")
        out = self._alloc(node, out_axis)
        for n in operands:
            op_shape = self._shape(n)
            b = out_axis - (nd - len(op_shape))
            existing = self._spaces.get(n)
            if b < 0 or op_shape[b] == 1:
                # broadcast along the unit axis: the operand has no units here
                if existing is not None and existing.shape[existing.axis] > 1:
                    self._block(existing, f"its units are broadcast against another axis in {self._label(node)}")
                continue
            if existing is None and n.op != "get_attr":
                self._block(out, f"{self._label(node)} combines the units with a tensor of fixed size "
                                 f"({self._label(n)})")
                continue
            space = self._space_of(n, axis=b)
            if space is None or space.axis != b or space.size != out.size:
                self._block(out, f"the operands of {self._label(node)} carry units on different axes")
                if space is not None:
                    self._block(space, f"the operands of {self._label(node)} carry units on different axes")
                continue
            self._link_same(space, out)

    def _dim_arg(self, node: fx.Node, position: int, name: str = "dim", default: Any = None) -> Any:
        if name in node.kwargs:
            return node.kwargs[name]
        if len(node.args) > position:
            return node.args[position]
        return default

    def _concat(self, node: fx.Node) -> None:
        tensors = self._dim_arg(node, 0, "tensors")
        dim = self._dim_arg(node, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            raise _CannotFollow(f"cannot read the arguments of {self._label(node)}")
        shape = self._shape(node)
        dim = dim % len(shape)
        spaces = [self._spaces.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        axes = {s.axis for s in spaces if s is not None and s.node.op != "get_attr"}
        if len(axes) != 1:
            raise _CannotFollow(f"the inputs of {self._label(node)} carry units on different axes")
        axis = axes.pop()
        out = self._alloc(node, axis)
        if dim == axis:
            offset = 0
            for t, space in zip(tensors, spaces):
                size = self._shape(t)[dim]
                if space is None:
                    space = self._space_of(t, axis=dim)
                if space is None or space.axis != dim:
                    self._block(out, f"{self._label(node)} concatenates a tensor without units ({self._label(t)})")
                else:
                    self._link(space, np.arange(size), out, offset + np.arange(size))
                offset += size
        else:
            for t, space in zip(tensors, spaces):
                if space is None:
                    space = self._space_of(t, axis=axis)
                if space is None or space.axis != axis or space.size != out.size:
                    self._block(out, f"the inputs of {self._label(node)} carry units on different axes")
                    continue
                self._link_same(space, out)

    def _stack(self, node: fx.Node) -> None:
        tensors = self._dim_arg(node, 0, "tensors")
        dim = self._dim_arg(node, 1, "dim", 0)
        shape = self._shape(node)
        dim = dim % len(shape)
        spaces = [self._space_of(t) for t in tensors]
        axes = {s.axis for s in spaces if s is not None}
        if len(axes) != 1 or any(s is None for s in spaces):
            raise _CannotFollow(f"the inputs of {self._label(node)} carry units on different axes")
        axis = axes.pop()
        out = self._alloc(node, axis + 1 if dim <= axis else axis)
        for space in spaces:
            self._link_same(space, out)

    def _reduction(self, node: fx.Node) -> None:
        x, space = self._input_space(node)
        dims = self._dim_arg(node, 1, "dim", None)
        if dims is None or isinstance(dims, bool):  # x.std(False): the bool is `unbiased`, all dims go
            raise _CannotFollow(f"{self._label(node)} reduces over all dims, including the units")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d % space.ndim for d in dims]
        if space.axis in dims:
            raise _CannotFollow(f"{self._label(node)} reduces over the unit axis {space.axis}")
        # keepdim from the traced output rank, not from argument positions (std/var put `unbiased` 3rd)
        out_shape = self._shape(node)
        keepdim = out_shape is not None and len(out_shape) == space.ndim
        axis = space.axis if keepdim else space.axis - sum(1 for d in dims if d < space.axis)
        self._link_same(space, self._alloc(node, axis))

    def _dim_wise(self, node: fx.Node, dim: Any) -> None:
        x, space = self._input_space(node)
        if not isinstance(dim, int):
            raise _CannotFollow(f"cannot read the dim of {self._label(node)}")
        if dim % space.ndim == space.axis:
            raise _CannotFollow(f"{self._label(node)} mixes the units (dim={dim} is the unit axis)")
        self._link_same(space, self._alloc(node, space.axis))

    def _spatial(self, node: fx.Node, spatial_dims: Optional[int] = None) -> None:
        x, space = self._input_space(node)
        out_shape = self._shape(node)
        if spatial_dims is None and node.target is F.pad:
            pad = self._dim_arg(node, 1, "pad")
            if not isinstance(pad, (list, tuple)):
                raise _CannotFollow(f"cannot read the padding of {self._label(node)}")
            # pairs from the last dim backwards: the unit axis may be among them, padded by (0, 0)
            pair = 2 * (space.ndim - 1 - space.axis)
            if pair + 1 < len(pad):
                full = _slot_ids(space.shape, space.axis, np.arange(space.size))
                before, after = self._evaluate_value([pad[pair], pad[pair + 1]], {x: full})
                if before != 0 or after != 0:
                    raise _CannotFollow(f"{self._label(node)} pads the unit axis {space.axis}")
            spatial_dims = 0
        if spatial_dims is None:
            name = getattr(node.target, "__name__", "")
            spatial_dims = int(name[-2]) if name[-2:-1].isdigit() and name.endswith("d") else space.ndim - 2
        if space.axis >= space.ndim - spatial_dims or len(out_shape) != space.ndim \
                or out_shape[space.axis] != space.size:
            raise _CannotFollow(f"{self._label(node)} acts on the unit axis {space.axis}")
        self._link_same(space, self._alloc(node, space.axis))

    def _functional_norm(self, node: fx.Node) -> None:
        """F.layer_norm / group_norm / batch_norm / instance_norm with parameters read as attrs."""
        x, space = self._input_space(node)
        target = node.target
        shape_nodes: set[fx.Node] = set()
        if target is F.layer_norm:
            normalized = self._dim_arg(node, 1, "normalized_shape")
            shape_nodes = set(_flatten_nodes(normalized))
            full = _slot_ids(space.shape, space.axis, np.arange(space.size))
            value = self._evaluate_value(normalized, {x: full}) if shape_nodes else normalized
            dims = 1 if isinstance(value, int) else len(value)
            if space.axis < space.ndim - dims:
                self._link_same(space, self._alloc(node, space.axis))
                return
            if space.axis != space.ndim - 1:
                raise _CannotFollow(f"{self._label(node)} normalises units on a non-last axis")
        elif target is F.group_norm:
            raise _CannotFollow(f"functional group_norm at {self._label(node)} is not supported; use nn.GroupNorm")
        elif space.axis != 1:
            raise _CannotFollow(f"{self._label(node)} normalises channels on axis 1, the units are on {space.axis}")
        out = self._alloc(node, space.axis)
        self._link_same(space, out)
        if target is F.layer_norm:
            self._layer_norm_shape(node, x, space, normalized)
        for arg in node.all_input_nodes:
            if arg is x or arg in shape_nodes:
                continue
            if arg.op != "get_attr":
                raise _CannotFollow(f"{self._label(node)} reads a computed weight ({self._label(arg)})")
            param = self._space_of(arg, axis=0)
            if param is None or param.ndim != 1 or param.size != space.size:
                raise _CannotFollow(f"{self._label(node)} reads a parameter of unexpected shape")
            self._link_same(param, out)

    def _layer_norm_shape(self, node: fx.Node, x: fx.Node, space: _Space, normalized: Any) -> None:
        """``F.layer_norm`` normalises the units: the ``normalized_shape`` it reads must lose them too.

        Computed in the forward from the input (``x.shape[-1:]``): it follows by itself (checked).
        A constant: fx wrote the value of the module attribute into the graph, so the attribute of
        the calling module holding that value is updated by the prune (an ``nn.LayerNorm``
        subclass: by its rule); a literal in the code cannot be updated and is refused.
        """
        label = self._label(node)
        if _flatten_nodes(normalized):
            small = _slot_ids(space.shape, space.axis, np.arange(space.size - 1))
            try:
                after = self._evaluate_value(normalized, {x: small})
            except Exception as exc:  # noqa: BLE001 - any error of the model's own shape code
                raise _CannotFollow(f"{label}: its normalized_shape cannot be recomputed once units are removed "
                                    f"({type(exc).__name__}: {str(exc)[:120]})") from None
            after = [after] if isinstance(after, int) else list(after)
            if not after or after[-1] != space.size - 1:
                raise _CannotFollow(f"{label} computes a normalized_shape that does not follow its input "
                                    f"once units are removed")
            return
        owner_name = self._calling_module(node)
        owner = self._modules.get(owner_name) if owner_name is not None else None
        shown = normalized if isinstance(normalized, int) else tuple(normalized)
        if owner is None:
            raise _CannotFollow(f"{label} reads normalized_shape {shown} as a constant of no known module; "
                                f"use nn.LayerNorm or keep the shape in a module attribute")
        rule = get_slicing_rule(owner)
        if rule is not None and rule.passes_units_through and \
                _same_shape_value(getattr(owner, "normalized_shape", None), normalized):
            self._add_role(space, "in", owner, owner_name)   # an nn.LayerNorm subclass: its rule updates it
            return
        candidates = [attr for attr, value in vars(owner).items()
                      if not attr.startswith("_") and _same_shape_value(value, normalized)]
        if "normalized_shape" in candidates:
            candidates = ["normalized_shape"]
        if len(candidates) == 1 and not _layer_norm_reads(owner, candidates[0], normalized):
            candidates = []   # the value is also written as a literal in the code
        if len(candidates) != 1:
            found = "no attribute" if not candidates else f"several attributes ({', '.join(candidates)})"
            raise _CannotFollow(f"{label} reads normalized_shape {shown} as a constant, and '{owner_name}' "
                                f"({type(owner).__name__}) has {found} holding it, so a prune cannot update "
                                f"it; keep it in one module attribute (self.normalized_shape) or use nn.LayerNorm")
        index = None if isinstance(normalized, int) else len(normalized) - 1
        self._shape_attributes.append(_ShapeAttribute(space, owner, owner_name or "(model)", candidates[0], index))

    def _calling_module(self, node: fx.Node) -> str | None:
        """Qualified name of the module whose forward made the call ``node`` (None: unknown)."""
        stack = node.meta.get("nn_module_stack")
        if stack:
            key, value = list(stack.items())[-1]
            path = value[0] if isinstance(value, (tuple, list)) and isinstance(value[0], str) else key
            if path in self._modules:
                return path
        for arg in node.all_input_nodes:   # its weight: "<owner>.weight"
            if arg.op == "get_attr" and arg.target.rpartition(".")[0] in self._modules:
                return arg.target.rpartition(".")[0]
        return "" if not stack else None

    def _evaluate_value(self, value: Any, env: dict[fx.Node, torch.Tensor]) -> Any:
        """A (nested) argument with its nodes evaluated as in :meth:`_evaluate`."""
        return fx.node.map_aggregate(value, lambda v: self._evaluate(v, env, None, 1) if isinstance(v, fx.Node) else v)

    # -- data movement (followed empirically) -------------------------------------------------

    def _movement(self, node: fx.Node, module: Optional[nn.Module] = None) -> None:
        inputs = [n for n in self._slotted_inputs(node, attrs=True)]
        if len(inputs) != 1:
            raise _CannotFollow(f"{self._label(node)} reads {len(inputs)} tensors with units")
        x = inputs[0]
        space = self._space_of(x)
        if space is None:
            raise _CannotFollow(f"{self._label(node)}: input without units")
        out_shape = self._shape(node)
        full = _slot_ids(space.shape, space.axis, np.arange(space.size))
        try:
            y = self._evaluate(node, {x: full}, module)
        except _CannotFollow:
            raise
        except Exception as exc:
            raise _CannotFollow(
                f"cannot follow the units through {self._label(node)} ({type(exc).__name__}: {exc})") from exc
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(out_shape):
            raise _CannotFollow(f"cannot follow the units through {self._label(node)}")
        out_axis, line = _unit_line(y)
        if out_axis is None:
            raise _CannotFollow(
                f"{self._label(node)} spreads the units over several axes (a channel shuffle or a reshape "
                f"that splits the unit axis); it cannot be pruned")
        present = set(np.unique(line).tolist())
        if present != set(range(space.size)):
            self._piece(node, x, space, y, out_axis, line, module)
            return
        if space.size >= 2:
            for removed in _probe_removals(space.size):
                keep = np.setdiff1d(np.arange(space.size), removed)
                small = _slot_ids(space.shape, space.axis, keep)
                try:
                    y_small = self._evaluate(node, {x: small}, module)
                except Exception as exc:
                    raise _CannotFollow(
                        f"hard-coded shape in {self._label(node)}: it fails once units are removed "
                        f"({type(exc).__name__}: {str(exc)[:120]})") from None
                expected = y.index_select(out_axis, torch.as_tensor(np.nonzero(np.isin(line, keep))[0]))
                if not isinstance(y_small, torch.Tensor) or y_small.shape != expected.shape \
                        or not torch.equal(y_small, expected):
                    raise _CannotFollow(f"hard-coded shape in {self._label(node)}: its result is wrong once units "
                                        f"are removed (e.g. x.view(-1, C*H*W) with a literal size)")
        out = self._alloc(node, out_axis)
        self._link(space, line, out, np.arange(out.size))

    def _piece(self, node: fx.Node, x: fx.Node, space: _Space, y: torch.Tensor, out_axis: int, line: np.ndarray,
               module: Optional[nn.Module]) -> None:
        """``node`` keeps a part of the unit axis (a piece of ``split``/``chunk``, ``x[:, a:b]``): each
        unit of the piece maps back to its source unit. Two kinds are followed, each checked by
        running the op on slot ids with units removed:

        - *equal pieces* (``chunk(n)``, ``split(x.size(1) // n)``, or ``split(self.width)`` with the
          size read from a module attribute, which the prune then updates): the piece is block
          ``k`` of ``n`` equal blocks and stays so when every block loses the same units. Position
          ``j`` of every block is linked (one unit removes it from every piece, as the dims of
          attention heads), so the pieces stay equal whatever the selection;
        - *fixed positions* (sizes written in the code: ``split(16)``, ``x[:, :16]``): removing units
          after the piece leaves it unchanged; the units up to its end cannot be removed (their
          groups are refused, naming the op), the others are free.
        """
        label = op = self._label(node)
        source = node.args[0] if node.target is operator.getitem else None
        if isinstance(source, fx.Node) and self._shape(source) is None:   # an item of split/chunk's tuple
            op = self._label(source)
            label = f"item {node.args[1]!r} of {op}"
        size = space.size

        def result_without(removed: np.ndarray) -> torch.Tensor | None:
            keep = np.setdiff1d(np.arange(size), removed)
            try:
                value = self._evaluate(node, {x: _slot_ids(space.shape, space.axis, keep)}, module)
            except Exception:  # noqa: BLE001 - the model's own code fails on the smaller tensor
                return None
            return value if isinstance(value, torch.Tensor) else None

        def equals(value: torch.Tensor | None, removed: np.ndarray) -> bool:
            expected = y.index_select(out_axis, torch.as_tensor(np.nonzero(~np.isin(line, removed))[0]))
            return value is not None and value.shape == expected.shape and torch.equal(value, expected)

        length, first = len(line), int(line[0])
        contiguous = bool(np.array_equal(line, np.arange(first, first + length)))
        blocks = size // length if contiguous and size % length == 0 and first % length == 0 else 0
        sized_by = self._split_size_attribute(source, length) if blocks >= 2 and source is not None else None
        if blocks >= 2 and (sized_by is not None or all(
                equals(result_without(np.arange(blocks) * length + r), np.arange(blocks) * length + r)
                for r in sorted({0, length // 2, length - 1}))):
            out = self._alloc(node, out_axis)
            self._link(space, line, out, np.arange(out.size))
            if space not in self._equal_pieces:
                self._equal_pieces.append(space)
                slots = np.arange(size)
                self._link(space, slots, space, slots % length)   # position j of every piece goes together
            if sized_by is not None:
                owner, owner_name, attribute = sized_by
                self._shape_attributes.append(_ShapeAttribute(out, owner, owner_name, attribute, None))
            return
        end = int(line.max())
        free = np.arange(end + 1, size)
        probes = [free[[0]], free[[-1]], free[[len(free) // 2]]] if len(free) else []
        results = [result_without(p) for p in probes]
        if any(r is None or r.shape != y.shape or not torch.equal(r, y) for r in results):
            raise _CannotFollow(f"{label} selects units of the unit axis that do not follow once units are "
                                f"removed (hard-coded indexing)")
        out = self._alloc(node, out_axis)
        self._link(space, line, out, np.arange(out.size))
        self._pin(space, np.arange(end + 1),
                  f"{label} takes units {first}..{end} of {size} at positions written in the code (a split or "
                  f"slice with literal sizes): removing any unit up to {end} would shift it; compute the sizes "
                  f"from the tensor (x.size(1) // 2, chunk) to prune them")

    def _split_size_attribute(self, source: fx.Node, length: int) -> tuple[nn.Module, str, str] | None:
        """``(module, name, attribute)`` when ``source`` is ``split(size)`` with ``size`` read from an
        int attribute of the module that calls it (``torch.split(x, self.width, 1)``, checked by
        tracing the module again with the attribute changed), else None."""
        is_split = (source.op == "call_function" and source.target is torch.split) or \
            (source.op == "call_method" and source.target == "split")
        size = self._dim_arg(source, 1, "split_size_or_sections" if source.op == "call_function" else "split_size")
        if not is_split or type(size) is not int or size != length:
            return None
        owner_name = self._calling_module(source)
        owner = self._modules.get(owner_name) if owner_name is not None else None
        if owner is None:
            return None
        candidates = [attr for attr, value in vars(owner).items() if not attr.startswith("_") and type(value) is int
                      and value == length]
        function: Any = torch.split if source.op == "call_function" else "split"
        keyword = "split_size_or_sections" if source.op == "call_function" else "split_size"
        found = [attr for attr in candidates if _reads_attribute(owner, attr, function, 1, keyword)]
        return (owner, owner_name or "(model)", found[0]) if len(found) == 1 else None

    def _pin(self, space: _Space, positions: np.ndarray, reason: str) -> None:
        """Refuse the groups of the given slots of ``space`` (not its other slots): a blocked
        stand-in tensor is linked to them."""
        pin = _Space(node=space.node, site=None, start=self._num_slots, size=len(positions), axis=0,
                     shape=(len(positions),))
        self._num_slots += pin.size
        self._space_list.append(pin)
        self._link(space, positions, pin, np.arange(pin.size))
        self._block(pin, reason)

    def _evaluate(self, node: fx.Node, env: Dict[fx.Node, torch.Tensor], module: Optional[nn.Module] = None,
                  depth: int = 0) -> Any:
        """Run ``node`` with ``env`` substituted; the shape arithmetic feeding it is re-run too
        (``x.size(0)``, ``h // p``), other tensors are stand-ins of their recorded shape."""
        if node in env:
            return env[node]
        if depth > 40:
            raise _CannotFollow("argument chain too deep")
        if depth > 0 and self._shape(node) is not None:
            return torch.empty(self._shape(node), device="meta", dtype=self._dtype(node) or torch.float32)

        def value(arg: Any) -> Any:
            if isinstance(arg, fx.Node):
                return self._evaluate(arg, env, None, depth + 1)
            if isinstance(arg, (list, tuple)):
                return type(arg)(value(a) for a in arg)
            if isinstance(arg, slice):
                return slice(value(arg.start), value(arg.stop), value(arg.step))
            if isinstance(arg, dict):
                return {k: value(v) for k, v in arg.items()}
            return arg

        args = value(node.args)
        kwargs = value(dict(node.kwargs))
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module" and depth == 0:
            mod = module if module is not None else self._traced_modules[node.target]
            return mod(*args, **kwargs)
        raise _CannotFollow(f"cannot evaluate {node.op} '{node.name}' in a shape computation")

    # -- modules ----------------------------------------------------------------------------

    def _visit_layer_call(self, node: fx.Node, site: CallSite) -> None:
        """A functional call that stands for its layer (``F.linear`` on ``self.weight`` inside an
        ``nn.Linear`` subclass that fx traces into): followed as a call of that layer, whose rule
        slices all of its tensors once. The settings the call reads as constants and a prune
        changes (``groups`` of a grouped convolution, ``num_groups``, ``normalized_shape``) must
        come from the layer's attributes, not from literals in its code."""
        module = site.module
        _, _, settings = FUNCTIONAL_LAYERS[node.target]
        for position, keyword, attribute in settings:
            value = getattr(module, attribute)
            if attribute in ("groups", "num_groups") and value == 1:
                continue   # a prune never changes a single group
            if not _reads_attribute(module, attribute, node.target, position, keyword):
                raise _CannotFollow(f"{self._label(node)} passes {keyword}={value!r} as a constant that does not "
                                    f"come from '{site.module_name}.{attribute}', so a prune cannot update it; read "
                                    f"it from self.{attribute} in the forward")
        data = [n for n in self._slotted_inputs(node) if n.op != "get_attr"]
        self._visit_module(node, module, data)

    def _visit_module(self, node: fx.Node, module: nn.Module, slotted: List[fx.Node]) -> None:
        name = self._site_by_node[node].module_name or str(node.target)
        shape = self._shape(node)
        if isinstance(module, nn.MultiheadAttention):
            return  # handled at its getitem (the module returns a tuple)
        data = [n for n in slotted if n.op != "get_attr"]
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            if shape is not None:
                self._add_role(self._alloc(node, len(shape) - 1), "out", module, name)
            return
        if isinstance(module, MOVEMENT_MODULES) or _is_torchvision(module, "Permute"):
            if data:
                self._movement(node, module)
            return
        if not data:
            if shape is not None:
                site = self._site_by_node[node]
                if site.unit_axis is not None:
                    space = self._alloc(node, site.unit_axis)
                    self._block(space, f"{self._label(node)} produces units from no input units")
            return
        if len(data) != 1:
            raise _CannotFollow(f"{self._label(node)} reads {len(data)} tensors with units")
        x = data[0]
        space = self._spaces[x]
        if shape is None:
            raise _CannotFollow(f"{self._label(node)} does not return a single tensor")
        rule = get_slicing_rule(module)
        if isinstance(module, nn.modules.conv._ConvNd):
            self._conv(node, module, name, space)
        elif isinstance(module, nn.Linear) or (rule is not None and getattr(rule, "input_unit_axis", None) == -1
                                               and not getattr(rule, "passes_units_through", False)):
            if space.axis != space.ndim - 1:
                # the layer maps the last axis; units on another axis (MLP-Mixer's token mixing on
                # [N, C, L]) pass through it unit by unit, and its own features are not units here
                # (after an op that could not be followed the axis is a guess: then it only blocks, so
                # the refusal stays in its group)
                if x.op != "placeholder" and id(space) not in self._blocked and id(space) not in self._guessed \
                        and len(shape) == space.ndim and shape[space.axis] == space.size:
                    self._link_same(space, self._alloc(node, space.axis))
                    return
                if x.op != "placeholder":
                    self._block(space, f"{self._label(node)} reads its input units on the last axis but the "
                                       f"units are on axis {space.axis} of a {space.ndim}-d tensor")
            else:
                self._add_role(space, "in", module, name)
            self._add_role(self._alloc(node, len(shape) - 1), "out", module, name)
        elif isinstance(module, nn.GroupNorm):
            self._require_axis(node, space, 1)
            out = self._alloc(node, 1)
            self._link_same(space, out)
            per = module.num_channels // module.num_groups
            slots = np.arange(space.size)
            self._link(space, slots, space, slots - slots % per)  # whole groups only
            self._add_role(space, "in", module, name)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            dims = len(module.normalized_shape)
            out = self._alloc(node, space.axis)
            self._link_same(space, out)
            if space.axis >= space.ndim - dims:
                self._add_role(space, "in", module, name)  # also updates normalized_shape
        elif isinstance(module, nn.modules.batchnorm._NormBase) or isinstance(module, nn.PReLU):
            if isinstance(module, nn.PReLU) and module.num_parameters == 1:
                self._link_same(space, self._alloc(node, space.axis))
                return
            self._require_axis(node, space, 1)
            self._link_same(space, self._alloc(node, 1))
            self._add_role(space, "in", module, name)
        elif isinstance(module, nn.modules.dropout._DropoutNd):
            self._link_same(space, self._alloc(node, space.axis))
            # p follows the pruner's dropout_policy when every call site loses the same fraction
            self._add_role(space, "in", module, name, per_call=True)
        elif isinstance(module, PASS_THROUGH_MODULES) or _is_torchvision(module, "StochasticDepth"):
            self._link_same(space, self._alloc(node, space.axis))
        elif isinstance(module, DIM_WISE_MODULES):
            if module.dim is None or module.dim % space.ndim == space.axis:
                raise _CannotFollow(f"{self._label(node)} mixes the units along their axis")
            self._link_same(space, self._alloc(node, space.axis))
        elif isinstance(module, SPATIAL_MODULES):
            spatial = space.ndim - 2
            for digit in "123":
                if type(module).__name__.endswith(f"{digit}d"):
                    spatial = int(digit)
            if space.axis >= space.ndim - spatial or shape[space.axis] != space.size:
                raise _CannotFollow(f"{self._label(node)} acts on the unit axis {space.axis}")
            self._link_same(space, self._alloc(node, space.axis))
        elif rule is not None and getattr(rule, "passes_units_through", False):
            axis = getattr(rule, "input_unit_axis", None)
            if axis is not None and axis % space.ndim != space.axis:
                raise _CannotFollow(f"{self._label(node)} reads units on axis {axis}, they are on {space.axis}")
            self._link_same(space, self._alloc(node, space.axis))
            if getattr(rule, "has_unit_state", True):
                self._add_role(space, "in", module, name)
        elif rule is not None and rule.out_units(module) is not None:
            axis = getattr(rule, "input_unit_axis", None)
            if rule.in_units(module) is None or axis is None or axis % space.ndim != space.axis:
                raise _CannotFollow(f"{self._label(node)}: its rule does not say where it reads its units")
            self._add_role(space, "in", module, name)
            self._add_role(self._alloc(node, axis % len(shape)), "out", module, name)
        else:
            raise _CannotFollow(f"cannot follow the units through {self._label(node)}: no slicing rule for "
                                f"{type(module).__name__} (register one with torchpruner.register_slicing_rule)")

    def _require_axis(self, node: fx.Node, space: _Space, axis: int) -> None:
        if space.axis != axis:
            raise _CannotFollow(f"{self._label(node)} reads units on axis {axis}; they are on axis {space.axis}")

    def _conv(self, node: fx.Node, module: nn.modules.conv._ConvNd, name: str, space: _Space) -> None:
        groups, cin, cout = module.groups, module.in_channels, module.out_channels
        if space.axis != 1 and groups == 1:
            # the input cannot lose units here; the output channels are the layer's own and stay prunable
            self._block(space, f"{self._label(node)} reads units on axis 1; they are on axis {space.axis}")
            self._add_role(self._alloc(node, 1), "out", module, name)
            return
        self._require_axis(node, space, 1)
        out = self._alloc(node, 1)
        if groups == 1:
            self._add_role(space, "in", module, name)
            self._add_role(out, "out", module, name)
        elif groups == cin:
            # depthwise: channel c -> output channels c*m .. c*m+m-1; pruned through its input
            mult = cout // cin
            self._link(space, np.repeat(np.arange(cin), mult), out, np.arange(cout))
            self._add_role(space, "in", module, name)
        else:
            # grouped: any positions, but the same *count* in every conv group (the weight stays a
            # valid grouped weight); nothing is linked, the count is a constraint on the selection
            self._count_constraints += [(space, groups), (out, groups)]
            self._add_role(space, "in", module, name)
            self._add_role(out, "out", module, name)

    def _visit_module_item(self, node: fx.Node) -> None:
        """``getitem`` on a module returning a tuple: ``nn.MultiheadAttention``'s output."""
        source = node.args[0]
        module = self._traced_modules[source.target]
        name = self._site_by_node[source].module_name or source.target
        if isinstance(module, nn.MultiheadAttention) and node.args[1] == 0:
            self._attention(source, node, module, name)
            return
        if isinstance(module, nn.MultiheadAttention):
            return  # attention weights: no units of their own
        raise _CannotFollow(f"cannot follow the units through {self._label(source)}: it returns a tuple")

    def _attention(self, source: fx.Node, node: fx.Node, module: nn.MultiheadAttention, name: str) -> None:
        query = source.kwargs.get("query", source.args[0] if source.args else None)
        key = source.kwargs.get("key", source.args[1] if len(source.args) > 1 else None)
        value = source.kwargs.get("value", source.args[2] if len(source.args) > 2 else None)
        label = self._label(source)
        space = self._spaces.get(query)
        if space is None:
            raise _CannotFollow(f"{label}: query without units")
        if not (query is key is value) or not module._qkv_same_embed_dim:
            raise _CannotFollow(f"{label}: only self-attention (query is key is value) can be pruned")
        if space.axis != space.ndim - 1:
            raise _CannotFollow(f"{label}: units must be on the last axis")
        out = self._alloc(node, len(self._shape(node)) - 1)
        self._link_same(space, out)
        head_dim = module.embed_dim // module.num_heads
        slots = np.arange(space.size)
        self._link(space, slots, space, slots % head_dim)   # embed dim i is head dim i % head_dim: all heads alike
        self._add_role(space, "in", module, name)

    def _add_role(self, space: _Space, direction: str, module: nn.Module, name: str, per_call: bool = False) -> None:
        if per_call:
            # nothing is shared between the calls of a parameter-free module: each is its own op
            self._roles.append(_Role(space=space, direction=direction, module=module, module_name=name, per_call=True))
            return
        first = self._first_role_space.setdefault((id(module), direction), space)
        if first is not space:
            # a module called several times shares its weights: each call loses the same units
            if first.size != space.size:
                raise _CannotFollow(f"module '{name}' is called with different unit counts")
            self._link_same(first, space)
            return
        self._roles.append(_Role(space=space, direction=direction, module=module, module_name=name))

    def _passes_through(self, role: _Role) -> bool:
        module = role.module
        if role.direction != "in":
            return False
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.groups == module.in_channels and module.groups > 1
        if isinstance(module, nn.MultiheadAttention):
            return True
        rule = get_slicing_rule(module)
        return bool(getattr(rule, "passes_units_through", False))

    # -- groups -------------------------------------------------------------------------------

    def _build_groups(self) -> None:
        n = self._num_slots
        for space in self._space_list:          # bare parameters: roles for their owners
            if space.node.op == "get_attr":
                self._attr_role(space)
        if self._edges:
            a = np.concatenate([e[0] for e in self._edges])
            b = np.concatenate([e[1] for e in self._edges])
        else:
            a = b = np.zeros(0, dtype=np.int64)
        labels = connected_components(n, a, b)   # one label per unit
        self._labels = labels
        num_labels = int(labels.max()) + 1 if n else 0
        # units held by exactly the same tensors form a group (a residual stream; one branch of a
        # concatenation is its own group even though the concatenated tensor holds every branch)
        space_of_slot = np.repeat(np.arange(len(self._space_list)), [s.size for s in self._space_list])
        pairs = np.unique(space_of_slot.astype(np.int64) * max(num_labels, 1) + labels)
        pair_space, pair_label = pairs // max(num_labels, 1), pairs % max(num_labels, 1)
        rng = np.random.default_rng(0)
        keys = rng.integers(0, np.iinfo(np.int64).max, size=len(self._space_list), dtype=np.int64).astype(np.uint64)
        signature = np.zeros(num_labels, dtype=np.uint64)
        np.add.at(signature, pair_label, keys[pair_space])
        _, raw_group = np.unique(signature, return_inverse=True)
        raw_group = raw_group.reshape(-1)
        # order groups by their first tensor in data-flow order, units by a source's channels
        anchor: Dict[int, _Space] = {}
        for role in self._roles:
            if role.direction in ("out", "param"):
                for raw in np.unique(raw_group[labels[role.space.start:role.space.start + role.space.size]]):
                    anchor.setdefault(int(raw), role.space)
        self._group_of_label = np.full(num_labels, -1, dtype=np.int64)
        self._unit_index = np.full(num_labels, -1, dtype=np.int64)
        groups: List[Group] = []
        for space in self._space_list:
            lab = labels[space.start:space.start + space.size]
            for raw in pd_unique(raw_group[lab]):
                if self._group_of_label[lab[raw_group[lab] == raw][0]] >= 0:
                    continue
                first = anchor.get(int(raw), space)
                first_lab = labels[first.start:first.start + first.size]
                first_lab = pd_unique(first_lab[raw_group[first_lab] == raw])
                group = Group(self, len(groups), first_lab)
                self._group_of_label[first_lab] = group.index
                self._unit_index[first_lab] = np.arange(len(first_lab))
                groups.append(group)
        group_of_pair = self._group_of_label[pair_label]
        for k, space in enumerate(self._space_list):
            reason = self._blocked.get(id(space))
            for gi in np.unique(group_of_pair[pair_space == k]):
                group = groups[gi]
                group._spaces.append(space)
                if reason is not None:
                    if reason[1] and group.refusal is None:
                        group.refusal = reason[0]
                        group.refusal_site = self._site_by_node.get(reason[2])
                    elif not reason[1] and group.output_reason is None:
                        group.output_reason = reason[0]
        space_index = {id(space): k for k, space in enumerate(self._space_list)}
        for role in self._roles:
            for gi in np.unique(group_of_pair[pair_space == space_index[id(role.space)]]):
                groups[gi]._roles.append(role)
        for group in groups:
            seen = set()
            for role in group._roles:
                key = (id(role.module), role.direction, role.parameter)
                if key in seen:
                    continue
                seen.add(key)
                mine = int((group._unit_of(role.space) >= 0).sum())
                group.members.append(Member(role.module_name, role.module, role.direction, role.parameter,
                                            role.space.size, max(1, mine // max(1, group.num_units))))
        self._groups = groups

    def removals(self, selection: Mapping[Group, Sequence[int]]) -> List[Tuple[_Role, np.ndarray]]:
        """``[(role, removed positions)]`` when the given units of the given groups go, merged per
        module and side (a layer reading a concatenation loses inputs of several groups)."""
        merged: dict[tuple[int, str, str | None, int], tuple[_Role, np.ndarray]] = {}
        order: list[tuple[int, str, str | None, int]] = []
        for group, units in selection.items():
            for role in group._roles:
                # the calls of a module with weights are linked (same positions); a parameter-free
                # module's calls are not, so each keeps its own positions
                key = (id(role.module), role.direction, role.parameter, id(role.space) if role.per_call else 0)
                positions = group.positions(role.space, units)
                if key in merged:  # several calls of one module are linked: same positions
                    merged[key] = (merged[key][0], np.union1d(merged[key][1], positions))
                    continue
                merged[key] = (role, positions)
                order.append(key)
        return [merged[k] for k in order if len(merged[k][1])]

    def call_site_removals(self, module: nn.Module,
                           selection: Mapping[Group, Sequence[int]]) -> list[tuple[_Role, np.ndarray]]:
        """For a parameter-free module with a role per call site (Dropout): ``[(role, removed
        positions)]`` for *every* call site of ``module`` (empty positions where nothing goes)."""
        result = []
        for role in self._roles:
            if role.module is module and role.per_call:
                positions = [group.positions(role.space, units) for group, units in selection.items()]
                result.append((role, np.unique(np.concatenate(positions)) if positions else np.zeros(0, np.int64)))
        return result

    def shape_attribute_edits(self, selection: Mapping[Group, Sequence[int]]) -> list[AttributeChange]:
        """The changes of the module attributes that hold a size of the removed units (the
        ``normalized_shape`` a functional ``F.layer_norm`` reads), one per attribute."""
        edits: dict[tuple[int, str], AttributeChange] = {}
        for record in self._shape_attributes:
            key = (id(record.module), record.attribute)
            removed = sum(len(group.positions(record.space, units)) for group, units in selection.items())
            if not removed or key in edits:
                continue
            old = getattr(record.module, record.attribute)
            if record.index is None:
                new: Any = old - removed
            else:
                values = list(old)
                values[record.index] -= removed
                new = torch.Size(values) if isinstance(old, torch.Size) else type(old)(values)
            edits[key] = AttributeChange(module=record.module, attribute=record.attribute, old=old, new=new)
        return list(edits.values())

    def _attr_role(self, space: _Space) -> None:
        path = space.node.target
        owner_path, _, attr = path.rpartition(".")
        owner = self._modules.get(owner_path)
        if owner is None:
            self._block(space, f"cannot find the owner of the parameter '{path}'")
            return
        rule = get_slicing_rule(owner)
        sliced_by_rule = rule is not None and attr in (rule.tensors or ("weight", "bias"))
        if sliced_by_rule and any((id(owner), d) in self._first_role_space for d in ("in", "out")):
            # the layer's rule slices this tensor with the layer's units: a second, bare use of it
            # (a tied weight, a scale read by another op) cannot be kept consistent with that slice
            users = ", ".join(self._label(u) for u in space.node.users)
            self._block(space, f"'{path}' is read outside the call of its layer '{owner_path}' "
                               f"({type(owner).__name__}) by {users}; pruning the layer would slice it for both")
            return
        if sliced_by_rule and getattr(rule, "passes_units_through", False):
            role = _Role(space=space, direction="in", module=owner, module_name=owner_path)
        else:
            role = _Role(space=space, direction="param", module=owner, module_name=owner_path or "(model)",
                         parameter=attr, axis=space.axis)
        self._roles.append(role)

    # -- queries ------------------------------------------------------------------------------

    def _output_space(self, module: nn.Module, call_index: int = 0) -> _Space:
        site = self.graph.site(module, call_index)
        space = self._spaces.get(site.node)
        if space is None and isinstance(module, nn.MultiheadAttention):
            for user in site.node.users:
                if user.target is operator.getitem and user.args[1] == 0:
                    space = self._spaces.get(user)
        if space is None:
            raise DependencyError(f"module '{site.label}' ({type(module).__name__}) has no output units to prune")
        return space

    def groups(self, ignored_layers: Sequence[nn.Module] = (), include_outputs: bool = False,
               prunable_only: bool = True) -> List[Group]:
        """The coupled groups (each once), in data-flow order.

        Args:
            ignored_layers: modules whose output units must not be pruned; a group with such a
                source is left out.
            include_outputs: also list groups that reach the model output (classifier outputs).
            prunable_only: leave out groups that cannot be pruned (see ``group.why_not_prunable``).
        """
        ignored = {id(m) for m in ignored_layers}
        result = []
        for group in self._groups:
            if not group.members:
                continue
            if prunable_only and not group.prunable(include_outputs):
                continue
            if any(id(m) in ignored for m in group.source_modules):
                continue
            result.append(group)
        return result

    def refused_groups(self, ignored_layers: Sequence[nn.Module] = ()) -> List[Group]:
        """The groups that hold units of a layer but cannot be pruned because an op cannot be
        followed (``group.refusal`` says why, ``group.refusal_site`` where); groups that only
        reach the model output or hold a single unit are not refusals."""
        ignored = {id(m) for m in ignored_layers}
        return [group for group in self._groups
                if group.members and group.refusal is not None and group.source_roles
                and not any(id(m) in ignored for m in group.source_modules)]

    def warn_refused(self, ignored_layers: Sequence[nn.Module] = ()) -> None:
        """Warn (:class:`RefusedGroupsWarning`, once per analysis) when groups are refused: their
        count and the first reasons, so that a prune that leaves layers alone never does so silently."""
        if self._warned:
            return
        self._warned = True
        refused = self.refused_groups(ignored_layers)
        if not refused:
            return
        shown = "; ".join(f"group {g.index} ({g.members[0].module_name}): {g.refusal}" for g in refused[:3])
        more = f"; and {len(refused) - 3} more" if len(refused) > 3 else ""
        warnings.warn(RefusedGroupsWarning(
            f"{len(refused)} of {len(self.all_groups)} groups of {type(self.model).__name__} hold units of a layer but "
            f"cannot be pruned, and are left out: {shown}{more} (pruner.refused_groups() lists each with its call "
            f"site)"), stacklevel=3)

    @property
    def all_groups(self) -> List[Group]:
        return [g for g in self._groups if g.members]

    def groups_of(self, module: nn.Module, call_index: int = 0) -> List[Group]:
        """The groups holding ``module``'s output units (usually one)."""
        space = self._output_space(module, call_index)
        gids = self._group_of_label[self._labels[space.start:space.start + space.size]]
        return [self._groups[g] for g in pd_unique(gids)]

    def group_of(self, module: nn.Module, call_index: int = 0) -> Group:
        """The group holding ``module``'s output units (DependencyError if they span several)."""
        groups = self.groups_of(module, call_index)
        if len(groups) != 1:
            raise DependencyError(f"the output units of '{self.graph.module_name(module)}' belong to "
                                  f"{len(groups)} groups; use groups_of()")
        return groups[0]

    def select(self, module: nn.Module, indices: Sequence[int], call_index: int = 0) -> Dict[Group, List[int]]:
        """``{group: units}`` removed when output units ``indices`` of ``module`` go."""
        space = self._output_space(module, call_index)
        indices = np.asarray(sorted(set(int(i) for i in indices)), dtype=np.int64)
        gids = self._group_of_label[self._labels[space.start + indices]]
        selection: Dict[Group, List[int]] = {}
        for gi in pd_unique(gids):
            group = self._groups[gi]
            selection[group] = group.units_for(module, indices[gids == gi], call_index)
        return selection


def tensor_shapes(model: nn.Module) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return tuple((name, tuple(tensor.shape)) for name, tensor in named)


def pd_unique(values: np.ndarray) -> np.ndarray:
    """Unique values in order of first appearance."""
    values = np.asarray(values)
    _, first = np.unique(values, return_index=True)
    return values[np.sort(first)]

def _layer_norm_reads(owner: nn.Module, attribute: str, literal: Any) -> bool:
    """Every ``F.layer_norm`` call in ``owner``'s forward whose normalized_shape is ``literal`` reads
    it from ``owner.<attribute>``: traced again with the attribute set to another value (restored
    afterwards), none of them still shows ``literal``."""
    return _reads_attribute(owner, attribute, F.layer_norm, 1, "normalized_shape", literal)


def _reads_attribute(owner: nn.Module, attribute: str, function: Callable | str, position: int, keyword: str,
                     literal: Any = None) -> bool:
    """The calls of ``function`` (a tensor method: its name) in ``owner``'s forward take argument ``keyword`` from
    ``owner.<attribute>``: traced again with the attribute set to another value (restored
    afterwards), one of them shows that value and none still shows ``literal`` (by default the
    attribute's value)."""
    old = getattr(owner, attribute)
    literal = old if literal is None else literal
    if isinstance(old, int):
        sentinel: Any = old + 7919
    else:
        values = [int(v) + 7919 for v in old]
        sentinel = torch.Size(values) if isinstance(old, torch.Size) else type(old)(values)
    try:
        setattr(owner, attribute, sentinel)
        graph = _LeafTracer().trace(owner)
    except Exception:  # noqa: BLE001 - its forward cannot be traced alone: the origin stays unknown
        return False
    finally:
        setattr(owner, attribute, old)
    op = "call_method" if isinstance(function, str) else "call_function"
    values = [n.kwargs.get(keyword, n.args[position] if len(n.args) > position else None)
              for n in graph.nodes if n.op == op and (n.target == function if op == "call_method" else n.target is function)]
    return any(_same_shape_value(sentinel, value) for value in values) and \
        not any(_same_shape_value(value, literal) for value in values)


def _same_shape_value(value: Any, literal: Any) -> bool:
    """``value`` (a module attribute) is the shape constant ``literal`` that fx wrote into the graph."""
    if isinstance(literal, bool) or isinstance(value, bool):
        return False
    if isinstance(literal, int):
        return type(value) is int and value == literal
    if isinstance(literal, (tuple, list, torch.Size)) and isinstance(value, (tuple, list, torch.Size)):
        return tuple(value) == tuple(literal)
    return False


def _shape_values(value: Any) -> list[Any]:
    """The non-tensor leaves of a (nested) argument, for comparing computed shapes."""
    found: list[Any] = []
    fx.node.map_aggregate(value, lambda v: found.append(None if isinstance(v, torch.Tensor) else v))
    return found


def _flatten_nodes(value: Any) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(v, fx.Node) else None)
    return found


def _slot_ids(shape: Sequence[int], axis: int, ids: np.ndarray) -> torch.Tensor:
    """A tensor of ``shape`` (with ``len(ids)`` on ``axis``) holding each position's slot id."""
    shape = list(shape)
    shape[axis] = len(ids)
    view = [1] * len(shape)
    view[axis] = len(ids)
    return torch.as_tensor(ids, dtype=torch.int64).reshape(view).expand(shape).contiguous()


def _unit_line(y: torch.Tensor) -> Tuple[Optional[int], Optional[np.ndarray]]:
    """The one axis along which slot ids vary (constant along every other axis)."""
    if y.dim() == 0:
        return None, None
    candidates = []
    for axis in range(y.dim()):
        index = [0] * y.dim()
        index[axis] = slice(None)
        line = y[tuple(index)]
        view = [1] * y.dim()
        view[axis] = y.shape[axis]
        if torch.equal(y, line.reshape(view).expand_as(y)):
            candidates.append((axis, line))
    varying = [(a, ids) for a, ids in candidates if ids.numel() > 1 and not bool((ids == ids[0]).all())]
    if len(varying) == 1:
        return varying[0][0], varying[0][1].numpy()
    if not varying and candidates and bool((y == y.flatten()[0]).all()):
        # a single unit: the last axis holding it
        for a, ids in reversed(candidates):
            if y.shape[a] >= 1:
                return a, ids.numpy()
    return None, None


def _probe_removals(size: int) -> List[np.ndarray]:
    probes = [np.array([0, size // 2]) if size >= 3 else np.array([0])]
    if size >= 4:
        probes.append(np.array([size - 1]))
    return [np.unique(p) for p in probes]


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

_DEP_CACHE: Dict[int, Tuple[ModelGraph, DependencyGraph]] = {}


def get_dependency_graph(graph: ModelGraph) -> DependencyGraph:
    """The :class:`DependencyGraph` of ``graph`` (built once per graph object)."""
    cached = getattr(graph, "_torchpruner_dependencies", None)
    if cached is None:
        cached = DependencyGraph(graph)
        graph._torchpruner_dependencies = cached
    return cached
